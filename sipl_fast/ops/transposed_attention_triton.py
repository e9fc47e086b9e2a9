"""The ``triton`` backend of ``ops.transposed_attention`` (Restormer's MDTA core).

Two custom ops in the ``sipl_fast`` namespace wrap the kernels of
``sipl_fast.kernels.transposed_attention`` so that torch.compile traces through them as
opaque calls with known output shapes:

- ``sipl_fast::transposed_attention_fwd(q, k, v, temperature, num_heads)
  -> (out, stats, attn)``: stats (B*heads, c*c + 2c) holds q k^T and the squared row norms
  of q and k per head, attn (B*heads, c, c) the softmax; both float32 (float64 for float64
  inputs) and tiny, saved for the backward instead of normalised copies of q and k.
- ``sipl_fast::transposed_attention_bwd(grad_out, q, k, v, temperature, stats, attn,
  num_heads) -> (dq, dk, dv, dtemperature)``.

Autograd is registered on the forward op; the backward saves q, k, v (the block holds
them anyway), stats and attn. dtemperature comes back in the temperature's own dtype.
Plain eager calls run the same launchers as an autograd.Function (sipl_fast.ops.eager).
"""
from __future__ import annotations

import torch

from ..kernels import transposed_attention as kernels
from . import torch_impl
from .eager import kernel_autograd, plain_eager

__all__ = ["transposed_attention"]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
             num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.forward(q, k, v, temperature, num_heads)


transposed_attention_fwd = torch.library.custom_op("sipl_fast::transposed_attention_fwd", mutates_args=())(_forward)


@transposed_attention_fwd.register_fake
def _(q, k, v, temperature, num_heads):
    batch, channels, h, w = q.shape
    c = channels // num_heads
    small = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty((batch, channels, h, w))
    stats = q.new_empty((batch * num_heads, kernels.stats_size(c)), dtype=small)
    attn = q.new_empty((batch * num_heads, c, c), dtype=small)
    return out, stats, attn


def _backward_launch(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     temperature: torch.Tensor, stats: torch.Tensor, attn: torch.Tensor,
                     num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.backward(grad_out, q, k, v, temperature, stats, attn, num_heads)


transposed_attention_bwd = torch.library.custom_op("sipl_fast::transposed_attention_bwd",
                                                   mutates_args=())(_backward_launch)


@transposed_attention_bwd.register_fake
def _(grad_out, q, k, v, temperature, stats, attn, num_heads):
    grads = tuple(q.new_empty(q.shape) for _ in range(3))
    return grads + (torch.empty_like(temperature, memory_format=torch.contiguous_format),)


def _save(ctx, inputs, out, state):
    q, k, v, temperature, num_heads = inputs
    ctx.save_for_backward(q, k, v, temperature, *state)  # state: stats, attn
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, launch):
    q, k, v, temperature, stats, attn = ctx.saved_tensors
    return *launch(grad_out, q, k, v, temperature, stats, attn, ctx.num_heads), None


_Eager = kernel_autograd("TransposedAttention", transposed_attention_fwd, transposed_attention_bwd, _forward,
                         _backward_launch, _save, _backward)


def transposed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                         num_heads: int) -> torch.Tensor:
    """out = softmax(temperature * q^ k^T) v per head (inputs validated by sipl_fast.ops).

    Heads wider than the kernels' limit (kernels.MAX_HEAD_CHANNELS, far above any SIPL
    width) run the pure-torch formulation instead.
    """
    if q.shape[1] // num_heads > kernels.MAX_HEAD_CHANNELS:
        return torch_impl.transposed_attention(q, k, v, temperature, num_heads)
    if plain_eager(q):
        return _Eager.apply(q, k, v, temperature, num_heads)
    return transposed_attention_fwd(q, k, v, temperature, num_heads)[0]
