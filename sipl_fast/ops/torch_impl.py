"""The ``torch`` backend: the fastest pure-PyTorch formulation of both attentions.

- Proxy attention: q and k are scaled by the inverse of their per-token norms (the
  temperature folded into q's scale) and handed to ``scaled_dot_product_attention`` with
  ``scale=1``, so the Nq x Nkv matrix is left to SDPA's fused kernels.
- Transposed attention: the Gram matrix q kᵀ is formed from the raw q and k and divided by
  the outer product of their norms afterwards, so no normalised copies of q and k are
  written (they are as large as the activations; the c_h x c_h matrix is tiny).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import gated_gelu  # noqa: F401  (already the plain elementwise form)

# torch.nn.functional.normalize divides by max(||x||, eps) with this eps.
NORMALIZE_EPS = 1e-12


def inverse_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1 / max(||x||, eps) along ``dim`` (kept), the divisor of F.normalize."""
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(NORMALIZE_EPS).reciprocal()


def _token_major(x: torch.Tensor, batch: int, num_heads: int) -> torch.Tensor:
    """(B or 1, C, H, W) -> (batch, heads, H*W, C/heads) view; a batch-1 side is broadcast, not copied."""
    b, c, h, w = x.shape
    return x.expand(batch, c, h, w).reshape(batch, num_heads, c // num_heads, h * w).transpose(-1, -2)


def proxy_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    batch = max(q.shape[0], k.shape[0])
    _, c, hq, wq = q.shape
    q, k, v = (_token_major(t, batch, num_heads) for t in (q, k, v))
    q = q * (inverse_norm(q) * temperature.reshape(1, num_heads, 1, 1))
    k = k * inverse_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return out.transpose(-1, -2).reshape(batch, c, hq, wq)


def transposed_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    b, c, h, w = q.shape
    q = q.reshape(b, num_heads, c // num_heads, h * w)
    k = k.reshape(b, num_heads, c // num_heads, h * w)
    v = v.reshape(b, num_heads, c // num_heads, h * w)
    gram = q @ k.transpose(-2, -1)
    scale = inverse_norm(q) * inverse_norm(k).transpose(-2, -1) * temperature.reshape(1, num_heads, 1, 1)
    attn = (gram * scale).softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def layer_norm2d(x, weight, bias, eps: float) -> torch.Tensor:
    # One fused statistics pass (var_mean) and one normalising pass, NCHW kept.
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps)
    if bias is None:
        return x * scale * weight.view(1, -1, 1, 1)
    return torch.addcmul(bias.view(1, -1, 1, 1), (x - mean) * scale, weight.view(1, -1, 1, 1))
