"""Restormer's transposed (channel) attention, MDTA, as Triton kernels: forward and backward.

Math, per image b and head h, with c = C/heads channel rows of N = H*W pixels each
(q_i is row i of the head's q, and so on):
    iq_i = 1 / max(|q_i|, eps),  ik_j = 1 / max(|k_j|, eps)      (eps = 1e-12, F.normalize)
    cos_ij = iq_i ik_j (q_i . k_j),   S = tau_h cos,   A = softmax over j of S,   out = A v
Backward, with dO the gradient of out:
    dA = dO v^T,   dv = A^T dO,   dS = A * (dA - rowsum(dA * A)),   dtau_h = sum(dS * cos)
    P  = tau_h dS iq ik^T,   T_i = tau_h sum_j dS_ij cos_ij,   U_j = tau_h sum_i dS_ij cos_ij
    dq = P k   - diag(mq iq^2 T) q,      dk = P^T q - diag(mk ik^2 U) k
where mq_i = [|q_i| >= eps] (the clamp passes no gradient below eps). The terms with T and U
are F.normalize's projection: <q^_i, dq^_i> = T_i, a sum over the tiny c x c matrices, so
the row sums over N that the projection needs cost no extra pass over q and k.

Passes over memory (a "stream" is one c x N operand of one head; c x c matrices are tiny):
    forward   gram_partials(q, k)  -> sum_chunks -> softmax_forward -> channel_mix(A, v)
    backward  gram_partials(dO, v) -> sum_chunks -> softmax_backward
              channel_mix(A^T, dO) -> dv;   channel_mix dual (P, k | P^T, q) -> dq, dk
so the forward reads q, k, v once and writes out once; the backward reads dO twice and
q, k, v once, and writes dq, dk, dv once. q and k are never normalised into new tensors.
(3xTF32 with heads of more than 64 channels runs dq and dk as two passes, see _mix_plan.)

- Reductions over N are split into chunks of pixels across many programs; each program
  writes its partial c x c sums (and squared row norms) to its own slot of a buffer, and
  sum_chunks adds the slots in a fixed order. No atomics: results are identical run to run.
- Channel tiles: c is padded to C_PAD = next power of two (>= 16, tl.dot's minimum) with
  masked loads; the c x c Gram matrix is computed in tiles of at most 128 x 128. Heads of
  at most MAX_HEAD_CHANNELS channels (SIPL's widest is 176).
- Layout: a stream is (B, C, H, W) with each channel plane contiguous (H*W pixels at unit
  stride); batch and channel strides are free, so q, k, v = qkv.chunk(3, dim=1) are used
  in place.
- Arithmetic: 16-bit inputs multiply on tensor cores with float32 accumulation; float32
  inputs use 3xTF32 (fp32-level error at tensor-core speed: the kernels are memory-bound only
  if the multiplies are cheap; see _precision for why not plain TF32);
  float64 stays float64. The small matrices (Gram, A, P) are kept in float32 (float64).
- The softmax backward shifts each row of dA first (see _softmax_backward_kernel): in rows
  where the softmax saturates, the float32 result then stays accurate to ~1e-6 where the
  textbook formula (and the reference, in float32) loses whole percents.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRET, NORMALIZE_EPS, multiprocessors

__all__ = ["forward", "backward", "MAX_HEAD_CHANNELS", "PREFETCH_DEFAULT", "stats_size"]

MAX_HEAD_CHANNELS = 256  # beyond this M's rows and the (C_PAD x BLOCK_N) tiles crowd out each other
_SOFTMAX_TILE = 2048  # elements of one (rows x C_PAD) tile in the small-matrix kernels
_SUM_BLOCK_L = 256  # matrix entries one sum_chunks program adds up
_SUM_BLOCK_CHUNKS = 8  # chunk slots it loads at a time (fixed: it fixes the summation order)


# ----------------------------------------------------------------------------------------
# Launch plans. Each streaming kernel gets one configuration derived from its tile sizes
# (tests/test_transposed_attention_triton.py compiles every width and dtype for sm_90: shared
# memory within the H100's 227 KB, no serialised tensor-core products, no extra spills).
# The interpreter runs programs one after another in numpy: small blocks, few programs.
#
# 16-bit streams run without software pipelining (num_stages 1): pipelined, they failed the
# bf16 accuracy and run-to-run tests on a GPU, as two Triton bugs predict:
# triton-lang/triton#6691 (a pipelined loop whose loaded tile feeds both tl.dot and a tl.sum,
# as the Gram kernel's norms do) and #11047 (with more than 4 warps the wgmma wait does not
# order the other warpgroup's reads of a pipelined buffer before it is refilled). Float32
# streams escape both: 3xTF32 splits each tile in registers and stores the parts, so no dot
# reads the pipelined buffer (docs/design.md, "Transposed attention").
#
# Instead of a shared-memory pipeline, a program loads the next PREFETCH tiles into registers
# while it multiplies this one (0: none, 1: the next, 2: the next two); each tile is multiplied
# as before, so at one tile length the results are bitwise those without prefetching.
# PREFETCH_DEFAULT is the depth that timed fastest (docs/design.md, "Transposed attention");
# forward and backward take ``prefetch=`` to choose another.
# ----------------------------------------------------------------------------------------
PREFETCH_DEFAULT = 1
_STAGES_16BIT = 1  # num_stages of 16-bit streams (see above)
_STAGE_BYTES = 32 * 1024  # stream tiles loaded per pipeline stage
_SHARED_MEMORY_BUDGET = 200 * 1024  # H100: 227 KB per block, minus what Triton adds
_RESIDENT_BYTES = 128 * 1024  # most shared memory M's rows may take in a mix program
_MAX_BLOCK_N = 256  # runs and chunks of pixels are multiples of this (any BLOCK_N divides it)


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _operand_copies(precision: str) -> int:
    """3xTF32 keeps a high and a low part of every shared-memory operand."""
    return 2 if precision == "tf32x3" else 1


def _prefetched(plan: dict, prefetch: int, deepest: int = 2) -> dict:
    """The plan with PREFETCH, the tiles kept in flight: ``prefetch``, at most ``deepest``
    (what the registers allow), 0 where the streams are software-pipelined. With prefetching
    the tiles are half the planned length: the current and the next tile take the registers
    (and shared memory) of the one tile planned (full-length tiles spilled registers at 48
    channels, sm_90).

    Why depth 2 exists: at SIPL's widths a program of these passes mostly has its
    multiprocessor to itself (its registers; the Gram grid is one wave), so the loads in
    flight per multiprocessor are its prefetched tiles, 12 KB at depth 1 at SIPL's 48 and 96
    channels (bf16, sm_90 plans). By Little's law that sustains ~12 KB per ~1 us of memory
    latency per multiprocessor, about 1.6 TB/s on 132 of them; depth 2 doubles the bytes in
    flight for one more tile of registers (docs/design.md, "Transposed attention")."""
    plan["PREFETCH"] = min(prefetch, deepest) if plan["num_stages"] == 1 else 0
    if plan["PREFETCH"] and not INTERPRET:
        plan["BLOCK_N"] = max(16, plan["BLOCK_N"] // 2)
    return plan


def _gram_plan(c_pad: int, element_size: int, precision: str, prefetch: int = PREFETCH_DEFAULT) -> dict:
    """BLOCK_C, PREFETCH (see _prefetched) and the configuration of the Gram kernel: x and y
    tiles of BLOCK_C rows."""
    block_c = min(c_pad, 128)
    if INTERPRET:
        return _prefetched({"BLOCK_C": block_c, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}, prefetch)
    # below 64 rows tl.dot runs as mma.sync, whose operands take registers: shorter tiles
    longest = _MAX_BLOCK_N if block_c >= 64 else 64
    block_n = min(longest, _pow2_floor(_STAGE_BYTES // (2 * block_c * element_size)))
    stages = _STAGES_16BIT if element_size == 2 else 3
    plan = _prefetched({"BLOCK_C": block_c, "BLOCK_N": max(16, block_n), "num_warps": 4, "num_stages": stages},
                       prefetch)
    # a 128 x 128 float32 accumulator, 3xTF32's split operands, or two tiles in flight (at 64
    # channels 4 warps spilled, sm_90) need 8 warps' registers
    if block_c >= 128 or precision == "tf32x3" or plan["PREFETCH"] == 2:
        plan["num_warps"] = 8
    return plan


def _mix_shared_bytes(c_pad, block_i, block_n, stages, element_size, streams, precision) -> int:
    """Estimated shared memory of the mix kernel: M's rows (staged once; 3xTF32 keeps two
    parts), the pipelined x (and y) tiles, and the output tiles staged for coalesced stores."""
    resident = streams * block_i * c_pad * element_size * _operand_copies(precision)
    pipelined = stages * streams * c_pad * block_n * element_size
    return resident + pipelined + streams * block_i * block_n * element_size


def _mix_plan(c_pad: int, element_size: int, streams: int, precision: str, prefetch: int = PREFETCH_DEFAULT,
              scaled_rows: bool = False):
    """BLOCK_I (output rows per program), PREFETCH (see _prefetched) and the configuration of
    the mix kernel, or None when M's rows cannot stay on chip, or when two streams would leave
    tiles of less than half a single stream's length (the caller then runs one stream per
    launch: with 3xTF32 at 80-128 channels the dual pass has 16-pixel tiles, and two single
    passes, which read q and k twice, are faster; docs/design.md, "Transposed attention").

    M's rows are the first tl.dot operand, loaded once per program. 16-bit streams are
    planned as if they scaled them in registers (float16 does, ``scaled_rows``, _mixing_rows;
    bfloat16 does not and takes fewer registers than planned: 122 instead of 171 at 96
    channels, two programs per SM), where with the float32 accumulators they must fit in about
    128 registers per thread; other streams keep them in shared memory, at most _RESIDENT_BYTES.
    BLOCK_I shrinks first, not below 64 where wgmma needs it (3xTF32 below 64 rows runs as
    mma.sync with split operands in registers, and spills); then BLOCK_N gives way.
    """
    warps = 8 if c_pad >= 64 else 4
    threads = 32 * warps
    m_bytes = lambda rows: streams * rows * c_pad * element_size * _operand_copies(precision)
    fewest_rows = min(c_pad, 64) if element_size == 2 or precision == "tf32x3" else 16
    block_i = min(c_pad, 128)
    if element_size == 2:
        while block_i > fewest_rows and m_bytes(block_i) > 64 * 4 * threads:
            block_i //= 2
        accumulator_registers = 128 - m_bytes(block_i) // (4 * threads)
    else:
        while block_i > fewest_rows and m_bytes(block_i) > _RESIDENT_BYTES // 2:
            block_i //= 2
        if m_bytes(block_i) > _RESIDENT_BYTES:
            return None
        accumulator_registers = 64
    # Tiles in flight (sm_90, bf16 / fp16). Beyond 128 channels none: rows scaled in registers
    # (float16) spilled with one (176 channels); unscaled ones (bfloat16) fit it, but halving
    # the tile for it nearly doubles the loop's instructions per element, so the plan keeps
    # full-length tiles there. Up to 128 channels scaled rows gain from two
    # only in the single stream at 128: at 64 two programs of depth 1 share a multiprocessor
    # (one of depth 2 takes its registers), and the dual pass at 128 spilled twice as much with
    # them. Unscaled rows (bfloat16, and the interpreter's float32) take two without spills (the
    # dual pass at 96 channels: 188 registers, twice the 12 KB in flight of depth 1).
    if c_pad > 128:
        deepest = 0
    elif scaled_rows:
        deepest = 2 if c_pad == 128 and streams == 1 else 1
    else:
        deepest = 2
    if INTERPRET:
        return _prefetched({"BLOCK_I": block_i, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}, prefetch, deepest)
    # mma.sync (fewer than 64 rows) holds its operands in registers: shorter tiles
    longest = _MAX_BLOCK_N if block_i >= 64 else 64
    block_n = min(longest, _pow2_floor(accumulator_registers * threads // (streams * block_i)),
                  _pow2_floor(_STAGE_BYTES // (streams * c_pad * element_size)))
    shared = lambda n, stages: _mix_shared_bytes(c_pad, block_i, n, stages, element_size, streams, precision)
    while block_n > 16 and shared(block_n, 3) > _SHARED_MEMORY_BUDGET:
        block_n //= 2
    block_n = max(16, block_n)
    stages = 3 if shared(block_n, 3) <= _SHARED_MEMORY_BUDGET else 2
    if element_size == 2:
        stages = _STAGES_16BIT
    plan = _prefetched({"BLOCK_I": block_i, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages},
                       prefetch, deepest)
    if streams == 2 and plan["BLOCK_N"] < _mix_plan(c_pad, element_size, 1, precision, prefetch,
                                                     scaled_rows)["BLOCK_N"] // 2:
        return None
    return plan


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _stream_rows(base_ptr, stride_b, stride_c, batch, first_channel, rows, cols):
    """Pointers to pixels ``cols`` of channel rows ``rows`` of one head: a (rows, cols) tile."""
    channel = (first_channel + rows).to(tl.int64)
    return base_ptr + batch * stride_b + channel[:, None] * stride_c + cols[None, :]


@triton.jit
def _stream_tile(ptrs, n, rows_ok, cols, end):
    """The tile of ``ptrs`` (rows x BLOCK_N) at pixel offset n: zero in rows outside the head
    and in pixels from ``end`` on (a tile wholly past the end loads nothing)."""
    return tl.load(ptrs + n, mask=rows_ok[:, None] & (n + cols < end)[None, :], other=0.0)


@triton.jit
def _tiles_ahead(ptrs, start, rows_ok, cols, end, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    """(next, after): the tiles of ``ptrs`` a prefetching loop from pixel ``start`` has in flight
    before its first iteration, PREFETCH of them (the others are zeros, never read)."""
    nothing = tl.zeros(ptrs.shape, ptrs.dtype.element_ty)
    tile_next, tile_after = nothing, nothing
    if PREFETCH >= 1:
        tile_next = _stream_tile(ptrs, start, rows_ok, cols, end)
    if PREFETCH == 2:
        tile_after = _stream_tile(ptrs, start + BLOCK_N, rows_ok, cols, end)
    return tile_next, tile_after


@triton.jit
def _tiles_at(ptrs, n, tile_next, tile_after, rows_ok, cols, end, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    """At pixel offset n of a loop that keeps PREFETCH tiles in flight (_tiles_ahead): (this
    tile, the one after it, which depth 2 also takes in this iteration, and the tiles now in
    flight). Without prefetching this tile is loaded here."""
    if PREFETCH == 2:
        tile, second = tile_next, tile_after
        tile_next = _stream_tile(ptrs, n + 2 * BLOCK_N, rows_ok, cols, end)
        tile_after = _stream_tile(ptrs, n + 3 * BLOCK_N, rows_ok, cols, end)
    elif PREFETCH == 1:
        tile = tile_next
        second = tile
        tile_next = _stream_tile(ptrs, n + BLOCK_N, rows_ok, cols, end)
    else:
        tile = _stream_tile(ptrs, n, rows_ok, cols, end)
        second = tile
    return tile, second, tile_next, tile_after


@triton.jit
def _gram_step(x, y, gram, sq_x, sq_y, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Adds one pair of tiles to the Gram matrix x y^T and to the squares of x and y: kept per
    element (tiles of squares, summed over the row once after the loop, _row_sums) where the
    accumulators are tiles, else summed over the row here."""
    gram = tl.dot(x, tl.trans(y), gram, input_precision=PRECISION, out_dtype=ACC)
    # The backward's pass (x = dO, y = v) has no use for the norms: a few ALU operations per
    # loaded element in a memory-bound loop, and one kernel variant to compile.
    x_acc = x.to(ACC)
    y_acc = y.to(ACC)
    if len(sq_x.shape) == 2:
        sq_x, sq_y = sq_x + x_acc * x_acc, sq_y + y_acc * y_acc
    else:
        sq_x, sq_y = sq_x + tl.sum(x_acc * x_acc, axis=1), sq_y + tl.sum(y_acc * y_acc, axis=1)
    return gram, sq_x, sq_y


