"""Per-pixel LayerNorm over the channels of an NCHW tensor: Triton forward and backward.

Math (per pixel, over its C channels; mean and var are population statistics):
- WithBias:  y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps)
- BiasFree:  y = x * rstd * w                 (the authors centre x inside var only)

Layout. x is (B, C, H, W) and each channel plane of N = H*W pixels must be contiguous; batch
and channel strides are free (a channel slice of a larger tensor is used in place). A program
owns BLOCK_P consecutive pixels of one image and all C channels of them, held in registers as
a (BLOCK_C, BLOCK_P) tile with BLOCK_C = next power of two >= C. So x is read from memory
once, the channel reductions run in registers, and every load is a run of BLOCK_P contiguous
pixels (coalesced); with one pixel per program the loads would be strided by H*W.

The backward recomputes mean and rstd from x instead of saving them: the tile is loaded for
the gradient anyway, so it costs arithmetic only and saves a write and a read of two floats
per pixel. Gradients, with g = dy * w and xhat = (x - mean) * rstd:
- WithBias:  dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
- BiasFree:  dx = rstd * (g - xhat * mean_c(g * y0)),   y0 = x * rstd (the output before w)
- dw = sum over pixels of dy * (normalised x);  db = sum over pixels of dy.
dw and db are made deterministic: each program writes its sums over its own pixels to one row
of a (programs, C) float32 buffer, and the launcher adds the rows in a fixed order.

Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, compute_dtype

__all__ = ["layer_norm2d_forward", "layer_norm2d_backward", "tile_config"]


# (elements of one channels x pixels tile, elements per thread): many bytes in flight per
# program, while the registers (compiled for sm_90 by triton 3.6: 60-75 per thread forward,
# 64-90 backward, no spills at SIPL's widths) let three programs of 8 warps share an SM. The
# backward holds x, dy and temporaries, so its tiles are half as large.
FORWARD_TILE = (8192, 32)
BACKWARD_TILE = (4096, 16)
_MIN_BLOCK_P = 16  # 16 fp16/bf16 pixels = 32 bytes: one full memory sector per channel row
_MAX_BLOCK_P = 128


@triton.jit
def _load_tile(base_ptr, stride_c, C, N, pixel_block, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
               COMPUTE: tl.constexpr):
    """The (BLOCK_C, BLOCK_P) tile of one image at pixel block ``pixel_block``, and its mask.

    Masked lanes read as 0, which keeps the channel sums exact and the padding finite.
    """
    channels = tl.arange(0, BLOCK_C)
    pixels = pixel_block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (channels[:, None] < C) & (pixels[None, :] < N)
    offsets = channels[:, None] * stride_c + pixels[None, :]
    return tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE), mask


@triton.jit
def _store_tile(ptr, stride_b, stride_c, tile, mask, batch, pixel_block,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Writes ``tile`` at pixel block ``pixel_block`` of image ``batch``, in ptr's dtype."""
    channels = tl.arange(0, BLOCK_C)
    pixels = pixel_block * BLOCK_P + tl.arange(0, BLOCK_P)
    offsets = channels[:, None] * stride_c + pixels[None, :]
    tl.store(ptr + batch * stride_b + offsets, tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_channels(ptr, C, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    """A per-channel vector (weight, bias), padded with 0 to BLOCK_C."""
    channels = tl.arange(0, BLOCK_C)
    return tl.load(ptr + channels, mask=channels < C, other=0.0).to(COMPUTE)


@triton.jit
def _normalise(x, mask, C, eps):
    """Per-pixel statistics of the tile x: returns xhat = (x - mean) * rstd and rstd.

    The variance is taken of the centred values (two passes over registers), so a large mean
    does not cancel digits as E[x^2] - E[x]^2 would.
    """
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(centred * centred, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    return centred * rstd[None, :], rstd


@triton.jit
def layer_norm2d_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr,
    C, N, eps,
    x_stride_b, x_stride_c, y_stride_b, y_stride_c,
    WITH_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x, mask = _load_tile(x_ptr + batch * x_stride_b, x_stride_c, C, N, pixel_block,
                         BLOCK_C, BLOCK_P, COMPUTE)
    xhat, rstd = _normalise(x, mask, C, eps)

    weight = _load_channels(weight_ptr, C, BLOCK_C, COMPUTE)
    if WITH_BIAS:
        bias = _load_channels(bias_ptr, C, BLOCK_C, COMPUTE)
        y = xhat * weight[:, None] + bias[:, None]
    else:
        y = x * rstd[None, :] * weight[:, None]
    _store_tile(y_ptr, y_stride_b, y_stride_c, y, mask, batch, pixel_block, BLOCK_C, BLOCK_P)


@triton.jit
def layer_norm2d_bwd_kernel(
    x_ptr, weight_ptr, dy_ptr, dx_ptr, dweight_partial_ptr, dbias_partial_ptr,
    C, N, eps,
    x_stride_b, x_stride_c, dy_stride_b, dy_stride_c, dx_stride_b, dx_stride_c,
    WITH_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x, mask = _load_tile(x_ptr + batch * x_stride_b, x_stride_c, C, N, pixel_block,
                         BLOCK_C, BLOCK_P, COMPUTE)
    dy, _ = _load_tile(dy_ptr + batch * dy_stride_b, dy_stride_c, C, N, pixel_block,
                       BLOCK_C, BLOCK_P, COMPUTE)
    xhat, rstd = _normalise(x, mask, C, eps)

    weight = _load_channels(weight_ptr, C, BLOCK_C, COMPUTE)
    g = dy * weight[:, None]
    if WITH_BIAS:
        projection = tl.sum(g * xhat, axis=0) / C
        dx = (g - tl.sum(g, axis=0)[None, :] / C - xhat * projection[None, :]) * rstd[None, :]
        dweight_row = tl.sum(dy * xhat, axis=1)
    else:  # the normalised output is x * rstd: rstd is factored out of the sums
        projection = tl.sum(g * x, axis=0) * rstd / C
        dx = (g - xhat * projection[None, :]) * rstd[None, :]
        dweight_row = tl.sum(dy * x * rstd[None, :], axis=1)

    _store_tile(dx_ptr, dx_stride_b, dx_stride_c, dx, mask, batch, pixel_block, BLOCK_C, BLOCK_P)

    # This program's row of the partial-sum buffers (padding pixels hold dy = 0: no effect).
    row = (batch * tl.num_programs(0) + pixel_block) * C
    channels = tl.arange(0, BLOCK_C)
    tl.store(dweight_partial_ptr + row + channels, dweight_row, mask=channels < C)
    if WITH_BIAS:
        tl.store(dbias_partial_ptr + row + channels, tl.sum(dy, axis=1), mask=channels < C)


def tile_config(channels: int, pixels: int, tile: tuple[int, int]) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) for C channels, N pixels per image and FORWARD/BACKWARD_TILE."""
    tile_elements, per_thread = tile
    block_c = triton.next_power_of_2(channels)
    if INTERPRET:
        # The interpreter runs programs one after another: a small fixed pixel block keeps
        # test shapes spanning several programs (tails masked) at a modest cost.
        return block_c, 32, 1
    block_p = max(_MIN_BLOCK_P, min(_MAX_BLOCK_P, tile_elements // block_c))
    block_p = min(block_p, max(_MIN_BLOCK_P, triton.next_power_of_2(pixels)))
    num_warps = max(4, min(16, block_c * block_p // (32 * per_thread)))
    return block_c, block_p, num_warps


def _check_planes(*tensors: torch.Tensor) -> None:
    """Contiguous H*W planes, and one image's span within int32 (the kernels' in-image offsets)."""
    for t in tensors:
        _, channels, height, width = t.shape
        if t.numel() == 0:
            continue
        if not ((t.stride(3) == 1 or width == 1) and (t.stride(2) == width or height == 1)):
            raise ValueError("layer_norm2d kernels need contiguous H*W planes; call .contiguous() first")
        if (channels - 1) * t.stride(1) + height * width >= 2**31:
            raise ValueError(f"layer_norm2d kernels: one image of shape {tuple(t.shape)} spans 2**31 "
                             "elements or more; split it")


def _grid(pixels: int, block_p: int, batch: int) -> tuple[int, int]:
    if batch > 65535:  # CUDA's limit on the second grid axis
        raise ValueError(f"layer_norm2d kernels: batch {batch} > 65535; split the batch")
    return triton.cdiv(pixels, block_p), batch


def layer_norm2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """y = LayerNorm2d(x) as a new contiguous tensor of ``out_dtype``; x must have contiguous planes."""
    _check_planes(x)
    batch, channels, height, width = x.shape
    pixels = height * width
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_c, block_p, num_warps = tile_config(channels, pixels, FORWARD_TILE)
    grid = _grid(pixels, block_p, batch)
    layer_norm2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        channels, pixels, eps,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        WITH_BIAS=bias is not None, COMPUTE=compute_dtype(x, weight),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )
    return y


def layer_norm2d_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias): dx in x's dtype, the parameter gradients as float32 (float64) sums.

    dbias is None when not ``with_bias``. x and dy must have contiguous planes.
    """
    _check_planes(x, dy)
    batch, channels, height, width = x.shape
    pixels = height * width
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_c, block_p, num_warps = tile_config(channels, pixels, BACKWARD_TILE)
    grid = _grid(pixels, block_p, batch)
    compute = compute_dtype(x, weight, dy)
    # Every program writes its full row, so the buffers need no initialisation.
    partial_shape = (grid[0] * grid[1], channels)
    partial_dtype = torch.float64 if compute == tl.float64 else torch.float32
    dweight_partial = torch.empty(partial_shape, dtype=partial_dtype, device=x.device)
    dbias_partial = torch.empty(partial_shape, dtype=partial_dtype, device=x.device) if with_bias else None
    if x.numel() > 0:
        layer_norm2d_bwd_kernel[grid](
            x, weight, dy, dx, dweight_partial,
            dbias_partial if with_bias else dweight_partial,
            channels, pixels, eps,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            WITH_BIAS=with_bias, COMPUTE=compute,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
        )
    # Fixed-order sums over the programs' rows: identical results run to run.
    dweight = dweight_partial.sum(0)
    dbias = dbias_partial.sum(0) if with_bias else None
    return dx, dweight, dbias
