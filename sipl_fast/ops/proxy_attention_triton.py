"""The ``triton`` backend of :func:`sipl_fast.ops.proxy_attention`, as torch.library custom ops.

Two ops, so that torch.compile sees opaque nodes with known output shapes (fake kernels) and
autograd sees one backward:

- ``sipl_fast::proxy_attention_fwd(q, k, v, temperature, num_heads)
  -> (out, lse, q_rnorm, k_rnorm)``: the output and what the backward needs (base-2
  logsumexp per query, inverse norms per token, all fp32 and linear in tokens).
- ``sipl_fast::proxy_attention_bwd(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
  num_heads) -> (dq, dk, dv, dtemperature)``.

The kernels are in ``sipl_fast.kernels.proxy_attention``. fp32 inputs use TF32 dots only when
``torch.backends.cuda.matmul.allow_tf32`` is True when the op runs (3xTF32 otherwise).
"""
from __future__ import annotations

import torch

from sipl_fast.kernels import proxy_attention as _kernels
from sipl_fast.ops.saved_state import mark_saved_state

__all__ = ["proxy_attention", "proxy_attention_fwd", "proxy_attention_bwd"]


def _allow_tf32(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.backends.cuda.matmul.allow_tf32


@torch.library.custom_op("sipl_fast::proxy_attention_fwd", mutates_args=())
def proxy_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                        num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.proxy_attention_forward(q, k, v, temperature, num_heads, allow_tf32=_allow_tf32(q))


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


@torch.library.custom_op("sipl_fast::proxy_attention_bwd", mutates_args=())
def proxy_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        temperature: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_rnorm: torch.Tensor,
                        k_rnorm: torch.Tensor, num_heads: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.proxy_attention_backward(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
                                             num_heads, allow_tf32=_allow_tf32(q))


@proxy_attention_bwd.register_fake
def _proxy_attention_bwd_fake(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm, num_heads):
    # Gradients are stored like their inputs (NCHW or channels-last), as the real kernels write them.
    return (_kernels.empty_in_layout_of(q, q.shape), _kernels.empty_in_layout_of(k, k.shape),
            _kernels.empty_in_layout_of(v, v.shape), temperature.new_empty(temperature.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, temperature, num_heads = inputs
    out, lse, q_rnorm, k_rnorm = output
    ctx.save_for_backward(q, k, v, temperature, out, lse, q_rnorm, k_rnorm)
    ctx.num_heads = num_heads
    # lse and the inverse norms are internal (proxy_attention returns only out)
    mark_saved_state(ctx, lse, q_rnorm, k_rnorm)


def _backward(ctx, grad_out, _grad_lse, _grad_q_rnorm, _grad_k_rnorm):
    q, k, v, temperature, out, lse, q_rnorm, k_rnorm = ctx.saved_tensors
    dq, dk, dv, dtemperature = proxy_attention_bwd(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
                                                   ctx.num_heads)
    return dq, dk, dv, dtemperature, None


proxy_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def proxy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                    num_heads: int) -> torch.Tensor:
    """Fused cosine cross-attention; arguments as :func:`sipl_fast.ops.proxy_attention` (validated there)."""
    return proxy_attention_fwd(q, k, v, temperature, num_heads)[0]
