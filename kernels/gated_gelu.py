"""The feed-forward gate on x = (B, 2h, H, W) split into channel halves (x1, x2): Triton fwd/bwd.

- GDFN (dual=False):          out = gelu(x1) * x2
- DualGate FFN (dual=True):   out = gelu(x2) * x1 + gelu(x1) * x2
gelu is the exact form x * Phi(x), Phi the standard normal CDF (via erf). out is (B, h, H, W).

Gradients, with gelu'(x) = Phi(x) + x * phi(x) (phi the normal density):
- GDFN:      dx1 = dout * x2 * gelu'(x1);              dx2 = dout * gelu(x1)
- DualGate:  dx1 = dout * (gelu(x2) + x2 * gelu'(x1));  dx2 = dout * (gelu(x1) + x1 * gelu'(x2))

Layout. Within one image the two halves are two contiguous runs of h*H*W elements, h*H*W
apart, whenever the image's (2h, H, W) block is contiguous; the batch stride is free (a
channel slice of a larger tensor works in place). So the op is a flat elementwise pass: a
program handles BLOCK consecutive elements of one image's first half and the matching
elements of its second half, with no per-plane tails for small H*W. The backward saves only
x (gelu is recomputed, cheaper than storing it). Arithmetic is float32 (float64 for float64
inputs) whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, compute_dtype

__all__ = ["gated_gelu_forward", "gated_gelu_backward", "block_config"]

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)


@triton.jit
def _gelu(x):
    return x * (0.5 + 0.5 * tl.math.erf(x * _SQRT_HALF))


@triton.jit
def _gelu_and_slope(x):
    """gelu(x) and its derivative Phi(x) + x * phi(x)."""
    cdf = 0.5 + 0.5 * tl.math.erf(x * _SQRT_HALF)
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, cdf + x * pdf


@triton.jit
def _load_halves(x_ptr, half_numel, x_stride_b, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's image, its BLOCK offsets within a half and their mask, and x1, x2 there."""
    batch = tl.program_id(1).to(tl.int64)
    # int64: one image's 2h*H*W may pass 2**31 (e.g. h = 255 at 4K).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < half_numel
    x1_ptr = x_ptr + batch * x_stride_b + offsets
    x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x1_ptr + half_numel, mask=mask, other=0.0).to(COMPUTE)
    return batch, offsets, mask, x1, x2


@triton.jit
def gated_gelu_fwd_kernel(
    x_ptr, out_ptr, half_numel, x_stride_b, out_stride_b,
    DUAL: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    batch, offsets, mask, x1, x2 = _load_halves(x_ptr, half_numel, x_stride_b, COMPUTE, BLOCK)
    out = _gelu(x1) * x2
    if DUAL:
        out += _gelu(x2) * x1
    tl.store(out_ptr + batch * out_stride_b + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_gelu_bwd_kernel(
    x_ptr, dout_ptr, dx_ptr, half_numel, x_stride_b, dout_stride_b, dx_stride_b,
    DUAL: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    batch, offsets, mask, x1, x2 = _load_halves(x_ptr, half_numel, x_stride_b, COMPUTE, BLOCK)
    dout = tl.load(dout_ptr + batch * dout_stride_b + offsets, mask=mask, other=0.0).to(COMPUTE)

    gelu1, slope1 = _gelu_and_slope(x1)
    dx1 = x2 * slope1
    dx2 = gelu1
    if DUAL:
        gelu2, slope2 = _gelu_and_slope(x2)
        dx1 += gelu2
        dx2 += x1 * slope2

    dx1_ptr = dx_ptr + batch * dx_stride_b + offsets
    tl.store(dx1_ptr, (dout * dx1).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx1_ptr + half_numel, (dout * dx2).to(dx_ptr.dtype.element_ty), mask=mask)


def block_config() -> tuple[int, int]:
    """(BLOCK, num_warps): elements per program and its warps."""
    if INTERPRET:
        return 256, 1  # a small block keeps test shapes spanning several programs
    # 1024 elements on 4 warps: 8 per thread, i.e. 16-byte vector loads for 16-bit dtypes.
    return 1024, 4


def _check_layout(*tensors: torch.Tensor) -> None:
    """Each image's (C, H, W) block must be one contiguous run; the batch stride is free."""
    for t in tensors:
        if t.numel() and not t[0].is_contiguous():
            raise ValueError("gated_gelu kernels need each image's (C, H, W) block contiguous; "
                             "call .contiguous() first")


def _grid(half_numel: int, block: int, batch: int) -> tuple[int, int]:
    if batch > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"gated_gelu kernels: batch {batch} > 65535; split the batch")
    return triton.cdiv(half_numel, block), batch


def gated_gelu_forward(x: torch.Tensor, dual: bool) -> torch.Tensor:
    """The gate of x (B, 2h, H, W) as a new contiguous (B, h, H, W) tensor of x's dtype."""
    _check_layout(x)
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels // 2, height, width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half_numel = out[0].numel()
    block, num_warps = block_config()
    grid = _grid(half_numel, block, batch)
    gated_gelu_fwd_kernel[grid](
        x, out, half_numel, x.stride(0), out.stride(0),
        DUAL=dual, COMPUTE=compute_dtype(x), BLOCK=block, num_warps=num_warps,
    )
    return out


def gated_gelu_backward(dout: torch.Tensor, x: torch.Tensor, dual: bool) -> torch.Tensor:
    """dL/dx (B, 2h, H, W), contiguous, x's dtype, from dL/dout (B, h, H, W)."""
    _check_layout(x, dout)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    half_numel = dout[0].numel()
    block, num_warps = block_config()
    grid = _grid(half_numel, block, x.shape[0])
    gated_gelu_bwd_kernel[grid](
        x, dout, dx, half_numel, x.stride(0), dout.stride(0), dx.stride(0),
        DUAL=dual, COMPUTE=compute_dtype(x, dout), BLOCK=block, num_warps=num_warps,
    )
    return dx
