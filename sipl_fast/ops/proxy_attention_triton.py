"""The ``triton`` backend of :func:`sipl_fast.ops.proxy_attention`, as torch.library custom ops.

Two ops, so that torch.compile sees opaque nodes with known output shapes (fake kernels) and
autograd sees one backward:

- ``sipl_fast::proxy_attention_fwd(q, k, v, temperature, num_heads)
  -> (out, lse, q_rnorm, k_rnorm)``: the output and what the backward needs (base-2
  logsumexp per query, inverse norms per token, all fp32 and linear in tokens).
- ``sipl_fast::proxy_attention_bwd(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
  num_heads) -> (dq, dk, dv, dtemperature)``.

Plain eager calls run the same launchers as an autograd.Function (sipl_fast.ops.eager). The
kernels are in ``sipl_fast.kernels.proxy_attention``. fp32 inputs use TF32 dots only when
``torch.backends.cuda.matmul.allow_tf32`` is True when the op runs (3xTF32 otherwise).
"""
from __future__ import annotations

import torch

from sipl_fast.kernels import proxy_attention as _kernels
from sipl_fast.ops.eager import kernel_autograd, plain_eager

__all__ = ["proxy_attention", "proxy_attention_fwd", "proxy_attention_bwd"]


def _allow_tf32(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.backends.cuda.matmul.allow_tf32


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
             num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.proxy_attention_forward(q, k, v, temperature, num_heads, allow_tf32=_allow_tf32(q))


proxy_attention_fwd = torch.library.custom_op("sipl_fast::proxy_attention_fwd", mutates_args=())(_forward)


@proxy_attention_fwd.register_fake
def _proxy_attention_fwd_fake(q, k, v, temperature, num_heads):
    batch = max(q.shape[0], k.shape[0])
    _, channels, height, width = q.shape
    stats = dict(device=q.device, dtype=torch.float32)
    return (
        _kernels.empty_in_layout_of(q, (batch, channels, height, width)),
        q.new_empty((batch, num_heads, height * width), **stats),
        q.new_empty((q.shape[0], num_heads, height * width), **stats),
        q.new_empty((k.shape[0], num_heads, k.shape[2] * k.shape[3]), **stats),
    )


def _backward_launch(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     temperature: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_rnorm: torch.Tensor,
                     k_rnorm: torch.Tensor, num_heads: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.proxy_attention_backward(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
                                             num_heads, allow_tf32=_allow_tf32(q))


proxy_attention_bwd = torch.library.custom_op("sipl_fast::proxy_attention_bwd", mutates_args=())(_backward_launch)


@proxy_attention_bwd.register_fake
def _proxy_attention_bwd_fake(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm, num_heads):
    # Gradients are stored like their inputs (NCHW or channels-last), as the real kernels write them.
    return (_kernels.empty_in_layout_of(q, q.shape), _kernels.empty_in_layout_of(k, k.shape),
            _kernels.empty_in_layout_of(v, v.shape), temperature.new_empty(temperature.shape))


def _save(ctx, inputs, out, state):
    q, k, v, temperature, num_heads = inputs
    ctx.save_for_backward(q, k, v, temperature, out, *state)  # state: lse, q_rnorm, k_rnorm
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, launch):
    q, k, v, temperature, out, lse, q_rnorm, k_rnorm = ctx.saved_tensors
    return *launch(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm, ctx.num_heads), None


_Eager = kernel_autograd("ProxyAttention", proxy_attention_fwd, proxy_attention_bwd, _forward, _backward_launch,
                         _save, _backward)


def proxy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                    num_heads: int) -> torch.Tensor:
    """Fused cosine cross-attention; arguments as :func:`sipl_fast.ops.proxy_attention` (validated there)."""
    if plain_eager(q):
        return _Eager.apply(q, k, v, temperature, num_heads)
    return proxy_attention_fwd(q, k, v, temperature, num_heads)[0]
