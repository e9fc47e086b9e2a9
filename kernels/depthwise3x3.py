"""Depthwise 3x3 convolution (stride 1, padding 1) of NCHW maps: Triton forward and backward.

out[b, c, h, w] = bias[c] + sum_{i, j in 0..2} weight[c, i, j] * x[b, c, h + i - 1, w + j - 1]
(x zero outside the map). Every projection of SIPL-PromptIR ends in one (qkv, kv, q and the
feed-forward's hidden map). Each pass here is one streaming read and one write, the nine taps
coming from registers and cache (see docs/design.md, section "Depthwise convolutions").

- forward: a program streams down BLOCK_R rows of a BLOCK_W-column strip of BLOCK_C
  consecutive (b, c) planes (several only where planes are narrow), keeping three input rows
  in registers: each step loads the next row once at columns c - 1, c and c + 1 (the zero
  padding is the mask) and writes one output row: three loads per output instead of nine.
  With GATE the same loop convolves channel c and c + h and writes their gate
  (depthwise3x3_gate.py).
- input gradient: the same kernel on dout with the taps mirrored (FLIP): the transpose of a
  stride-1, padding-1 3x3 correlation is the correlation with the kernel rotated by 180 degrees.
- weight and bias gradients: a program streams its rows the same way, accumulating per
  column the nine tap products dout * shifted x and dout itself, and reduces them to ten
  numbers per plane at the end; the (plane, program) partials are summed by torch in a fixed
  order, so the result is identical run to run (no atomics).

x may be any strided 4-D view (a strip x[..., lo:hi, :] is read in place); outputs are
contiguous NCHW. Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, compute_dtype
from .gated_gelu import _gelu

__all__ = ["depthwise3x3", "depthwise3x3_weight_grad", "convolve_rows", "stream_config", "launch_config", "grid",
           "wide_offsets"]

_UNROLL = tl.constexpr(3)  # the row loops' unroll factor (see _ROWS)


# Row streaming: a program keeps three input rows in registers and loads each new row once per
# column shift (three loads per output instead of nine). The shifted taps at c - 1 and c + 1
# are not 16-byte aligned, so loading all nine taps per output costs scalar loads that span
# several cache lines each (see docs/design.md, section "Depthwise convolutions").
@triton.jit
def _row(planes, row, height, stride_h, stride_w, mask_l, mask_c, mask_r, COMPUTE: tl.constexpr,
         WIDE: tl.constexpr):
    """Row ``row`` of the planes (``planes``: pointers to their row 0 at this program's
    columns) at columns c - 1, c and c + 1, as COMPUTE; zeros outside the map."""
    if (row >= 0) & (row < height):
        at = planes + _offsets(row, stride_h, WIDE)
        left = tl.load(at - stride_w, mask=mask_l, other=0.0).to(COMPUTE)
        centre = tl.load(at, mask=mask_c, other=0.0).to(COMPUTE)
        right = tl.load(at + stride_w, mask=mask_r, other=0.0).to(COMPUTE)
    else:
        left = tl.zeros(mask_c.shape, COMPUTE)
        centre = tl.zeros(mask_c.shape, COMPUTE)
        right = tl.zeros(mask_c.shape, COMPUTE)
    return left, centre, right


@triton.jit
def _taps(w_ptr, channel, plane_mask, FLIP: tl.constexpr, COMPUTE: tl.constexpr):
    """The planes' nine 3x3 weights in row-major order (rotated by 180 degrees with FLIP),
    each (BLOCK_C, 1) COMPUTE."""
    base = w_ptr + channel * 9
    t0 = tl.load(base + (8 if FLIP else 0), mask=plane_mask, other=0.0).to(COMPUTE)
    t1 = tl.load(base + (7 if FLIP else 1), mask=plane_mask, other=0.0).to(COMPUTE)
    t2 = tl.load(base + (6 if FLIP else 2), mask=plane_mask, other=0.0).to(COMPUTE)
    t3 = tl.load(base + (5 if FLIP else 3), mask=plane_mask, other=0.0).to(COMPUTE)
    t4 = tl.load(base + 4, mask=plane_mask, other=0.0).to(COMPUTE)
    t5 = tl.load(base + (3 if FLIP else 5), mask=plane_mask, other=0.0).to(COMPUTE)
    t6 = tl.load(base + (2 if FLIP else 6), mask=plane_mask, other=0.0).to(COMPUTE)
    t7 = tl.load(base + (1 if FLIP else 7), mask=plane_mask, other=0.0).to(COMPUTE)
    t8 = tl.load(base + (0 if FLIP else 8), mask=plane_mask, other=0.0).to(COMPUTE)
    return t0, t1, t2, t3, t4, t5, t6, t7, t8


@triton.jit
def _bias(b_ptr, channel, plane_mask, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    if HAS_BIAS:
        return tl.load(b_ptr + channel, mask=plane_mask, other=0.0).to(COMPUTE)
    return tl.zeros(channel.shape, COMPUTE)


@triton.jit
def _convolved_row(above_l, above_c, above_r, here_l, here_c, here_r, below_l, below_c, below_r,
                   t0, t1, t2, t3, t4, t5, t6, t7, t8, bias):
    return (bias + t0 * above_l + t1 * above_c + t2 * above_r + t3 * here_l + t4 * here_c + t5 * here_r
            + t6 * below_l + t7 * below_c + t8 * below_r)


@triton.jit
def _strip(planes, channels, width, sx_w, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_W: tl.constexpr):
    """This program's BLOCK_C planes (flat b * C + c, int64, (BLOCK_C,)), their batch and channel
    indices and mask ((BLOCK_C, 1)), its columns (1, BLOCK_W) and their offsets in x, the masks
    of columns c - 1, c and c + 1 inside the map ((BLOCK_C, BLOCK_W), planes included) and its
    first row."""
    first_plane = tl.program_id(0).to(tl.int64) * BLOCK_C
    flat = first_plane + tl.arange(0, BLOCK_C)
    plane = flat[:, None]
    plane_mask = plane < planes
    tiles_w = tl.cdiv(width, BLOCK_W)
    first = (tl.program_id(1) // tiles_w) * BLOCK_R
    cols = (tl.program_id(1) % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    col_offsets = _offsets(cols, sx_w, WIDE)
    mask_l = plane_mask & (cols >= 1) & (cols <= width)
    mask_c = plane_mask & (cols < width)
    mask_r = plane_mask & (cols + 1 < width)
    return flat, plane // channels, plane % channels, plane_mask, cols, col_offsets, mask_l, mask_c, mask_r, first


@triton.jit
def _offsets(index, stride, WIDE: tl.constexpr):
    """index * stride (a row or columns), in int64 where a plane may span 2**31 elements."""
    return tl.cast(index, tl.int64) * stride if WIDE else index * stride


@triton.jit
def depthwise3x3_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, planes, channels, height, width,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h,
    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, GATE: tl.constexpr, COMPUTE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Output rows [first, first + BLOCK_R) of BLOCK_C planes (b, c) at BLOCK_W columns.

    GATE 0: out = depthwise3x3(x) (taps mirrored with FLIP). GATE 1 / 2 (the feed-forward's
    gates, x holding 2 * ``channels`` channels): with h1, h2 the convolutions of channels c
    and c + channels, out = gelu(h1) * h2, and with 2 also + gelu(h2) * h1."""
    _, batch, channel, plane_mask, cols, col_offsets, mask_l, mask_c, mask_r, first = _strip(
        planes, channels, width, sx_w, WIDE, BLOCK_C, BLOCK_R, BLOCK_W)
    image = x_ptr + batch * sx_b + col_offsets
    xa = image + channel * sx_c
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = _taps(w_ptr, channel, plane_mask, FLIP, COMPUTE)
    bias = _bias(b_ptr, channel, plane_mask, HAS_BIAS, COMPUTE)
    a_l, a_c, a_r = _row(xa, first - 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
    h_l, h_c, h_r = _row(xa, first, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
    if GATE:
        paired = channel + channels  # int64: (c + h) * stride passes 2**31 on large maps
        xb = image + paired * sx_c
        u0, u1, u2, u3, u4, u5, u6, u7, u8 = _taps(w_ptr, paired, plane_mask, False, COMPUTE)
        bias_b = _bias(b_ptr, paired, plane_mask, HAS_BIAS, COMPUTE)
        b_al, b_ac, b_ar = _row(xb, first - 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
        b_hl, b_hc, b_hr = _row(xb, first, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
    out_rows = out_ptr + batch * so_b + channel * so_c + cols
    for row in tl.range(first, tl.minimum(first + BLOCK_R, height), loop_unroll_factor=_UNROLL):
        n_l, n_c, n_r = _row(xa, row + 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
        out = _convolved_row(a_l, a_c, a_r, h_l, h_c, h_r, n_l, n_c, n_r, t0, t1, t2, t3, t4, t5, t6, t7, t8, bias)
        a_l, a_c, a_r = h_l, h_c, h_r
        h_l, h_c, h_r = n_l, n_c, n_r
        if GATE:
            b_nl, b_nc, b_nr = _row(xb, row + 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
            other = _convolved_row(b_al, b_ac, b_ar, b_hl, b_hc, b_hr, b_nl, b_nc, b_nr,
                                   u0, u1, u2, u3, u4, u5, u6, u7, u8, bias_b)
            b_al, b_ac, b_ar = b_hl, b_hc, b_hr
            b_hl, b_hc, b_hr = b_nl, b_nc, b_nr
            gated = _gelu(out) * other
            if GATE == 2:
                gated += _gelu(other) * out
            out = gated
        tl.store(out_rows + _offsets(row, so_h, WIDE), out.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def depthwise3x3_wgrad_kernel(
    x_ptr, dout_ptr, partial_ptr, planes, batches, channels, height, width,
    sx_b, sx_c, sx_h, sx_w, sd_b, sd_c, sd_h, sd_w,
    COMPUTE: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """partial[channel, batch * programs + program, 0..9]: per plane, the nine tap sums
    sum dout[r, c] * x[r + i - 1, c + j - 1] (slot 3i + j) and sum dout over the program's rows
    and columns. Rows stream as in the forward; the sums stay per column until the end."""
    flat, batch, channel, plane_mask, cols, col_offsets, mask_l, mask_c, mask_r, first = _strip(
        planes, channels, width, sx_w, WIDE, BLOCK_C, BLOCK_R, BLOCK_W)
    xa = x_ptr + batch * sx_b + channel * sx_c + col_offsets
    grads = dout_ptr + batch * sd_b + channel * sd_c + _offsets(cols, sd_w, WIDE)
    a_l, a_c, a_r = _row(xa, first - 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
    h_l, h_c, h_r = _row(xa, first, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
    s0 = tl.zeros(mask_c.shape, COMPUTE)
    s1 = tl.zeros(mask_c.shape, COMPUTE)
    s2 = tl.zeros(mask_c.shape, COMPUTE)
    s3 = tl.zeros(mask_c.shape, COMPUTE)
    s4 = tl.zeros(mask_c.shape, COMPUTE)
    s5 = tl.zeros(mask_c.shape, COMPUTE)
    s6 = tl.zeros(mask_c.shape, COMPUTE)
    s7 = tl.zeros(mask_c.shape, COMPUTE)
    s8 = tl.zeros(mask_c.shape, COMPUTE)
    s9 = tl.zeros(mask_c.shape, COMPUTE)
    for row in tl.range(first, tl.minimum(first + BLOCK_R, height), loop_unroll_factor=_UNROLL):
        n_l, n_c, n_r = _row(xa, row + 1, height, sx_h, sx_w, mask_l, mask_c, mask_r, COMPUTE, WIDE)
        g = tl.load(grads + _offsets(row, sd_h, WIDE), mask=mask_c, other=0.0).to(COMPUTE)
        s0 += g * a_l
        s1 += g * a_c
        s2 += g * a_r
        s3 += g * h_l
        s4 += g * h_c
        s5 += g * h_r
        s6 += g * n_l
        s7 += g * n_c
        s8 += g * n_r
        s9 += g
        a_l, a_c, a_r = h_l, h_c, h_r
        h_l, h_c, h_r = n_l, n_c, n_r
    slots = partial_ptr + (((flat % channels) * batches + flat // channels) * tl.num_programs(1)
                           + tl.program_id(1)) * 10  # (BLOCK_C,): one slot per plane
    slot_mask = flat < planes
    tl.store(slots + 0, tl.sum(s0, axis=1), mask=slot_mask)
    tl.store(slots + 1, tl.sum(s1, axis=1), mask=slot_mask)
    tl.store(slots + 2, tl.sum(s2, axis=1), mask=slot_mask)
    tl.store(slots + 3, tl.sum(s3, axis=1), mask=slot_mask)
    tl.store(slots + 4, tl.sum(s4, axis=1), mask=slot_mask)
    tl.store(slots + 5, tl.sum(s5, axis=1), mask=slot_mask)
    tl.store(slots + 6, tl.sum(s6, axis=1), mask=slot_mask)
    tl.store(slots + 7, tl.sum(s7, axis=1), mask=slot_mask)
    tl.store(slots + 8, tl.sum(s8, axis=1), mask=slot_mask)
    tl.store(slots + 9, tl.sum(s9, axis=1), mask=slot_mask)


# Rows stream in steps of 512 outputs per program on a GPU (4 per thread of 4 warps: one
# 16-byte load per thread and column shift), 18 rows per program: two halo rows per 18, and a
# multiple of the loop's unroll factor 3, whose unrolled body rotates the three rows by
# renaming registers instead of copying them (docs/design.md, "Depthwise convolutions").
# The interpreter runs one program at a time, vectorised over its block: wider steps, and 8
# rows so that tests span several programs.
_STEP_ELEMENTS = 1024 if INTERPRET else 512
_ROWS = 8 if INTERPRET else 18


def stream_config(height: int, width: int, widest: int | None = None, rows: int | None = None,
                  warps: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_R, BLOCK_W, num_warps) of the row-streaming kernels for planes of this
    size: strips of up to ``widest`` columns (512; 32 in the interpreter, so tests span
    several), ``rows`` rows (_ROWS), and several planes per program where a row is narrower
    than a step; bench/depthwise_sweep.py passes other strips, rows and warps."""
    widest = widest or (32 if INTERPRET else 512)
    block_w = min(widest, max(16, triton.next_power_of_2(width)))
    rows = min(rows or _ROWS, height)
    return max(1, _STEP_ELEMENTS // block_w), rows, block_w, warps or (1 if INTERPRET else 4)


def launch_config(x: torch.Tensor, tile: tuple[int, ...] | None) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_R, BLOCK_W, num_warps): stream_config's for x's planes, or ``tile``'s
    three blocks, optionally with the warps (tests, bench/depthwise_sweep.py)."""
    block_c, rows, block_w, num_warps = stream_config(*x.shape[-2:])
    if not tile:
        return block_c, rows, block_w, num_warps
    return (*tile[:3], tile[3] if len(tile) > 3 else num_warps)


def wide_offsets(*maps: torch.Tensor) -> bool:
    """Whether an offset within a plane of these maps (halo included) may not fit in int32."""
    return any((t.shape[-2] + 1) * t.stride(-2) + (t.shape[-1] + 1) * t.stride(-1) >= 2**31 for t in maps)


def grid(x: torch.Tensor, block_c: int, block_h: int, block_w: int) -> tuple[int, int]:
    """Programs for x's planes in tiles of block_h rows and block_w columns."""
    batch, channels, height, width = x.shape
    tiles = triton.cdiv(height, block_h) * triton.cdiv(width, block_w)
    if tiles > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"depthwise3x3: a {height}x{width} plane needs {tiles} tiles (> 65535); "
                         "split the map into strips")
    return triton.cdiv(batch * channels, block_c), tiles


def convolve_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                  flip: bool = False, gate: int = 0, tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """Launches depthwise3x3_fwd_kernel over out's planes (see it for ``gate``) and returns out."""
    if out.numel() == 0:
        return out
    block_c, block_r, block_w, num_warps = launch_config(x, tile)
    batch, channels, height, width = out.shape
    depthwise3x3_fwd_kernel[grid(out, block_c, block_r, block_w)](
        x, weight, bias if bias is not None else weight, out, batch * channels, channels, height, width,
        *x.stride(), *out.stride()[:3],
        HAS_BIAS=bias is not None, FLIP=flip, GATE=gate, COMPUTE=compute_dtype(x, weight), WIDE=wide_offsets(x, out),
        BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=num_warps,
    )
    return out


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 flip: bool = False, tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """The depthwise 3x3 convolution of x (B, C, H, W) with weight (C, 1, 3, 3) (contiguous) and
    an optional bias (C,), as a new contiguous tensor of x's dtype; ``flip`` mirrors the taps
    (the input gradient: depthwise3x3(dout, weight, flip=True)); ``tile`` (BLOCK_C, BLOCK_R,
    BLOCK_W[, num_warps]) overrides stream_config (tests)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return convolve_rows(x, weight, bias, out, flip=flip, tile=tile)


def depthwise3x3_weight_grad(dout: torch.Tensor, x: torch.Tensor,
                             tile: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight (C, 1, 3, 3), dbias (C,)) in float32 (float64 for float64 inputs), from the
    output gradient dout and the input x, both (B, C, H, W) with any strides; ``tile`` as in
    depthwise3x3."""
    channels = x.shape[1]
    accumulate = torch.float64 if torch.float64 in (x.dtype, dout.dtype) else torch.float32
    if x.numel() == 0:
        return x.new_zeros((channels, 1, 3, 3), dtype=accumulate), x.new_zeros(channels, dtype=accumulate)
    block_c, block_r, block_w, num_warps = launch_config(x, tile)
    batch, _, height, width = x.shape
    programs = grid(x, block_c, block_r, block_w)
    partial = torch.empty((channels, batch * programs[1], 10), dtype=accumulate, device=x.device)
    depthwise3x3_wgrad_kernel[programs](
        x, dout, partial, batch * channels, batch, channels, height, width, *x.stride(), *dout.stride(),
        COMPUTE=compute_dtype(x, dout), WIDE=wide_offsets(x, dout),
        BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=num_warps,
    )
    sums = partial.sum(1)
    own = dict(memory_format=torch.contiguous_format)  # two separate tensors, not views of sums
    return sums[:, :9].reshape(channels, 1, 3, 3).clone(**own), sums[:, 9].clone(**own)
