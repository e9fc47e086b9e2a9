"""Plain eager calls of the kernel ops, without the torch.library dispatch.

Each op with a backward is a pair of torch.library custom ops (what torch.compile, export and
fake tensors see) and the same launchers as a torch.autograd.Function, which plain eager calls
run. A custom op's Python dispatch (its autograd kernel, redispatch, argument checks) is host
time that small eager calls wait for: the Function route took 26 % less per MDTA forward +
backward on the H200 machine (992 vs 1345 us, bench/results/h200_2026-11-27f.md), 189 vs
254 us of host code on this project's CPU machine (launches stubbed, bench/launch_overhead.py).
"""
from __future__ import annotations

import torch

__all__ = ["kernel_autograd", "plain_eager", "mark_saved_state"]


def kernel_autograd(name: str, forward_op, backward_op, forward_launch, backward_launch, save, backward):
    """Registers autograd on the custom op ``forward_op`` and returns the autograd.Function
    that plain eager calls run instead; both compute the same launchers.

    forward_launch(*inputs) -> out, or (out, *state) where state only carries what the
    backward needs; save(ctx, inputs, out, state) puts that on ctx; backward(ctx, grad_out,
    launch) returns the inputs' gradients, with ``launch`` the backward launcher
    (``backward_op`` for the custom op, ``backward_launch`` for the Function). The Function
    returns out alone: each further output of an autograd node cost ~25 us of host time per
    forward + backward on the CPU machine.
    """
    def setup_context(ctx, inputs, output):
        out, state = _output_and_state(output)
        save(ctx, inputs, out, state)
        if state:
            mark_saved_state(ctx, *state)

    def op_backward(ctx, grad_out, *_state_grads):
        return backward(ctx, grad_out, backward_op)

    forward_op.register_autograd(op_backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        out, state = _output_and_state(forward_launch(*inputs))
        save(ctx, inputs, out, state)
        return out

    def eager_backward(ctx, grad_out):
        return backward(ctx, grad_out, backward_launch)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})


def _output_and_state(output) -> tuple:
    """(out, state) of a forward launcher's result: out alone, or (out, *state)."""
    return (output[0], output[1:]) if isinstance(output, tuple) else (output, ())


def plain_eager(x: torch.Tensor) -> bool:
    """True where an op may skip its custom op: no torch.compile or export tracing, no
    dispatch mode (FakeTensorMode, ...) active, and x an ordinary tensor (not fake)."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack())


def mark_saved_state(ctx, *outputs: torch.Tensor) -> None:
    """In a setup_context: ``outputs`` only carry state to the backward (statistics,
    normalisers) and are never differentiated, so autograd neither zero-fills gradients for
    them (one fill kernel each per backward) nor passes any: the backward gets None for them
    (it runs only when the op's result received a gradient)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)