@triton.jit
def _row_sums(squares):
    """The squared row norms from _gram_step's accumulator."""
    if len(squares.shape) == 2:
        squares = tl.sum(squares, axis=1)
    return squares


@triton.jit(do_not_specialize=["C", "HEADS"])
def _gram_partials_kernel(
    x_ptr, y_ptr, partials_ptr,
    C, N, HEADS, CHUNK,
    x_stride_b, x_stride_c, y_stride_b, y_stride_c,
    partials_stride_bh, partials_stride_chunk,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Partial x y^T, |x_i|^2 and |y_j|^2 of one head over one chunk of CHUNK pixels.

    Grid: (chunks * channel tiles, B*heads), channel tiles fastest so that the programs
    reading one chunk run together and share it through L2. Channel tile t covers rows
    (t // tiles) of x and rows (t % tiles) of y, BLOCK_C each. Writes slot [bh, chunk] of
    the partials buffer: c*c Gram entries (row-major), then c squared norms of x, then of y.
    """
    tiles = tl.cdiv(C, BLOCK_C)
    chunk = tl.program_id(0) // (tiles * tiles)
    tile = tl.program_id(0) % (tiles * tiles)
    bh = tl.program_id(1)
    batch = (bh // HEADS).to(tl.int64)
    first_channel = (bh % HEADS) * C
    tile_x = tile // tiles
    tile_y = tile % tiles
    rows_x = tile_x * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_y = tile_y * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_N)
    x_ptrs = _stream_rows(x_ptr, x_stride_b, x_stride_c, batch, first_channel, rows_x, cols)
    y_ptrs = _stream_rows(y_ptr, y_stride_b, y_stride_c, batch, first_channel, rows_y, cols)

    gram = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
    # 16-bit streams keep their squares per element, which spares each tile a reduction over
    # its row (a large share of the Gram loop's instructions); float32 ones sum
    # them per tile (3xTF32's split operands leave no registers for the tiles: spills).
    if x_ptr.dtype.element_ty.primitive_bitwidth == 16:
        sq_x = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
        sq_y = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
    else:
        sq_x = tl.zeros((BLOCK_C,), dtype=ACC)
        sq_y = tl.zeros((BLOCK_C,), dtype=ACC)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, N)
    x_ok, y_ok = rows_x < C, rows_y < C
    # Prefetching: the next PREFETCH tiles' loads are in flight while one is multiplied. At
    # depth 2 an iteration takes two tiles (past the end they load nothing and add zeros).
    x_next, x_after = _tiles_ahead(x_ptrs, start, x_ok, cols, end, BLOCK_N, PREFETCH)
    y_next, y_after = _tiles_ahead(y_ptrs, start, y_ok, cols, end, BLOCK_N, PREFETCH)
    for n in range(start, end, BLOCK_N * (2 if PREFETCH == 2 else 1)):
        x, x_second, x_next, x_after = _tiles_at(x_ptrs, n, x_next, x_after, x_ok, cols, end, BLOCK_N, PREFETCH)
        y, y_second, y_next, y_after = _tiles_at(y_ptrs, n, y_next, y_after, y_ok, cols, end, BLOCK_N, PREFETCH)
        if PREFETCH == 2:
            gram, sq_x, sq_y = _gram_step(x, y, gram, sq_x, sq_y, PRECISION, ACC)
            x, y = x_second, y_second
        gram, sq_x, sq_y = _gram_step(x, y, gram, sq_x, sq_y, PRECISION, ACC)

    slot = partials_ptr + bh.to(tl.int64) * partials_stride_bh + chunk.to(tl.int64) * partials_stride_chunk
    gram_mask = (rows_x < C)[:, None] & (rows_y < C)[None, :]
    tl.store(slot + rows_x[:, None] * C + rows_y[None, :], gram, mask=gram_mask)
    # every tile computes the norms; the first tile of each row / column stores them
    tl.store(slot + C * C + rows_x, _row_sums(sq_x), mask=(rows_x < C) & (tile_y == 0))
    tl.store(slot + C * C + C + rows_y, _row_sums(sq_y), mask=(rows_y < C) & (tile_x == 0))


@triton.jit(do_not_specialize=["CHUNKS", "L"])
def _sum_chunks_kernel(partials_ptr, sums_ptr, CHUNKS, L, partials_stride_bh, partials_stride_chunk,
                       BLOCK_L: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):
    """sums[bh, :] = sum over chunks of partials[bh, chunk, :], in a fixed order.

    Grid: (cdiv(L, BLOCK_L), B*heads).
    """
    bh = tl.program_id(1).to(tl.int64)
    entries = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    slots = tl.arange(0, BLOCK_CHUNKS)
    base = partials_ptr + bh * partials_stride_bh
    total = tl.zeros((BLOCK_CHUNKS, BLOCK_L), dtype=partials_ptr.dtype.element_ty)
    for first in range(0, CHUNKS, BLOCK_CHUNKS):
        chunk = first + slots
        mask = (chunk < CHUNKS)[:, None] & (entries < L)[None, :]
        total += tl.load(base + chunk[:, None].to(tl.int64) * partials_stride_chunk + entries[None, :],
                         mask=mask, other=0.0)
    tl.store(sums_ptr + bh * L + entries, tl.sum(total, axis=0), mask=entries < L)


@triton.jit
def _inverse_norms(stats_ptr, offset, indices, C, eps):
    """1 / max(|row|, eps) of rows ``indices`` from squared norms at stats_ptr + offset, and
    whether the norm passes gradient (|row| >= eps)."""
    norm = tl.sqrt(tl.load(stats_ptr + offset + indices, mask=indices < C, other=1.0))
    return 1.0 / tl.maximum(norm, eps), norm >= eps


@triton.jit
def _cosine_rows(stats_ptr, rows, cols, C, eps):
    """Rows ``rows`` of cos = (iq ik^T) * (q k^T) from a head's stats (Gram, |q|^2, |k|^2).

    Returns cos, the inverse norms of q rows and k columns, and the gradient masks.
    """
    valid = (rows < C)[:, None] & (cols < C)[None, :]
    gram = tl.load(stats_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=0.0)
    inv_q, pass_q = _inverse_norms(stats_ptr, C * C, rows, C, eps)
    inv_k, pass_k = _inverse_norms(stats_ptr, C * C + C, cols, C, eps)
    return gram * inv_q[:, None] * inv_k[None, :], inv_q, inv_k, pass_q, pass_k


@triton.jit(do_not_specialize=["C", "HEADS"])
def _softmax_forward_kernel(stats_ptr, temperature_ptr, attn_ptr, C, HEADS, eps,
                            BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """A[rows, :] = softmax_j(tau_h cos[rows, j]) for BLOCK_I rows of one head.

    Grid: (cdiv(C, BLOCK_I), B*heads). stats rows: [Gram (c*c), |q|^2 (c), |k|^2 (c)].
    """
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_C)
    stats = stats_ptr + bh.to(tl.int64) * (C * C + 2 * C)
    cos, _, _, _, _ = _cosine_rows(stats, rows, cols, C, eps)
    tau = tl.load(temperature_ptr + bh % HEADS).to(cos.dtype)
    logits = tl.where((cols < C)[None, :], tau * cos, float("-inf"))
    shifted = logits - tl.max(logits, axis=1)[:, None]
    weights = tl.exp(shifted)
    attn = weights / tl.sum(weights, axis=1)[:, None]
    valid = (rows < C)[:, None] & (cols < C)[None, :]
    tl.store(attn_ptr + bh.to(tl.int64) * C * C + rows[:, None] * C + cols[None, :], attn, mask=valid)


@triton.jit(do_not_specialize=["C", "HEADS"])
def _softmax_backward_kernel(stats_ptr, attn_ptr, grad_attn_ptr, temperature_ptr,
                             p_ptr, diag_q_ptr, diag_k_ptr, grad_tau_ptr,
                             C, HEADS, eps, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """From dA (= dO v^T) to the matrices of dq and dk, and this head's share of dtau.

    One program per B*heads, walking the rows in blocks (the column sums U need all rows).
    stats and grad_attn hold c*c + 2c entries per head (_gram_sums), attn c*c.
    Writes P = tau dS iq ik^T (c x c), diag_q = -mq iq^2 T, diag_k = -mk ik^2 U (c each),
    and grad_tau[bh] = sum(dS * cos).
    """
    bh = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    stats = stats_ptr + bh.to(tl.int64) * (C * C + 2 * C)
    grad_attn_head = grad_attn_ptr + bh.to(tl.int64) * (C * C + 2 * C)
    matrix_offset = bh.to(tl.int64) * C * C
    tau = tl.load(temperature_ptr + bh % HEADS).to(stats_ptr.dtype.element_ty)
    column_sums = tl.zeros((BLOCK_C,), dtype=stats_ptr.dtype.element_ty)
    for first_row in range(0, C, BLOCK_I):
        rows = first_row + tl.arange(0, BLOCK_I)
        valid = (rows < C)[:, None] & (cols < C)[None, :]
        entries = rows[:, None] * C + cols[None, :]
        cos, inv_q, inv_k, pass_q, pass_k = _cosine_rows(stats, rows, cols, C, eps)
        attn = tl.load(attn_ptr + matrix_offset + entries, mask=valid, other=0.0)
        grad_attn = tl.load(grad_attn_head + entries, mask=valid, other=0.0)
        # dS = A (dA - rowsum(A dA)) is unchanged by adding a constant to a row of dA (A's
        # rows sum to 1). Shifting by dA at the row's largest probability makes that entry
        # exactly 0: in a saturated row (A nearly one-hot, tau = 50) the small dS of the
        # dominant entry then survives instead of cancelling to rounding noise.
        top = tl.argmax(attn, axis=1)
        grad_attn -= tl.sum(tl.where(cols[None, :] == top[:, None], grad_attn, 0.0), axis=1)[:, None]
        grad_logits = attn * (grad_attn - tl.sum(grad_attn * attn, axis=1)[:, None])
        weighted = grad_logits * cos  # dS * cos: its sums give T, U and dtau
        tl.store(p_ptr + matrix_offset + entries, tau * grad_logits * inv_q[:, None] * inv_k[None, :],
                 mask=valid)
        row_sums = tau * tl.sum(weighted, axis=1)
        tl.store(diag_q_ptr + bh * C + rows, tl.where(pass_q, -inv_q * inv_q * row_sums, 0.0), mask=rows < C)
        column_sums += tl.sum(weighted, axis=0)
    inv_k, pass_k = _inverse_norms(stats, C * C + C, cols, C, eps)
    tl.store(diag_k_ptr + bh * C + cols, tl.where(pass_k, -inv_k * inv_k * tau * column_sums, 0.0),
             mask=cols < C)
    tl.store(grad_tau_ptr + bh, tl.sum(column_sums, axis=0))


@triton.jit
def _mixing_rows(m_ptr, stride_i, stride_j, rows, ks, C, DOT_DTYPE: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """Rows ``rows`` of a small matrix M as a tl.dot operand of DOT_DTYPE, and their scales.

    For a float16 dot each row is divided by its largest |entry| first (the scale multiplies
    the product back in float32): P's entries can be far below float16's smallest normal, or
    above its largest, while their ratios within a row are what the product needs. bfloat16
    has float32's exponents: its rows go in as they are (a multiply per output element fewer).
    """
    valid = (rows < C)[:, None] & (ks < C)[None, :]
    m = tl.load(m_ptr + rows[:, None] * stride_i + ks[None, :] * stride_j, mask=valid, other=0.0)
    if SCALE_ROWS:
        scale = tl.max(tl.abs(m), axis=1)
        scale = tl.where(scale > 0, scale, 1.0)
        m = m / scale[:, None]
    else:
        scale = tl.full((m.shape[0],), 1.0, dtype=m.dtype)
    return m.to(DOT_DTYPE), scale


@triton.jit(do_not_specialize=["C", "HEADS"])
def _channel_mix_kernel(
    m_ptr, m_stride_bh, m_stride_i, m_stride_j,
    x_ptr, x_stride_b, x_stride_c, out_ptr, out_stride_b, out_stride_c,
    y_ptr, y_stride_b, y_stride_c, out2_ptr, out2_stride_b, out2_stride_c,
    diag1_ptr, diag2_ptr,
    C, N, HEADS, PIXELS_PER_PROGRAM,
    DIAG: tl.constexpr, DUAL: tl.constexpr, SCALE_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """out = M x for one head's streams, over a run of PIXELS_PER_PROGRAM pixels.

    DIAG adds a diagonal term, out += diag1 * y. DUAL (with DIAG) also computes
    out2 = M^T y + diag2 * x from the same loads of x and y: the dq, dk step, with x = k,
    y = q, M = P. Grid: (pixel runs * row tiles, B*heads), row tiles fastest so that the
    programs reading one run of x share it through L2. A program owns BLOCK_I output rows,
    multiplies by all c rows of x (BLOCK_K = C_PAD), and loads its rows of M once.
    """
    row_tiles = tl.cdiv(C, BLOCK_I)
    run = tl.program_id(0) // row_tiles
    rows = (tl.program_id(0) % row_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    bh = tl.program_id(1)
    batch = (bh // HEADS).to(tl.int64)
    first_channel = (bh % HEADS) * C
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    m_head = m_ptr + bh.to(tl.int64) * m_stride_bh
    dot_dtype = x_ptr.dtype.element_ty
    m1, scale1 = _mixing_rows(m_head, m_stride_i, m_stride_j, rows, ks, C, dot_dtype, SCALE_ROWS)
    x_ptrs = _stream_rows(x_ptr, x_stride_b, x_stride_c, batch, first_channel, ks, cols)
    out_ptrs = _stream_rows(out_ptr, out_stride_b, out_stride_c, batch, first_channel, rows, cols)
    if DIAG:
        diag1 = tl.load(diag1_ptr + bh * C + rows, mask=rows < C, other=0.0)
        y_rows_ptrs = _stream_rows(y_ptr, y_stride_b, y_stride_c, batch, first_channel, rows, cols)
    if DUAL:
        m2, scale2 = _mixing_rows(m_head, m_stride_j, m_stride_i, rows, ks, C, dot_dtype, SCALE_ROWS)
        diag2 = tl.load(diag2_ptr + bh * C + rows, mask=rows < C, other=0.0)
        y_ptrs = _stream_rows(y_ptr, y_stride_b, y_stride_c, batch, first_channel, ks, cols)
        x_rows_ptrs = _stream_rows(x_ptr, x_stride_b, x_stride_c, batch, first_channel, rows, cols)
        out2_ptrs = _stream_rows(out2_ptr, out2_stride_b, out2_stride_c, batch, first_channel, rows, cols)
    else:  # placeholders: _mix_tile takes them but reads them only with DUAL
        m2, scale2, diag2, x_rows_ptrs, out2_ptrs = m1, scale1, scale1, x_ptrs, out_ptrs
    if not DIAG:
        diag1, y_rows_ptrs = scale1, out_ptrs

    start = run * PIXELS_PER_PROGRAM
    end = tl.minimum(start + PIXELS_PER_PROGRAM, N)
    # Prefetching as in the Gram pass: PREFETCH tiles in flight, two tiles an iteration at
    # depth 2 (see _mix_plan for where it is planned).
    x_next, x_after = _tiles_ahead(x_ptrs, start, ks < C, cols, end, BLOCK_N, PREFETCH)
    if DUAL:
        y_next, y_after = _tiles_ahead(y_ptrs, start, ks < C, cols, end, BLOCK_N, PREFETCH)
    for n in range(start, end, BLOCK_N * (2 if PREFETCH == 2 else 1)):
        x, x_second, x_next, x_after = _tiles_at(x_ptrs, n, x_next, x_after, ks < C, cols, end, BLOCK_N, PREFETCH)
        if DUAL:
            y, y_second, y_next, y_after = _tiles_at(y_ptrs, n, y_next, y_after, ks < C, cols, end, BLOCK_N,
                                                     PREFETCH)
        else:
            y, y_second = x, x_second
        tile = n
        if PREFETCH == 2:
            _mix_tile(tile, x, y, m1, scale1, m2, scale2, diag1, diag2, rows, cols, end, C,
                      out_ptrs, y_rows_ptrs, out2_ptrs, x_rows_ptrs, DIAG, DUAL, PRECISION, ACC, BLOCK_I, BLOCK_K)
            x, y, tile = x_second, y_second, n + BLOCK_N
        _mix_tile(tile, x, y, m1, scale1, m2, scale2, diag1, diag2, rows, cols, end, C,
                  out_ptrs, y_rows_ptrs, out2_ptrs, x_rows_ptrs, DIAG, DUAL, PRECISION, ACC, BLOCK_I, BLOCK_K)


@triton.jit
def _mix_tile(n, x, y, m1, scale1, m2, scale2, diag1, diag2, rows, cols, end, C,
              out_ptrs, y_rows_ptrs, out2_ptrs, x_rows_ptrs,
              DIAG: tl.constexpr, DUAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
              BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the mix pass's output tile(s) at pixel offset n from the loaded tiles x (and y)."""
    out_mask = (rows < C)[:, None] & (n + cols < end)[None, :]
    out = tl.dot(m1, x, input_precision=PRECISION, out_dtype=ACC) * scale1[:, None]
    if DIAG:
        if DUAL and BLOCK_I == BLOCK_K:  # one row tile: the loaded tile is the rows
            y_rows = y
        else:
            y_rows = tl.load(y_rows_ptrs + n, mask=out_mask, other=0.0)
        out += diag1[:, None] * y_rows.to(ACC)
    if DUAL:
        if BLOCK_I == BLOCK_K:
            x_rows = x
        else:
            x_rows = tl.load(x_rows_ptrs + n, mask=out_mask, other=0.0)
        out2 = tl.dot(m2, y, input_precision=PRECISION, out_dtype=ACC) * scale2[:, None]
        out2 += diag2[:, None] * x_rows.to(ACC)
        tl.store(out2_ptrs + n, out2.to(out2_ptrs.dtype.element_ty), mask=out_mask)
    tl.store(out_ptrs + n, out.to(out_ptrs.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def stats_size(channels: int) -> int:
    """Entries of one head's forward statistics: Gram matrix, then |q_i|^2, then |k_j|^2."""
    return channels * channels + 2 * channels


# Launch layouts are cached per problem shape: a forward at 128x128 runs for only tens of
# microseconds on the GPU, so the host work per call is kept to the launches themselves.
def _padded(channels: int) -> int:
    """C_PAD: the next power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, 1 << (channels - 1).bit_length())


def _target_programs(device_index: int) -> int:
    """Streaming passes aim at one wave of programs per multiprocessor (the mix pass at two)."""
    if INTERPRET:
        return 4  # a few programs: chunk splitting is exercised, the interpreter stays quick
    return multiprocessors(device_index)


def _split_pixels(n_pixels: int, other_programs: int, target_programs: int, shortest: int = 0):
    """(runs, pixels per run): split N into runs, each a multiple of _MAX_BLOCK_N long (the
    interpreter's block length there) and at least ``shortest``, so that runs times
    other_programs is about the target."""
    granularity = 32 if INTERPRET else _MAX_BLOCK_N
    wanted = max(1, triton.cdiv(target_programs, max(other_programs, 1)))
    per_run = max(granularity, triton.cdiv(max(triton.cdiv(n_pixels, wanted), shortest), granularity) * granularity)
    return max(1, triton.cdiv(n_pixels, per_run)), per_run


@functools.lru_cache(maxsize=1024)
def _gram_layout(c: int, n_pixels: int, heads_total: int, element_size: int, precision: str, target: int,
                 prefetch: int):
    """(BLOCK_C, PREFETCH, channel tiles, chunks, chunk length, launch configuration) of the
    Gram pass."""
    config = _gram_plan(_padded(c), element_size, precision, prefetch)
    block_c, prefetch = config.pop("BLOCK_C"), config.pop("PREFETCH")
    tiles = triton.cdiv(c, block_c) ** 2
    # A chunk's partial sums, (c*c + 2c) floats, are written and read back: keep them under
    # 1/4 of the chunk's 2 * c * length stream bytes (they mostly stay in L2 anyway), but
    # no longer than one wave of programs needs.
    shortest = 0 if INTERPRET else 8 * (c + 2) * 4 // (2 * element_size)
    chunks, chunk = _split_pixels(n_pixels, tiles * heads_total, target, shortest)
    return block_c, prefetch, tiles, chunks, chunk, config


@functools.lru_cache(maxsize=1024)
def _mix_layout(c: int, n_pixels: int, heads_total: int, element_size: int, streams: int, precision: str,
                target: int, prefetch: int, scaled_rows: bool):
    """(BLOCK_I, PREFETCH, row tiles, runs, pixels per run, launch configuration) of a mix
    pass, or None where _mix_plan splits the streams (streams = 2 with 3xTF32 heads)."""
    config = _mix_plan(_padded(c), element_size, streams, precision, prefetch, scaled_rows)
    if config is None:
        return None
    block_i, prefetch = config.pop("BLOCK_I"), config.pop("PREFETCH")
    row_tiles = triton.cdiv(c, block_i)
    # two waves: a mix program writes no partial sums, and more, shorter runs even out the tail
    runs, per_run = _split_pixels(n_pixels, row_tiles * heads_total, 2 * target)
    return block_i, prefetch, row_tiles, runs, per_run, config


def _accumulator(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 operands always as 3xTF32 (float32-level error at
    tensor-core speed). Not plain TF32, even where torch.backends.cuda.matmul.allow_tf32 allows
    it: dq = P k - diag(T) q cancels, and TF32's 10-bit mantissa does not survive that
    (docs/design.md, "Precision")."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _pixel_major(x: torch.Tensor) -> torch.Tensor:
    """x itself when each channel plane is contiguous (any batch and channel strides), else a copy."""
    _, _, h, w = x.shape
    if x.stride(3) == 1 and (h == 1 or x.stride(2) == w):
        return x
    return x.contiguous()


class _Call:
    """What every launch of one forward or backward call shares."""

    def __init__(self, x: torch.Tensor, num_heads: int, prefetch: int | None):
        batch, channels, h, w = x.shape
        self.heads, self.c, self.n_pixels = num_heads, channels // num_heads, h * w
        self.heads_total = batch * num_heads
        self.device, self.dtype, self.element_size = x.device, x.dtype, x.element_size()
        self.precision = _precision(x.dtype)
        self.scaled_rows = x.dtype == torch.float16  # see _mixing_rows
        self.acc_torch, self.acc_tl = _accumulator(x.dtype)
        self.target = _target_programs(x.device.index or 0)
        self.prefetch = PREFETCH_DEFAULT if prefetch is None else prefetch
        if self.prefetch not in (0, 1, 2):
            raise ValueError(f"transposed attention kernels: prefetch must be 0, 1 or 2, got {prefetch}")

    def gram_layout(self):
        return _gram_layout(self.c, self.n_pixels, self.heads_total, self.element_size, self.precision,
                            self.target, self.prefetch)

    def mix_layout(self, streams: int):
        return _mix_layout(self.c, self.n_pixels, self.heads_total, self.element_size, streams, self.precision,
                           self.target, self.prefetch, self.scaled_rows)


def _gram_sums(call: _Call, x, y) -> torch.Tensor:
    """Per head: [x y^T (c*c), |x_i|^2 (c), |y_j|^2 (c)], shape (B*heads, c*c + 2c)."""
    c, heads_total = call.c, call.heads_total
    block_c, prefetch, tiles, chunks, chunk, config = call.gram_layout()
    length = stats_size(c)
    partials = torch.empty((heads_total, chunks, length), device=call.device, dtype=call.acc_torch)
    _gram_partials_kernel[(chunks * tiles, heads_total)](
        x, y, partials, c, call.n_pixels, call.heads, chunk,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), partials.stride(0), partials.stride(1),
        PRECISION=call.precision, ACC=call.acc_tl, BLOCK_C=block_c, PREFETCH=prefetch, **config)
    sums = torch.empty((heads_total, length), device=call.device, dtype=call.acc_torch)
    _sum_chunks_kernel[(triton.cdiv(length, _SUM_BLOCK_L), heads_total)](
        partials, sums, chunks, length, partials.stride(0), partials.stride(1),
        BLOCK_L=_SUM_BLOCK_L, BLOCK_CHUNKS=_SUM_BLOCK_CHUNKS)
    return sums


def _channel_mix(call: _Call, layout, matrix, transpose: bool, x, out, diag=None, second=None) -> None:
    """out = M x per head (M^T x if ``transpose``), matrix (B*heads, c, c), with ``layout``
    from call.mix_layout. ``diag`` = (d, y) adds d * y to out (d: (B*heads, c)); ``second``
    = (out2, d2), with diag, also computes out2 = M^T y + d2 * x."""
    block_i, prefetch, row_tiles, runs, per_run, config = layout
    stride_i, stride_j = matrix.stride(1), matrix.stride(2)
    if transpose:
        stride_i, stride_j = stride_j, stride_i
    diag1, y = diag if diag is not None else (matrix, x)  # unused placeholders without DIAG
    out2, diag2 = second if second is not None else (out, matrix)
    _channel_mix_kernel[(runs * row_tiles, call.heads_total)](
        matrix, matrix.stride(0), stride_i, stride_j,
        x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1),
        y, y.stride(0), y.stride(1), out2, out2.stride(0), out2.stride(1),
        diag1, diag2, call.c, call.n_pixels, call.heads, per_run,
        DIAG=diag is not None, DUAL=second is not None, SCALE_ROWS=call.scaled_rows,
        PRECISION=call.precision, ACC=call.acc_tl, BLOCK_I=block_i, BLOCK_K=_padded(call.c),
        PREFETCH=prefetch, **config)


def _mix(call: _Call, matrix, transpose: bool, x) -> torch.Tensor:
    """M x per head as a new contiguous tensor (M^T x if ``transpose``)."""
    out = torch.empty(x.shape, device=call.device, dtype=call.dtype)
    _channel_mix(call, call.mix_layout(1), matrix, transpose, x, out)
    return out


def _input_gradients(call: _Call, p, diag_q, diag_k, q, k):
    """dq = P k + diag_q * q and dk = P^T q + diag_k * k per head.

    One pass over q and k when P's rows fit on chip twice (always for 16-bit streams),
    otherwise one pass for each gradient.
    """
    dq = torch.empty(q.shape, device=call.device, dtype=call.dtype)
    dk = torch.empty_like(dq)
    fused = call.mix_layout(2)
    if fused is not None:
        _channel_mix(call, fused, p, False, k, dq, diag=(diag_q, q), second=(dk, diag_k))
    else:
        single = call.mix_layout(1)
        _channel_mix(call, single, p, False, k, dq, diag=(diag_q, q))
        _channel_mix(call, single, p, True, q, dk, diag=(diag_k, k))
    return dq, dk


def _softmax_rows(c: int) -> int:
    """Rows of A per program of the small-matrix kernels: (rows x C_PAD) <= _SOFTMAX_TILE."""
    return max(1, min(_padded(c), _SOFTMAX_TILE // _padded(c)))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, num_heads: int, *,
            prefetch: int | None = None):
    """Returns (out, stats, attn): out (B, C, H, W) contiguous; stats (B*heads, c*c + 2c)
    holds q k^T, |q_i|^2 and |k_j|^2 per head; attn (B*heads, c, c) is A. Both small
    tensors are float32 (float64 for float64 inputs) and are what the backward needs.
    ``prefetch``: stream tiles kept in flight, 0, 1 or 2 (None: PREFETCH_DEFAULT)."""
    q, k, v = (_pixel_major(t) for t in (q, k, v))
    call = _Call(q, num_heads, prefetch)
    c = call.c
    if c > MAX_HEAD_CHANNELS:
        raise ValueError(f"transposed attention kernels take at most {MAX_HEAD_CHANNELS} channels "
                         f"per head, got {c}")
    stats = _gram_sums(call, q, k)
    attn = torch.empty((call.heads_total, c, c), device=call.device, dtype=call.acc_torch)
    rows = _softmax_rows(c)
    _softmax_forward_kernel[(triton.cdiv(c, rows), call.heads_total)](
        stats, temperature.reshape(-1), attn, c, num_heads, NORMALIZE_EPS, BLOCK_I=rows, BLOCK_C=_padded(c))
    return _mix(call, attn, False, v), stats, attn


def backward(grad_out, q, k, v, temperature, stats, attn, num_heads: int, *, prefetch: int | None = None):
    """Returns (dq, dk, dv, dtemperature) for the forward's (out, stats, attn); ``prefetch``
    as in forward."""
    grad_out, q, k, v = (_pixel_major(t) for t in (grad_out, q, k, v))
    call = _Call(q, num_heads, prefetch)
    c, heads_total = call.c, call.heads_total
    grad_attn = _gram_sums(call, grad_out, v)  # dO v^T; the norms that follow it go unused
    p = torch.empty((heads_total, c, c), device=call.device, dtype=call.acc_torch)
    diag_q = torch.empty((heads_total, c), device=call.device, dtype=call.acc_torch)
    diag_k = torch.empty_like(diag_q)
    grad_tau = torch.empty((heads_total,), device=call.device, dtype=call.acc_torch)
    _softmax_backward_kernel[(heads_total,)](
        stats, attn, grad_attn, temperature.reshape(-1), p, diag_q, diag_k, grad_tau,
        c, num_heads, NORMALIZE_EPS, BLOCK_I=_softmax_rows(c), BLOCK_C=_padded(c))
    dv = _mix(call, attn, True, grad_out)
    dq, dk = _input_gradients(call, p, diag_q, diag_k, q, k)
    grad_temperature = grad_tau.view(-1, num_heads).sum(0)
    return dq, dk, dv, grad_temperature.to(temperature.dtype).reshape(temperature.shape)
