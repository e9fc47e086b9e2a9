"""Depthwise 3x3 convolution (stride 1, padding 1) of NCHW maps: Triton forward and backward.

out[b, c, h, w] = bias[c] + sum_{i, j in 0..2} weight[c, i, j] * x[b, c, h + i - 1, w + j - 1]
(x zero outside the map). Every projection of SIPL-PromptIR ends in one (qkv, kv, q and the
feed-forward's hidden map); on an H200 ATen's NCHW depthwise kernels moved 0.4-0.8 TB/s of
a 4.2 TB/s card and took a third of the GPU time of a training step and of a refinement
(bench/results/h200_2026-11-27_session2.md), so each pass here is one streaming read and
one write, the nine taps coming from cache.

- forward: a program computes a BLOCK_H x BLOCK_W tile of BLOCK_C consecutive (b, c) planes
  (several only where planes are small, e.g. the 16 x 16 latent level of a training crop)
  from nine shifted, masked loads of x (the zero padding is the mask).
- input gradient: the same kernel on dout with the taps mirrored (FLIP): the transpose of a
  stride-1, padding-1 3x3 correlation is the correlation with the kernel rotated by 180 degrees.
- weight and bias gradients: a program reduces each plane's tile to ten numbers (nine tap
  sums dout * shifted x, and sum dout); the (plane, tile) partials are summed by torch in a
  fixed order, so the result is identical run to run (no atomics).

x may be any strided 4-D view (a strip x[..., lo:hi, :] is read in place); outputs are
contiguous NCHW. Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["depthwise3x3", "depthwise3x3_weight_grad", "tile_config", "launch_config", "grid", "compute_dtype",
           "wide_offsets"]

# Read once, like triton itself: TRITON_INTERPRET must be set before this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile(planes, channels, height, width, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's BLOCK_C planes (flat b * C + c, int64), then their batch and channel
    indices and mask and the rows and columns of its tile, shaped to broadcast over (C, H, W),
    and whether the tile's one-pixel halo lies inside the map and all its planes exist."""
    first_plane = tl.program_id(0).to(tl.int64) * BLOCK_C
    plane = first_plane + tl.arange(0, BLOCK_C)
    plane_mask = plane < planes
    tiles_w = tl.cdiv(width, BLOCK_W)
    first_row = (tl.program_id(1) // tiles_w) * BLOCK_H
    first_col = (tl.program_id(1) % tiles_w) * BLOCK_W
    rows = first_row + tl.arange(0, BLOCK_H)
    cols = first_col + tl.arange(0, BLOCK_W)
    inside = ((first_plane + BLOCK_C <= planes) & (first_row >= 1) & (first_row + BLOCK_H < height)
              & (first_col >= 1) & (first_col + BLOCK_W < width))
    batch = (plane // channels)[:, None, None]
    channel = (plane % channels)[:, None, None]
    return plane, batch, channel, plane_mask[:, None, None], rows[None, :, None], cols[None, None, :], inside


@triton.jit
def _centre(rows, cols, stride_h, stride_w, WIDE: tl.constexpr):
    """Offsets of the tile's pixels within a plane; int32 unless a plane spans 2**31 elements."""
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return rows * stride_h + cols * stride_w


# Tiles whose one-pixel halo lies inside the map (half the tiles of a 512-wide map's rows)
# load their taps without masks, each at the tile's pointers plus one scalar offset; edge
# tiles mask each tap and index it on its own. Compiled for sm_90 with the 512x512 tiles
# (bench/sass_counts.py), the interior path issues 29 % (convolution) and 30 % (convolution +
# gate) fewer instructions per output than the masked one; registers per thread: forward 96
# (107 with masks everywhere), gate 168 (135: still 3 programs per SM), weight gradient 72 (56).
# Not yet timed on a GPU.
@triton.jit
def _shifted(x_planes, centre, plane_mask, rows, cols, height, width, stride_h, stride_w,
             di: tl.constexpr, dj: tl.constexpr, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    """The planes at x_planes (one base pointer per plane), at [rows + di, cols + dj], 0 outside
    them; unmasked, ``centre`` holds the tile's pointers (x_planes + its offsets)."""
    if MASKED:
        r = rows + di
        c = cols + dj
        mask = plane_mask & (r >= 0) & (r < height) & (c >= 0) & (c < width)
        values = tl.load(x_planes + r.to(tl.int64) * stride_h + c.to(tl.int64) * stride_w, mask=mask, other=0.0)
    else:
        values = tl.load(centre + (di * stride_h + dj * stride_w))
    return values.to(COMPUTE)


@triton.jit
def _convolved(x_planes, w_ptr, b_ptr, channel, plane_mask, rows, cols, height, width, stride_h, stride_w,
               HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, MASKED: tl.constexpr, COMPUTE: tl.constexpr,
               WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The depthwise 3x3 convolution of the planes at x_planes (channel: their weights' rows)
    over the tile, as a (BLOCK_C, BLOCK_H, BLOCK_W) block of COMPUTE."""
    centre = x_planes if MASKED else x_planes + _centre(rows, cols, stride_h, stride_w, WIDE)
    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=COMPUTE)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            tap = (8 - (3 * i + j)) if FLIP else (3 * i + j)
            weight = tl.load(w_ptr + channel * 9 + tap, mask=plane_mask, other=0.0).to(COMPUTE)
            acc += weight * _shifted(x_planes, centre, plane_mask, rows, cols, height, width, stride_h, stride_w,
                                     i - 1, j - 1, MASKED, COMPUTE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=plane_mask, other=0.0).to(COMPUTE)
    return acc


@triton.jit
def depthwise3x3_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, planes, channels, height, width,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h,
    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    _, batch, channel, plane_mask, rows, cols, inside = _tile(planes, channels, height, width,
                                                              BLOCK_C, BLOCK_H, BLOCK_W)
    x_planes = x_ptr + batch * sx_b + channel * sx_c
    if inside:
        acc = _convolved(x_planes, w_ptr, b_ptr, channel, plane_mask, rows, cols, height, width, sx_h, sx_w,
                         HAS_BIAS, FLIP, False, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    else:
        acc = _convolved(x_planes, w_ptr, b_ptr, channel, plane_mask, rows, cols, height, width, sx_h, sx_w,
                         HAS_BIAS, FLIP, True, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    _store_tile(out_ptr, acc, batch, channel, plane_mask, rows, cols, height, width, so_b, so_c, so_h)


@triton.jit
def _store_tile(out_ptr, value, batch, channel, plane_mask, rows, cols, height, width, so_b, so_c, so_h):
    """value, the tile of the planes (batch, channel), into out (unit column stride), masked to the map."""
    mask = plane_mask & (rows < height) & (cols < width)
    tl.store(out_ptr + batch * so_b + channel * so_c + rows.to(tl.int64) * so_h + cols,
             value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap_sums(x_planes, dout, slots, slot_mask, plane_mask, rows, cols, height, width, sx_h, sx_w,
              MASKED: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr):
    """The tile's nine tap sums dout * shifted x, per plane, into slots 0..8."""
    x_centre = x_planes if MASKED else x_planes + _centre(rows, cols, sx_h, sx_w, WIDE)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            tap = _shifted(x_planes, x_centre, plane_mask, rows, cols, height, width, sx_h, sx_w, i - 1, j - 1,
                           MASKED, COMPUTE)
            tl.store(slots + 3 * i + j, tl.sum(tl.sum(dout * tap, axis=2), axis=1), mask=slot_mask)


@triton.jit
def depthwise3x3_wgrad_kernel(
    x_ptr, dout_ptr, partial_ptr, planes, batches, channels, height, width,
    sx_b, sx_c, sx_h, sx_w, sd_b, sd_c, sd_h, sd_w,
    COMPUTE: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """partial[channel, batch * tiles + tile, 0..9]: per plane, the tile's nine tap sums and sum(dout)."""
    plane, batch, channel, plane_mask, rows, cols, inside = _tile(planes, channels, height, width,
                                                                  BLOCK_C, BLOCK_H, BLOCK_W)
    dout_planes = dout_ptr + batch * sd_b + channel * sd_c
    dout = _shifted(dout_planes, dout_planes, plane_mask, rows, cols, height, width, sd_h, sd_w, 0, 0, True, COMPUTE)
    x_planes = x_ptr + batch * sx_b + channel * sx_c
    slots = partial_ptr + (((plane % channels) * batches + plane // channels) * tl.num_programs(1)
                           + tl.program_id(1)) * 10  # (BLOCK_C,): one slot per plane
    slot_mask = plane < planes
    if inside:
        _tap_sums(x_planes, dout, slots, slot_mask, plane_mask, rows, cols, height, width, sx_h, sx_w,
                  False, COMPUTE, WIDE)
    else:
        _tap_sums(x_planes, dout, slots, slot_mask, plane_mask, rows, cols, height, width, sx_h, sx_w,
                  True, COMPUTE, WIDE)
    tl.store(slots + 9, tl.sum(tl.sum(dout, axis=2), axis=1), mask=slot_mask)


# Outputs per program: on a GPU 2048 (16 per thread of 4 warps); the interpreter runs one
# program at a time, vectorised over its block, so it takes far larger blocks.
_BLOCK_ELEMENTS = 16384 if _INTERPRET else 2048


def tile_config(height: int, width: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) for planes of this size: rows of up to 128 columns
    (coalesced 256-512 byte row segments; 32 in the interpreter, so tests span several tiles),
    as many rows as fit, and several planes per program where a plane is smaller than that."""
    block_w = min(32 if _INTERPRET else 128, max(16, triton.next_power_of_2(width)))
    block_h = min(triton.next_power_of_2(height), 16 if _INTERPRET else _BLOCK_ELEMENTS // block_w)
    return max(1, _BLOCK_ELEMENTS // (block_h * block_w)), block_h, block_w, 1 if _INTERPRET else 4


def launch_config(x: torch.Tensor, tile: tuple[int, int, int] | None) -> tuple[int, int, int, int]:
    block_c, block_h, block_w, num_warps = tile_config(*x.shape[-2:])
    return (*tile, num_warps) if tile else (block_c, block_h, block_w, num_warps)


def compute_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def wide_offsets(*maps: torch.Tensor) -> bool:
    """Whether an offset within a plane of these maps (halo included) may not fit in int32."""
    return any((t.shape[-2] + 1) * t.stride(-2) + (t.shape[-1] + 1) * t.stride(-1) >= 2**31 for t in maps)


def grid(x: torch.Tensor, block_c: int, block_h: int, block_w: int, channels: int | None = None) -> tuple[int, int]:
    """Programs for x's planes (``channels`` per image where fewer than x's) in tiles."""
    batch, x_channels, height, width = x.shape
    channels = x_channels if channels is None else channels
    tiles = triton.cdiv(height, block_h) * triton.cdiv(width, block_w)
    if tiles > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"depthwise3x3: a {height}x{width} plane needs {tiles} tiles (> 65535); "
                         "split the map into strips")
    return triton.cdiv(batch * channels, block_c), tiles


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 flip: bool = False, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The depthwise 3x3 convolution of x (B, C, H, W) with weight (C, 1, 3, 3) (contiguous) and
    an optional bias (C,), as a new contiguous tensor of x's dtype; ``flip`` mirrors the taps
    (the input gradient: depthwise3x3(dout, weight, flip=True)); ``tile`` (BLOCK_C, BLOCK_H,
    BLOCK_W) overrides tile_config (tests)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, block_h, block_w, num_warps = launch_config(x, tile)
    batch, channels, height, width = x.shape
    depthwise3x3_fwd_kernel[grid(x, block_c, block_h, block_w)](
        x, weight, bias if bias is not None else weight, out, batch * channels, channels, height, width,
        *x.stride(), *out.stride()[:3],
        HAS_BIAS=bias is not None, FLIP=flip, COMPUTE=compute_dtype(x, weight), WIDE=wide_offsets(x),
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    return out


def depthwise3x3_weight_grad(dout: torch.Tensor, x: torch.Tensor,
                             tile: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight (C, 1, 3, 3), dbias (C,)) in float32 (float64 for float64 inputs), from the
    output gradient dout and the input x, both (B, C, H, W) with any strides."""
    channels = x.shape[1]
    accumulate = torch.float64 if torch.float64 in (x.dtype, dout.dtype) else torch.float32
    if x.numel() == 0:
        return x.new_zeros((channels, 1, 3, 3), dtype=accumulate), x.new_zeros(channels, dtype=accumulate)
    block_c, block_h, block_w, num_warps = launch_config(x, tile)
    batch, _, height, width = x.shape
    programs = grid(x, block_c, block_h, block_w)
    partial = torch.empty((channels, batch * programs[1], 10), dtype=accumulate, device=x.device)
    depthwise3x3_wgrad_kernel[programs](
        x, dout, partial, batch * channels, batch, channels, height, width, *x.stride(), *dout.stride(),
        COMPUTE=compute_dtype(x, dout), WIDE=wide_offsets(x, dout),
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    sums = partial.sum(1)
    own = dict(memory_format=torch.contiguous_format)  # two separate tensors, not views of sums
    return sums[:, :9].reshape(channels, 1, 3, 3).clone(**own), sums[:, 9].clone(**own)
