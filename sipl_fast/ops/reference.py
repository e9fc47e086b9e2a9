"""The ``reference`` backend: the authors' eager attention math, written out plainly.

Both attention matrices are materialised, q and k are normalised into new tensors and the
batch-1 dictionary is expanded, exactly as the authors' modules compute them. Every other
backend is tested against these functions evaluated in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# F.normalize divides by max(|x|, eps) with this eps (its default); the torch formulation and
# the kernels clamp their norms with it too.
NORMALIZE_EPS = 1e-12


def _heads_tokens_last(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, H*W, C/heads): tokens are pixels."""
    b, c, h, w = x.shape
    return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2)


def proxy_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    batch = max(q.shape[0], k.shape[0])
    _, c, hq, wq = q.shape
    q = _heads_tokens_last(q.expand(batch, -1, -1, -1), num_heads)
    k = _heads_tokens_last(k.expand(batch, -1, -1, -1), num_heads)
    v = _heads_tokens_last(v.expand(batch, -1, -1, -1), num_heads)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature.reshape(num_heads, 1, 1)
    attn = attn.softmax(dim=-1)
    out = attn @ v
    return out.transpose(-1, -2).reshape(batch, c, hq, wq)


def transposed_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    b, c, h, w = q.shape
    q = q.reshape(b, num_heads, c // num_heads, h * w)
    k = k.reshape(b, num_heads, c // num_heads, h * w)
    v = v.reshape(b, num_heads, c // num_heads, h * w)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature.reshape(num_heads, 1, 1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def layer_norm2d(x, weight, bias, eps: float) -> torch.Tensor:
    if bias is None:  # BiasFree: the authors normalise token-major (b, hw, c) without centring
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        sigma = tokens.var(-1, keepdim=True, unbiased=False)
        tokens = tokens / torch.sqrt(sigma + eps) * weight
        return tokens.transpose(1, 2).reshape(b, c, h, w)
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    return weight.view(1, -1, 1, 1) * y + bias.view(1, -1, 1, 1)


def gated_gelu(x, dual: bool) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=1)
    if dual:
        return F.gelu(x2) * x1 + F.gelu(x1) * x2
    return F.gelu(x1) * x2


def pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias) -> torch.Tensor:
    hidden = F.conv2d(x, pointwise, pointwise_bias)
    return F.conv2d(hidden, depthwise, depthwise_bias, padding=1, groups=depthwise.shape[0])


def pointwise_depthwise_gate(x, pointwise, pointwise_bias, depthwise, depthwise_bias, dual: bool) -> torch.Tensor:
    return gated_gelu(pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias), dual)
