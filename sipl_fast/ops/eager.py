"""Plain eager calls of the kernel ops, without the torch.library dispatch.

Each op with a backward is a pair of torch.library custom ops (what torch.compile, export and
fake tensors see) and the same launchers as a torch.autograd.Function, which plain eager calls
run. A custom op's Python dispatch (its autograd kernel, redispatch, argument checks) is host
time that small eager calls wait for; the Function route skips it (measured in docs/design.md,
section "Eager calls and custom ops").
"""
from __future__ import annotations

import functools
import re

import torch
from torch._C import _functions

__all__ = ["kernel_autograd", "plain_eager", "mark_saved_state", "first_order_only"]


def first_order_only(op: str):
    """Decorates a backward that is not itself differentiable (kernel launches, or a fused
    backward under no_grad). Under create_graph=True its gradients are correct first
    derivatives, and differentiating them again raises one error naming ``op`` instead of
    silently dropping the second-order terms. (torch's once_differentiable raises only when
    the incoming gradient requires grad: for loss = out.sum() it does not, and a gradient
    penalty through the op would lose its terms without a word.)"""
    message = (f"{op}: its backward is first-order only, so gradients taken with "
               "create_graph=True cannot be differentiated again; run the model under "
               "sipl_fast.use_backend('reference') for higher derivatives").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if not torch.is_grad_enabled():  # create_graph=False: the common case
                return backward(ctx, *grads)
            with torch.no_grad():
                results = list(backward(ctx, *grads))  # (a backward here returns a tuple)
            computed = [i for i, g in enumerate(results) if g is not None]
            guarded = _functions.DelayedError(message, len(computed))(
                *[results[i].detach().requires_grad_() for i in computed])
            for i, g in zip(computed, guarded if isinstance(guarded, tuple) else (guarded,)):
                results[i] = g
            return tuple(results)
        return run
    return decorate


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
    op = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()  # ProxyAttention -> proxy_attention

    def setup_context(ctx, inputs, output):
        out, state = _output_and_state(output)
        save(ctx, inputs, out, state)
        if state:
            mark_saved_state(ctx, *state)

    @first_order_only(op)
    def op_backward(ctx, grad_out, *_state_grads):
        return backward(ctx, grad_out, backward_op)

    forward_op.register_autograd(op_backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        out, state = _output_and_state(forward_launch(*inputs))
        save(ctx, inputs, out, state)
        return out

    @first_order_only(op)
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
