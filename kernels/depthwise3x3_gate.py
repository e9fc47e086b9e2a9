"""The feed-forward's depthwise 3x3 convolution and gate in one pass, for inference (Triton).

    hidden = depthwise3x3(x) + bias            x: (B, 2h, H, W), halves (x1, x2)
    out    = gelu(hidden1) * hidden2            (GDFN)
           + gelu(hidden2) * hidden1            (and this too: the DualGate FFN)

out is (B, h, H, W). Unfused, the depthwise output (2h channels) is written and read back by
the gate; here a program convolves the tile of channel c and of channel c + h and gates
them in registers: one read of x (the nine taps from cache) and one write of h channels, a
third of the unfused traffic at the GDFN's 510 hidden channels. Forward only: training keeps
the separate ops, whose backward needs the depthwise output anyway.

Tiles, strides and arithmetic as in depthwise3x3.py (any strided x, contiguous output,
float32 arithmetic, float64 for float64 inputs); gelu as in gated_gelu.py (exact, erf).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .depthwise3x3 import _convolved, _store_tile, _tile, compute_dtype, grid, launch_config, wide_offsets
from .gated_gelu import _gelu

__all__ = ["depthwise3x3_gate"]


@triton.jit
def _gated(image, w_ptr, b_ptr, channel, paired, plane_mask, rows, cols, height, width, sx_c, sx_h, sx_w,
           HAS_BIAS: tl.constexpr, DUAL: tl.constexpr, MASKED: tl.constexpr, COMPUTE: tl.constexpr,
           WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    h1 = _convolved(image + channel * sx_c, w_ptr, b_ptr, channel, plane_mask, rows, cols, height, width,
                    sx_h, sx_w, HAS_BIAS, False, MASKED, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    h2 = _convolved(image + paired * sx_c, w_ptr, b_ptr, paired, plane_mask, rows, cols, height, width,
                    sx_h, sx_w, HAS_BIAS, False, MASKED, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    out = _gelu(h1) * h2
    if DUAL:
        out += _gelu(h2) * h1
    return out


@triton.jit
def depthwise3x3_gate_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, planes, half, height, width,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h,
    HAS_BIAS: tl.constexpr, DUAL: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # planes are the (b, c) of the output; channel c of x's first half pairs with c + half.
    _, batch, channel, plane_mask, rows, cols, inside = _tile(planes, half, height, width, BLOCK_C, BLOCK_H, BLOCK_W)
    image = x_ptr + batch * sx_b
    paired = channel + half  # int64, like channel: (c + h) * stride passes 2**31 on large maps
    if inside:
        out = _gated(image, w_ptr, b_ptr, channel, paired, plane_mask, rows, cols, height, width,
                     sx_c, sx_h, sx_w, HAS_BIAS, DUAL, False, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    else:
        out = _gated(image, w_ptr, b_ptr, channel, paired, plane_mask, rows, cols, height, width,
                     sx_c, sx_h, sx_w, HAS_BIAS, DUAL, True, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    _store_tile(out_ptr, out, batch, channel, plane_mask, rows, cols, height, width, so_b, so_c, so_h)


def depthwise3x3_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dual: bool = False,
                      tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """gate(depthwise3x3(x, weight, bias)) for x (B, 2h, H, W) with any strides, weight
    (2h, 1, 3, 3) and bias (2h,) contiguous: a new contiguous (B, h, H, W) tensor of x's dtype.
    ``tile`` (BLOCK_C, BLOCK_H, BLOCK_W) overrides the tile config (tests)."""
    batch, channels, height, width = x.shape
    half = channels // 2
    out = torch.empty((batch, half, height, width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, block_h, block_w, num_warps = launch_config(x, tile)
    depthwise3x3_gate_fwd_kernel[grid(x, block_c, block_h, block_w, channels=half)](
        x, weight, bias if bias is not None else weight, out, batch * half, half, height, width,
        *x.stride(), *out.stride()[:3],
        HAS_BIAS=bias is not None, DUAL=dual, COMPUTE=compute_dtype(x, weight), WIDE=wide_offsets(x),
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    return out
