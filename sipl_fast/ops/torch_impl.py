"""The ``torch`` backend: the fastest pure-PyTorch formulation of both attentions.

- Proxy attention: q and k are scaled by the inverse of their per-token norms (the
  temperature folded into q's scale) and handed to ``scaled_dot_product_attention`` with
  ``scale=1``, so the Nq x Nkv matrix is left to SDPA's fused kernels.
- Transposed attention: the Gram matrix q kᵀ is formed from the raw q and k and divided by
  the outer product of their norms afterwards, so no normalised copies of q and k are
  written (they are as large as the activations; the c_h x c_h matrix is tiny).
- Both read NCHW and channels-last storage through views and answer in the input's layout
  (channels-last makes oneDNN's CPU convolutions several times faster).
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


def _channels_innermost(x: torch.Tensor) -> bool:
    """Channels-last storage (or a channel slice of it): per-pixel channel vectors are contiguous."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _rows(x: torch.Tensor, num_heads: int, batch: int | None = None) -> torch.Tensor:
    """(B or 1, C, H, W) -> (batch, heads, C/heads, H*W) view of the channel rows, for NCHW or
    channels-last storage alike; a batch-1 side is broadcast (expand), never copied."""
    b, c, h, w = x.shape
    x = x.expand(batch or b, c, h, w)
    if _channels_innermost(x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], h * w, num_heads, c // num_heads).permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], num_heads, c // num_heads, h * w)


def _image(tokens: torch.Tensor, height: int, width: int, channels_last: bool) -> torch.Tensor:
    """(B, heads, N, d) token-major result -> (B, C, H, W), in the layout of the inputs."""
    b = tokens.shape[0]
    if channels_last:
        return tokens.transpose(1, 2).reshape(b, height, width, -1).permute(0, 3, 1, 2)
    return tokens.transpose(-1, -2).reshape(b, -1, height, width)


def _tokens(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, H*W, d) with unit stride over d, which SDPA's fused CPU and
    GPU kernels need (otherwise they fall back to materialising the attention matrix): a view
    for channels-last storage, one transposing copy for NCHW."""
    tokens = _rows(x, num_heads).transpose(-1, -2)
    return tokens if tokens.stride(-1) == 1 else tokens.contiguous()


def proxy_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    batch = max(q.shape[0], k.shape[0])
    height, width = q.shape[-2:]
    channels_last = _channels_innermost(q)
    q, k, v = (_tokens(t, num_heads) for t in (q, k, v))
    q = q * (inverse_norm(q) * temperature.reshape(1, num_heads, 1, 1).to(q.dtype))
    k = k * inverse_norm(k)
    # A batch-1 side is broadcast only now, after its own-size work (expand: no copy).
    q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return _image(out, height, width, channels_last)


def transposed_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    height, width = q.shape[-2:]
    channels_last = _channels_innermost(q)
    q, k, v = (_rows(t, num_heads) for t in (q, k, v))
    gram = q @ k.transpose(-2, -1)
    scale = inverse_norm(q) * inverse_norm(k).transpose(-2, -1) * temperature.reshape(1, num_heads, 1, 1)
    attn = (gram * scale).softmax(dim=-1).to(v.dtype)
    # Token-major product (v̂ Aᵀ) so that channels-last inputs give a channels-last output.
    return _image(v.transpose(-2, -1) @ attn.transpose(-2, -1), height, width, channels_last)


def layer_norm2d(x, weight, bias, eps: float) -> torch.Tensor:
    if bias is None:  # BiasFree: not centred, so not F.layer_norm; mean pass, then one product
        centred_var = (x - x.mean(1, keepdim=True)).square().mean(1, keepdim=True)
        return x * torch.rsqrt(centred_var + eps) * weight.view(1, -1, 1, 1)
    # WithBias is F.layer_norm over the channel axis of the (B, H, W, C) view: its fused kernel
    # (statistics and affine in one pass; a fused backward) runs in place on channels-last
    # storage, and costs one transposing copy each way for NCHW, which is still several times
    # faster than the separate passes of the reference formulation.
    # F.layer_norm wants one dtype; mixed inputs (bf16 activations, float32 parameters under
    # autocast) give the promoted dtype, as the reference formulation does.
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    x = x.to(dtype)
    out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight.to(dtype), bias.to(dtype), eps).permute(0, 3, 1, 2)
    return out if _channels_innermost(x) else out.contiguous()
