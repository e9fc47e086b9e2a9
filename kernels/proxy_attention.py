"""Proxy Fusion cross-attention (cosine attention over pixels): Triton forward and backward.

Math, per batch b and head h (d = C / heads channels per head, tokens are pixels):
    q̂_i = q_i / max(|q_i|, eps),  k̂_j = k_j / max(|k_j|, eps)      (eps = 1e-12, F.normalize)
    s_ij = tau_h * q̂_i . k̂_j,   P = softmax_j(s),   out_i = sum_j P_ij v_j
No 1/sqrt(d): the logits are cosines times the temperature, so |s| <= |tau|.

Layout. q is (Bq, C, Hq, Wq), k and v are (Bk, C, Hk, Wk), read in place through strides: a
head is the d channel planes h*d .. h*d+d-1, a token is one pixel (H and W merged into one
token stride). A batch-1 side (the dictionary) gets batch stride 0 and is never repeated.
Token counts that fill every block (SIPL's: 4096, 65536, ...) run without token masks
(FULL_Q / FULL_KV): the compiler folds the masks away.

Head tiles. tl.arange and tl.dot need power-of-two sizes of at least 16, and SIPL uses
d = 96 and 384. Each head tile is held as two channel chunks "a" and "b" of widths DA and DB
(96 = 64 + 32, 384 = 256 + 128, 48 = 32 + 16, 40 = 32 + 16 with the last 8 masked; DB = 0 when
one chunk covers d). Products over d add the two chunk products; products into d keep one
accumulator per chunk. Nothing is padded in memory; masked channels (read as 0) exist only in
chunk b, fewer than its used ones (none at the SIPL sizes 48, 96, 384; 8 at d = 40).

Passes (every buffer is linear in tokens; there is no Nq x Nkv buffer anywhere):
1. ``_token_dot_kernel`` -> per-token inverse norms 1/max(|x|, eps) of q and k (fp32), kept for
   the backward. The products take q and k as loaded and the inverse norms scale the logits
   in fp32 (q's rows, k's columns), which costs no more operations per logit than the softmax
   needs anyway and writes no normalised copies of q and k. (Scaling the q tile in
   registers instead made ptxas serialise every wgmma of the forward, C7515, sm_90.)
2. ``_forward_kernel``: a query block against a range of key blocks with an online softmax
   (sum in fp32, base 2), shifted by the bound |tau| log2(e) on its logits where that is at
   most 40, else by a running maximum (_FIXED_SHIFT_MAX). It writes the normalised output and
   the base-2 logsumexp (lse) of its rows. With few queries and many keys (the dictionary side, e.g.
   4096 x 65536) the key range is split across programs (flash-decoding) so that the GPU is
   full at batch 1; each split writes fp32 partials and ``_combine_splits_kernel`` merges them
   in a fixed order (deterministic).
3. Backward (FlashAttention-2 style, P recomputed from lse; Delta_i = dout_i . out_i):
   - ``_backward_dkdv_kernel`` owns a key block and loops over query blocks:
       dv += P^T dout,  dk̂ += tau * dS^T q̂,  dS = P * (dout v^T - Delta).
   - ``_backward_dq_kernel`` owns a query block and loops over key blocks:
       G += dS k̂,  dq̂ = tau * G,  dtau_h += sum_i G_i . q̂_i.
   A batch-1 side gets the sum of its gradients over the batch: its programs loop over every
   batch that uses it. When the loop is long and the blocks are few (many queries and few
   keys for dk/dv, few queries and many keys for dq) the loop is split across programs too;
   each split writes an fp32 partial and ``_reduce_splits_kernel`` sums them in a fixed order.
   Whoever ends the sum applies the normalisation backward,
       dx = r * (dx̂ - x̂ (x̂ . dx̂)),  r = 1/|x|,  or dx = r * dx̂ where the norm was clamped,
   and dtau comes out as per-token partials summed by torch.sum. No atomics anywhere, so the
   results are identical run to run. The price: P and dP are recomputed in both passes, 7
   matrix products per score where FlashAttention-2's backward (SDPA's) does 5 and adds dq
   with atomics (not deterministic); its dq partials per key block instead would need
   (key blocks x Nq x d) floats, 0.8 GB at 4096 x 65536.

Precision. Accumulation is fp32. bf16/fp16 tiles feed tl.dot directly (P and dS are cast to
the input dtype for their products, as in FlashAttention). fp32 inputs use 3xTF32 dots
(fp32-level error on tensor cores) unless the caller allows TF32 (``allow_tf32``, which the
op reads from torch.backends.cuda.matmul.allow_tf32 at call time); see _dot_precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, NORMALIZE_EPS, multiprocessors

__all__ = ["proxy_attention_forward", "proxy_attention_backward", "head_chunks", "empty_in_layout_of",
           "NORMALIZE_EPS"]

# F.normalize's eps and its consequences, as compile-time constants of the kernels:
_EPS = tl.constexpr(NORMALIZE_EPS)
_INVERSE_EPS = tl.constexpr(1e12)           # inverse norm stored for a clamped (near-zero) token
_LOG2E = tl.constexpr(1.4426950408889634)   # softmax runs in base 2: exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------------------------
# Small functions shared by the kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _in_range(tokens, count, FULL: tl.constexpr):
    """tokens < count; with FULL (count a multiple of every block size) a constant true mask,
    which the compiler folds away: unmasked loads, no selects of their ``other`` values."""
    if FULL:
        return tl.full(tokens.shape, True, tl.int1)
    return tokens < count


@triton.jit
def _chunk_mask(token_mask, channels, ch0: tl.constexpr, CH: tl.constexpr, D: tl.constexpr):
    """The mask of a (tokens, CH) tile: channels >= D only exist in a chunk reaching past D."""
    if ch0 + CH <= D:
        mask = tl.broadcast_to(token_mask[:, None], (token_mask.shape[0], CH))
    else:
        mask = token_mask[:, None] & (channels[None, :] < D)
    return mask


@triton.jit
def _load_chunk(base, tokens, token_mask, stride_t, stride_c, ch0: tl.constexpr, CH: tl.constexpr,
                D: tl.constexpr):
    """The (tokens, CH) tile of channels ch0 .. ch0+CH-1 of one head; channels >= D read as 0."""
    channels = ch0 + tl.arange(0, CH)
    ptrs = base + tokens[:, None] * stride_t + channels[None, :] * stride_c
    return tl.load(ptrs, mask=_chunk_mask(token_mask, channels, ch0, CH, D), other=0.0)


@triton.jit
def _store_chunk(base, tile, tokens, token_mask, stride_t, stride_c, ch0: tl.constexpr, CH: tl.constexpr,
                 D: tl.constexpr):
    """Stores a (tokens, CH) tile (cast to the buffer's dtype) where _load_chunk reads it."""
    channels = ch0 + tl.arange(0, CH)
    ptrs = base + tokens[:, None] * stride_t + channels[None, :] * stride_c
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=_chunk_mask(token_mask, channels, ch0, CH, D))


@triton.jit
def _norm_in_ds(dtype, DOT_PRECISION: tl.constexpr):
    """Whether a backward product dS x̂ (x̂ = x * r, r the inverse norms of x's tokens) runs as
    (dS r) x: x then stays the operand as loaded, with no register copy of x̂ (fewer registers
    and instructions). Not in float16, where dS * r overflows (r = 1e12 on zero tokens), nor
    with 3xTF32 dots, which split their operands in registers anyway (there it spilled more,
    sm_90)."""
    return dtype != tl.float16 and DOT_PRECISION != "tf32x3"


@triton.jit
def _ds_operand(ds, r, NORM_IN_DS: tl.constexpr, dtype: tl.constexpr):
    """dS (rows x tokens of x, fp32) as the first operand of dS x̂, in ``dtype``: times r per
    column where NORM_IN_DS (see _norm_in_ds)."""
    if NORM_IN_DS:
        ds = ds * r[None, :]
    return ds.to(dtype)


@triton.jit
def _normalized_operand(x, r, NORM_IN_DS: tl.constexpr):
    """The second operand of dS x̂: x̂ = x * r in x's dtype, or x itself where dS carries r
    (_ds_operand, _norm_in_ds)."""
    if NORM_IN_DS:
        operand = x
    else:
        operand = (x * r[:, None]).to(x.dtype)
    return operand


@triton.jit
def _normalize_grad(xhat, g, r, proj):
    """dx for x̂ = x * r, given g = dL/dx̂ and proj = x̂ . g per token (0 where the norm was clamped).

    F.normalize divides by max(|x|, eps): above eps this is r * (g - x̂ (x̂ . g)); a clamped
    token has a constant divisor, so there its gradient is r * g.
    """
    return r[:, None] * (g - xhat * proj[:, None])


# --------------------------------------------------------------------------------------------
# Per-token channel dot products: inverse norms of q and k, and Delta = dout . out
# --------------------------------------------------------------------------------------------

@triton.jit
def _token_dot_kernel(
    a_ptr, b_ptr, out_ptr, N, NUM_HEADS,
    a_sb, a_sc, a_st, b_sb, b_sc, b_st,
    D: tl.constexpr, INVERSE_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[batch, head, token] = sum over the head's channels of a * b, in fp32.

    With INVERSE_NORM (a is b) it stores 1 / max(sqrt(sum), eps) instead; clamped tokens get
    exactly _INVERSE_EPS so the backward can tell them apart. out is (batch, heads, N) contiguous.
    """
    token_block = tl.program_id(0)
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    tokens = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < N
    a_base = a_ptr + batch.to(tl.int64) * a_sb + head * D * a_sc
    b_base = b_ptr + batch.to(tl.int64) * b_sb + head * D * b_sc
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for ch0 in range(0, D, BLOCK_C):
        a = _load_chunk(a_base, tokens, token_mask, a_st, a_sc, ch0, BLOCK_C, D).to(tl.float32)
        b = _load_chunk(b_base, tokens, token_mask, b_st, b_sc, ch0, BLOCK_C, D).to(tl.float32)
        total += tl.sum(a * b, axis=1)
    if INVERSE_NORM:
        norm = tl.sqrt(total)
        total = tl.where(norm > _EPS, 1.0 / tl.maximum(norm, _EPS), _INVERSE_EPS)
    tl.store(out_ptr + (batch * NUM_HEADS + head).to(tl.int64) * N + tokens, total, mask=token_mask)


# --------------------------------------------------------------------------------------------
# Autotuning: one small fixed config under the interpreter; a short list per head size on GPU
# --------------------------------------------------------------------------------------------

# Token counts stay specialised (Triton notes N % 16 == 0): the token masks are then constant
# over 16 rows, so masked loads still vectorise and pipeline (cp.async needs >= 4 bytes).
#
# Tile shapes per class of (input dtype, head size): (owned rows, loop rows, warps, stages).
# "Owned" is the block a program keeps in registers across its loop (queries in the forward and
# the dq pass, keys in the dk/dv pass), "loop" the block it streams. The backward owns two fp32
# accumulators (dk and dv) plus two input tiles, so at d = 96 it needs 8 warps for 128 owned
# rows; wide heads (d > 128) get small blocks and 8 warps. Rules the entries keep:
# - every entry compiles for sm_90 within the H100's 227 KB of shared memory, without
#   serialised tensor-core products (ptxas C7515), and spills no registers except in the wide
#   16-bit backward and the fp32 d > 128 class, which spills at every tile size tl.dot allows
#   (tests/test_proxy_attention_triton.py::test_configs_compile_for_sm90 re-checks);
# - each entry costs a compile (1-5 s) per dtype, head size and output kind, so only the
#   classes SIPL runs (16-bit and float32 at d <= 128) get several candidates; the others one;
# - float32 (3xTF32) tiles own 64 rows per warpgroup so that the products run as wgmma (in
#   32 x 32 blocks they ran as mma.sync with split operands in registers, several times the
#   instructions per logit).
# The instruction counts per logit behind each candidate are in docs/design.md, section
# "Proxy attention".
_FORWARD_SHAPES = {
    "16-bit, d <= 128": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
    "16-bit, d > 128": [(64, 32, 8, 2)],
    "fp32, d <= 128": [(64, 32, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    "fp32, d > 128": [(32, 32, 8, 1)],
}
_DKDV_SHAPES = {
    "16-bit, d <= 128": [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
    "16-bit, d > 128": [(32, 32, 8, 2)],
    "fp32, d <= 128": [(32, 32, 8, 2), (64, 32, 4, 3), (64, 16, 4, 3)],
    "fp32, d > 128": [(32, 32, 8, 1)],
}
# The dq pass forms neither q̂ nor k̂ in registers, which leaves room for loop blocks of 64
# keys at 128 owned rows in 16-bit (no spills, wgmma N = 64 for the logits).
_DQ_SHAPES = dict(_DKDV_SHAPES, **{"16-bit, d <= 128": [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)]})


def _tile_class(head_dim: int, dtype) -> str:
    return f"{'fp32' if dtype == torch.float32 else '16-bit'}, d {'>' if head_dim > 128 else '<='} 128"


def _config_shape(config, owned: str, loop: str) -> tuple:
    """A triton.Config as its entry of a shape table: (owned rows, loop rows, warps, stages)."""
    return config.kwargs[owned], config.kwargs[loop], config.num_warps, config.num_stages


def _autotune(owned: str, loop: str, shapes: dict):
    """triton.autotune over ``shapes`` (all classes), pruned at launch to the class of (D, dtype).
    The tuned kernel keeps ``tile_names`` (owned, loop) and ``shapes`` for the tools and tests
    that compile or force its configs.

    Under the interpreter: one small config (tl.dot needs 16) and no benchmarking.
    """
    if INTERPRET:
        tune = triton.autotune(configs=[triton.Config({owned: 16, loop: 16}, num_warps=1, num_stages=1)], key=[])
    else:
        unique = sorted({shape for class_shapes in shapes.values() for shape in class_shapes})
        configs = [triton.Config({owned: m, loop: n}, num_warps=w, num_stages=st) for m, n, w, st in unique]

        def prune(configs, named_args, **kwargs):
            wanted = shapes[_tile_class(kwargs["D"], named_args["q_ptr"].dtype)]
            return [c for c in configs if _config_shape(c, owned, loop) in wanted]

        tune = triton.autotune(configs=configs, key=["N_Q", "N_KV", "D"],
                               prune_configs_by={"early_config_prune": prune})

    def decorate(fn):
        tuned = tune(fn)
        tuned.tile_names, tuned.shapes = (owned, loop), shapes
        return tuned
    return decorate


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

# The forward's softmax shift. Its logits are cosines times the temperature, so every base-2
# logit lies in [-bound, bound] with bound = |tau| log2(e). Shifting by the bound instead of a
# running maximum, p = 2^(logit - bound) lies in [2^(-2 bound), 1] (1 + rounding): no running
# maximum, no rescaling of the accumulators, nothing per logit but the exponential
# (docs/design.md, "Proxy attention"). At bound <= 40 (|tau| <= 27.7; SIPL's temperatures
# start at 1) p >= 2^-80, so p and its products with v stay far inside float32's
# and bfloat16's normal range (2^-126) even in a row whose keys all point away. Beyond, and
# always in float16 (whose normals end at 2^-14), the running maximum.
_FIXED_SHIFT_MAX = tl.constexpr(40.0)


@triton.jit
def _attend_keys(q_a, q_b, rq, k_base, v_base, rk_base, first, last, N_KV, k_st, k_sc, v_st, v_sc, tau_log2e, shift,
                 D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 FULL_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUNNING_MAX: tl.constexpr):
    """The forward's loop over key blocks first .. last-1 for one query block: returns the
    accumulators of sum_j p_ij v_j (chunks a and b; b is a placeholder when DB = 0), the row
    sums of p, and each row's shift (p_ij = 2^(logit_ij - shift_i)): the running maximum of the
    logits with RUNNING_MAX, else ``shift``.

    q enters the products as loaded: scaling it first (q̂ = q * r_q in registers) made ptxas
    serialise every wgmma of the kernel (C7515, sm_90). r_q scales the logits' rows instead:
    with t = (q . k) * r_k * tau * log2(e) the base-2 logit is r_q * t, and as r_q > 0 the
    running maximum can be kept in t, so the softmax costs no extra operation per logit.
    """
    offs_n = tl.arange(0, BLOCK_N)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    else:
        acc_b = acc_a  # unused
    for n_block in range(first, last):
        keys = n_block * BLOCK_N + offs_n
        key_mask = _in_range(keys, N_KV, FULL_KV)
        k_a = _load_chunk(k_base, keys, key_mask, k_st, k_sc, 0, DA, D)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        if DB > 0:
            k_b = _load_chunk(k_base, keys, key_mask, k_st, k_sc, DA, DB, D)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PRECISION)
        # t = (q . k) * r_k * tau * log2(e); keys past N_KV get -inf (one FMA).
        key_scale = tl.load(rk_base + keys, mask=key_mask, other=0.0) * tau_log2e
        # (the bias from the comparison even where every key is valid: with a constant zero
        # bias ptxas serialised the 64-row config's wgmma, C7515)
        key_bias = tl.where(keys < N_KV, 0.0, float("-inf"))
        s = s * key_scale[None, :] + key_bias[None, :]
        if RUNNING_MAX:
            # row_max is the running maximum of t; p = 2^(r_q (t - max)) is one FMA per logit.
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            rescale = tl.exp2(rq * (row_max - new_max))
            p = tl.exp2(s * rq[:, None] - (rq * new_max)[:, None])
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            row_max = new_max
            acc_a = acc_a * rescale[:, None]
            if DB > 0:
                acc_b = acc_b * rescale[:, None]
        else:
            p = tl.exp2(s * rq[:, None] - shift)
            row_sum += tl.sum(p, axis=1)
        p = p.to(v_base.dtype.element_ty)
        v_a = _load_chunk(v_base, keys, key_mask, v_st, v_sc, 0, DA, D)
        acc_a = tl.dot(p, v_a, acc_a, input_precision=DOT_PRECISION)
        if DB > 0:
            v_b = _load_chunk(v_base, keys, key_mask, v_st, v_sc, DA, DB, D)
            acc_b = tl.dot(p, v_b, acc_b, input_precision=DOT_PRECISION)
    if RUNNING_MAX:
        row_shift = rq * row_max
    else:
        row_shift = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + shift
    return acc_a, acc_b, row_sum, row_shift


@_autotune("BLOCK_M", "BLOCK_N", _FORWARD_SHAPES)
@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, temp_ptr, rq_ptr, rk_ptr, out_ptr, lse_ptr,
    N_Q, N_KV, NUM_HEADS, NUM_SPLITS,
    q_sb, q_sc, q_st, k_sb, k_sc, k_st, v_sb, v_sc, v_st, rq_sb, rk_sb,
    out_ss, out_sb, out_sc, out_st, lse_ss,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FULL_Q: tl.constexpr, FULL_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block of one (batch, head) against the key blocks of split program_id(2).

    Writes out = (sum_j p_ij v_j) / l_i and lse_i = m_i + log2(l_i) of these rows to split
    slot program_id(2) of out and lse (the final tensors when there is one split, fp32
    partials otherwise); lse is (batch, heads, N_Q) contiguous within a split. rq/rk: inverse
    norms, (batch, heads, tokens) with batch stride rq_sb/rk_sb.
    """
    m_block = tl.program_id(0)
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    split = tl.program_id(2)
    queries = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_mask = _in_range(queries, N_Q, FULL_Q)

    q_base = q_ptr + batch.to(tl.int64) * q_sb + head * D * q_sc
    k_base = k_ptr + batch.to(tl.int64) * k_sb + head * D * k_sc
    v_base = v_ptr + batch.to(tl.int64) * v_sb + head * D * v_sc
    rk_base = rk_ptr + batch.to(tl.int64) * rk_sb + head * N_KV

    # q as loaded; r_q scales the logits' rows (see _attend_keys)
    rq = tl.load(rq_ptr + batch.to(tl.int64) * rq_sb + head * N_Q + queries, mask=query_mask, other=1.0)
    q_a = _load_chunk(q_base, queries, query_mask, q_st, q_sc, 0, DA, D)
    if DB > 0:
        q_b = _load_chunk(q_base, queries, query_mask, q_st, q_sc, DA, DB, D)
    else:
        q_b = q_a  # unused
    tau_log2e = tl.load(temp_ptr + head).to(tl.float32) * _LOG2E

    # The cosines bound every base-2 logit by |tau| log2(e): where that bound is small enough,
    # the softmax shifts by it instead of a running maximum (see _FIXED_SHIFT_MAX).
    shift = tl.abs(tau_log2e)
    kv_blocks = tl.cdiv(N_KV, BLOCK_N)
    first, last = split * kv_blocks // NUM_SPLITS, (split + 1) * kv_blocks // NUM_SPLITS
    if (shift <= _FIXED_SHIFT_MAX) & (v_ptr.dtype.element_ty != tl.float16):
        acc_a, acc_b, row_sum, row_shift = _attend_keys(
            q_a, q_b, rq, k_base, v_base, rk_base, first, last, N_KV, k_st, k_sc, v_st, v_sc, tau_log2e, shift,
            D, DA, DB, DOT_PRECISION, FULL_KV, BLOCK_M, BLOCK_N, RUNNING_MAX=False)
    else:
        acc_a, acc_b, row_sum, row_shift = _attend_keys(
            q_a, q_b, rq, k_base, v_base, rk_base, first, last, N_KV, k_st, k_sc, v_st, v_sc, tau_log2e, shift,
            D, DA, DB, DOT_PRECISION, FULL_KV, BLOCK_M, BLOCK_N, RUNNING_MAX=True)

    # A split without key blocks (more splits than blocks) has row sums 0 and accumulators 0:
    # it writes out 0 and lse -inf, which the combine weighs by 0 (0/0 would poison the sum).
    lse = lse_ptr + split.to(tl.int64) * lse_ss + (batch * NUM_HEADS + head).to(tl.int64) * N_Q + queries
    tl.store(lse, row_shift + tl.log2(row_sum), mask=query_mask)
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out_base = out_ptr + split.to(tl.int64) * out_ss + batch.to(tl.int64) * out_sb + head * D * out_sc
    _store_chunk(out_base, acc_a / row_sum[:, None], queries, query_mask, out_st, out_sc, 0, DA, D)
    if DB > 0:
        _store_chunk(out_base, acc_b / row_sum[:, None], queries, query_mask, out_st, out_sc, DA, DB, D)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, N, NUM_HEADS, NUM_SPLITS,
    part_out_ss, part_out_sb, part_lse_ss, out_sb, out_sc, out_st,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the splits of the forward: out = sum_s 2^(lse_s - lse) out_s, lse = log2 sum_s 2^lse_s.

    part_out is (splits, batch, C, N) fp32, part_lse (splits, batch, heads, N); the splits are
    visited in order, so the result does not depend on scheduling.
    """
    token_block = tl.program_id(0)
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    tokens = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < N
    row = (batch * NUM_HEADS + head).to(tl.int64) * N + tokens
    lse_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    part_lse = part_lse_ptr + row  # advanced split by split: pointer arithmetic stays 64-bit
    for _ in range(NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(part_lse, mask=token_mask, other=0.0))
        part_lse += part_lse_ss
    weight_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    part_lse = part_lse_ptr + row
    part_out = part_out_ptr + batch.to(tl.int64) * part_out_sb + head * D * N
    for _ in range(NUM_SPLITS):
        weight = tl.exp2(tl.load(part_lse, mask=token_mask, other=0.0) - lse_max)
        acc += weight[:, None] * _load_chunk(part_out, tokens, token_mask, 1, N, 0, BLOCK_D, D)
        weight_sum += weight
        part_lse += part_lse_ss
        part_out += part_out_ss
    out_base = out_ptr + batch.to(tl.int64) * out_sb + head * D * out_sc
    _store_chunk(out_base, acc / weight_sum[:, None], tokens, token_mask, out_st, out_sc, 0, BLOCK_D, D)
    tl.store(lse_ptr + row, lse_max + tl.log2(weight_sum), mask=token_mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@_autotune("BLOCK_N", "BLOCK_M", _DKDV_SHAPES)
@triton.jit
def _backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, temp_ptr, rq_ptr, rk_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N_Q, N_KV, NUM_HEADS, NUM_SPLITS, BATCHES_PER_KV,
    q_sb, q_sc, q_st, k_sb, k_sc, k_st, v_sb, v_sc, v_st, rq_sb, rk_sb, do_sb, do_sc, do_st,
    dk_ss, dk_sb, dk_sc, dk_st, dv_ss, dv_sb, dv_sc, dv_st,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DOT_PRECISION: tl.constexpr, FINAL: tl.constexpr,
    FULL_Q: tl.constexpr, FULL_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk and dv of one key block of one (key batch, head), summed over split program_id(2)'s
    share of the (batch, query block) pairs that read it.

    A key batch is read by BATCHES_PER_KV consecutive batches (all B of them when the keys are
    the broadcast batch-1 side). With FINAL (one split) it applies the normalisation backward
    and writes dk, dv in the input dtype; otherwise it writes fp32 partials of dk̂ and dv.
    lse and delta are (batch, heads, N_Q) contiguous.
    """
    n_block = tl.program_id(0)
    kv_batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    split = tl.program_id(2)
    keys = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = _in_range(keys, N_KV, FULL_KV)
    offs_m = tl.arange(0, BLOCK_M)
    dtype = q_ptr.dtype.element_ty
    norm_in_ds = _norm_in_ds(dtype, DOT_PRECISION)

    k_base = k_ptr + kv_batch.to(tl.int64) * k_sb + head * D * k_sc
    v_base = v_ptr + kv_batch.to(tl.int64) * v_sb + head * D * v_sc
    k_a = _load_chunk(k_base, keys, key_mask, k_st, k_sc, 0, DA, D)
    v_a = _load_chunk(v_base, keys, key_mask, v_st, v_sc, 0, DA, D)
    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    if DB > 0:
        k_b = _load_chunk(k_base, keys, key_mask, k_st, k_sc, DA, DB, D)
        v_b = _load_chunk(v_base, keys, key_mask, v_st, v_sc, DA, DB, D)
        dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    rk = tl.load(rk_ptr + kv_batch.to(tl.int64) * rk_sb + head * N_KV + keys, mask=key_mask, other=0.0)
    tau = tl.load(temp_ptr + head).to(tl.float32)
    key_scale = rk * (tau * _LOG2E)
    key_bias = tl.where(key_mask, 0.0, float("-inf"))

    # The units of work are (batch, query block) pairs. The loop carries its batch's base
    # offsets and steps them when the query blocks wrap: computing them from the unit index
    # (a division by q_blocks, 64-bit products) costs instructions in every iteration.
    q_blocks = tl.cdiv(N_Q, BLOCK_M)
    units = BATCHES_PER_KV * q_blocks
    unit_begin = split * units // NUM_SPLITS
    batch = kv_batch * BATCHES_PER_KV + unit_begin // q_blocks
    m_block = unit_begin % q_blocks
    q_base = q_ptr + batch.to(tl.int64) * q_sb + head * D * q_sc
    do_base = dout_ptr + batch.to(tl.int64) * do_sb + head * D * do_sc
    rq_base = rq_ptr + batch.to(tl.int64) * rq_sb + head * N_Q
    row_base = (batch * NUM_HEADS + head).to(tl.int64) * N_Q  # of lse and delta
    for _ in range(unit_begin, (split + 1) * units // NUM_SPLITS):
        queries = m_block * BLOCK_M + offs_m
        query_mask = _in_range(queries, N_Q, FULL_Q)
        rq = tl.load(rq_base + queries, mask=query_mask, other=1.0)
        lse = tl.load(lse_ptr + row_base + queries, mask=query_mask, other=float("inf"))  # masked rows: P = 0
        delta = tl.load(delta_ptr + row_base + queries, mask=query_mask, other=0.0)

        # The logits from q as loaded, scaled by r_q in float32, as the forward computes them
        # (P must match its lse).
        q_a = _load_chunk(q_base, queries, query_mask, q_st, q_sc, 0, DA, D)
        do_a = _load_chunk(do_base, queries, query_mask, do_st, do_sc, 0, DA, D)
        s_t = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PRECISION)            # (keys, queries)
        dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PRECISION)
        if DB > 0:
            q_b = _load_chunk(q_base, queries, query_mask, q_st, q_sc, DA, DB, D)
            do_b = _load_chunk(do_base, queries, query_mask, do_st, do_sc, DA, DB, D)
            s_t = tl.dot(k_b, tl.trans(q_b), s_t, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v_b, tl.trans(do_b), dp_t, input_precision=DOT_PRECISION)
        p_t = tl.exp2((s_t * key_scale[:, None] + key_bias[:, None]) * rq[None, :] - lse[None, :])
        ds_t = _ds_operand(p_t * (dp_t - delta[None, :]), rq, norm_in_ds, dtype)  # dk̂ += dS^T q̂
        p_t = p_t.to(dtype)
        dv_a = tl.dot(p_t, do_a, dv_a, input_precision=DOT_PRECISION)
        dk_a = tl.dot(ds_t, _normalized_operand(q_a, rq, norm_in_ds), dk_a, input_precision=DOT_PRECISION)
        if DB > 0:
            dv_b = tl.dot(p_t, do_b, dv_b, input_precision=DOT_PRECISION)
            dk_b = tl.dot(ds_t, _normalized_operand(q_b, rq, norm_in_ds), dk_b, input_precision=DOT_PRECISION)

        m_block += 1
        next_batch = m_block == q_blocks
        m_block = tl.where(next_batch, 0, m_block)
        q_base = tl.where(next_batch, q_base + q_sb, q_base)
        do_base = tl.where(next_batch, do_base + do_sb, do_base)
        rq_base = tl.where(next_batch, rq_base + rq_sb, rq_base)
        row_base = tl.where(next_batch, row_base + NUM_HEADS * N_Q, row_base)

    # dk̂ = tau * dS^T q̂ (the key-side r_k is applied by the normalisation backward).
    dk_a = dk_a * tau
    if DB > 0:
        dk_b = dk_b * tau
    if FINAL:
        khat_a = k_a.to(tl.float32) * rk[:, None]
        proj = tl.sum(khat_a * dk_a, axis=1)
        if DB > 0:
            khat_b = k_b.to(tl.float32) * rk[:, None]
            proj += tl.sum(khat_b * dk_b, axis=1)
        proj = tl.where(rk < _INVERSE_EPS, proj, 0.0)  # clamped tokens: no projection
        dk_a = _normalize_grad(khat_a, dk_a, rk, proj)
        if DB > 0:
            dk_b = _normalize_grad(khat_b, dk_b, rk, proj)
    dk_base = dk_ptr + split.to(tl.int64) * dk_ss + kv_batch.to(tl.int64) * dk_sb + head * D * dk_sc
    dv_base = dv_ptr + split.to(tl.int64) * dv_ss + kv_batch.to(tl.int64) * dv_sb + head * D * dv_sc
    _store_chunk(dk_base, dk_a, keys, key_mask, dk_st, dk_sc, 0, DA, D)
    _store_chunk(dv_base, dv_a, keys, key_mask, dv_st, dv_sc, 0, DA, D)
    if DB > 0:
        _store_chunk(dk_base, dk_b, keys, key_mask, dk_st, dk_sc, DA, DB, D)
        _store_chunk(dv_base, dv_b, keys, key_mask, dv_st, dv_sc, DA, DB, D)


@_autotune("BLOCK_M", "BLOCK_N", _DQ_SHAPES)
@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, temp_ptr, rq_ptr, rk_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dtau_ptr,
    N_Q, N_KV, NUM_HEADS, NUM_SPLITS, BATCHES_PER_Q,
    q_sb, q_sc, q_st, k_sb, k_sc, k_st, v_sb, v_sc, v_st, rq_sb, rk_sb, do_sb, do_sc, do_st,
    dq_ss, dq_sb, dq_sc, dq_st, dtau_ss,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DOT_PRECISION: tl.constexpr, FINAL: tl.constexpr,
    FULL_Q: tl.constexpr, FULL_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one query block of one (query batch, head), summed over split program_id(2)'s
    share of the (batch, key block) pairs it meets, and the per-token dtau partials.

    A query batch is read by BATCHES_PER_Q consecutive batches (all B when the queries are the
    broadcast batch-1 dictionary); the outer loop walks those batches (dout, lse and delta
    change with the batch), the inner loop their key blocks. With FINAL (one split) it applies
    the normalisation backward and writes dq in the input dtype; otherwise fp32 partials of dq̂.
    dtau partials: dtau_ptr[split, query batch, head, token] = G_i . q̂_i, with G = dS k̂.
    """
    m_block = tl.program_id(0)
    q_batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    split = tl.program_id(2)
    queries = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_mask = _in_range(queries, N_Q, FULL_Q)
    offs_n = tl.arange(0, BLOCK_N)
    dtype = q_ptr.dtype.element_ty
    norm_in_ds = _norm_in_ds(dtype, DOT_PRECISION)

    q_base = q_ptr + q_batch.to(tl.int64) * q_sb + head * D * q_sc
    rq = tl.load(rq_ptr + q_batch.to(tl.int64) * rq_sb + head * N_Q + queries, mask=query_mask, other=1.0)
    # q as loaded: the logits are scaled by r_q in float32, as in the forward
    q_a = _load_chunk(q_base, queries, query_mask, q_st, q_sc, 0, DA, D)
    g_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    if DB > 0:
        q_b = _load_chunk(q_base, queries, query_mask, q_st, q_sc, DA, DB, D)
        g_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    tau = tl.load(temp_ptr + head).to(tl.float32)
    tau_log2e = tau * _LOG2E

    kv_blocks = tl.cdiv(N_KV, BLOCK_N)
    unit_begin = split * (BATCHES_PER_Q * kv_blocks) // NUM_SPLITS
    unit_end = (split + 1) * (BATCHES_PER_Q * kv_blocks) // NUM_SPLITS
    for batch_offset in range(unit_begin // kv_blocks, tl.cdiv(unit_end, kv_blocks)):
        batch = q_batch * BATCHES_PER_Q + batch_offset
        do_base = dout_ptr + batch.to(tl.int64) * do_sb + head * D * do_sc
        row = (batch * NUM_HEADS + head).to(tl.int64) * N_Q + queries
        lse = tl.load(lse_ptr + row, mask=query_mask, other=float("inf"))  # masked rows: P = 0
        delta = tl.load(delta_ptr + row, mask=query_mask, other=0.0)
        do_a = _load_chunk(do_base, queries, query_mask, do_st, do_sc, 0, DA, D)
        if DB > 0:
            do_b = _load_chunk(do_base, queries, query_mask, do_st, do_sc, DA, DB, D)
        k_base = k_ptr + batch.to(tl.int64) * k_sb + head * D * k_sc
        v_base = v_ptr + batch.to(tl.int64) * v_sb + head * D * v_sc
        rk_base = rk_ptr + batch.to(tl.int64) * rk_sb + head * N_KV
        first = tl.maximum(unit_begin - batch_offset * kv_blocks, 0)
        last = tl.minimum(unit_end - batch_offset * kv_blocks, kv_blocks)
        for n_block in range(first, last):
            keys = n_block * BLOCK_N + offs_n
            key_mask = _in_range(keys, N_KV, FULL_KV)
            rk = tl.load(rk_base + keys, mask=key_mask, other=0.0)
            k_a = _load_chunk(k_base, keys, key_mask, k_st, k_sc, 0, DA, D)
            v_a = _load_chunk(v_base, keys, key_mask, v_st, v_sc, 0, DA, D)
            s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
            dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PRECISION)
            if DB > 0:
                k_b = _load_chunk(k_base, keys, key_mask, k_st, k_sc, DA, DB, D)
                v_b = _load_chunk(v_base, keys, key_mask, v_st, v_sc, DA, DB, D)
                s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PRECISION)
                dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=DOT_PRECISION)
            key_bias = tl.where(key_mask, 0.0, float("-inf"))
            p = tl.exp2((s * (rk * tau_log2e)[None, :] + key_bias[None, :]) * rq[:, None] - lse[:, None])
            ds = _ds_operand(p * (dp - delta[:, None]), rk, norm_in_ds, dtype)  # G += dS k̂
            g_a = tl.dot(ds, _normalized_operand(k_a, rk, norm_in_ds), g_a, input_precision=DOT_PRECISION)
            if DB > 0:
                g_b = tl.dot(ds, _normalized_operand(k_b, rk, norm_in_ds), g_b, input_precision=DOT_PRECISION)

    # dtau partial: G_i . q̂_i; and dq̂ = tau * G, whose projection on q̂ is tau * (G_i . q̂_i).
    # q̂ is rebuilt in fp32 here rather than kept live in registers through the loop.
    qhat_a = _load_chunk(q_base, queries, query_mask, q_st, q_sc, 0, DA, D).to(tl.float32) * rq[:, None]
    g_dot_qhat = tl.sum(g_a * qhat_a, axis=1)
    if DB > 0:
        qhat_b = _load_chunk(q_base, queries, query_mask, q_st, q_sc, DA, DB, D).to(tl.float32) * rq[:, None]
        g_dot_qhat += tl.sum(g_b * qhat_b, axis=1)
    dtau_base = dtau_ptr + split.to(tl.int64) * dtau_ss + (q_batch * NUM_HEADS + head).to(tl.int64) * N_Q
    tl.store(dtau_base + queries, g_dot_qhat, mask=query_mask)
    g_a = g_a * tau
    if DB > 0:
        g_b = g_b * tau
    if FINAL:
        proj = tl.where(rq < _INVERSE_EPS, tau * g_dot_qhat, 0.0)  # clamped tokens: no projection
        g_a = _normalize_grad(qhat_a, g_a, rq, proj)
        if DB > 0:
            g_b = _normalize_grad(qhat_b, g_b, rq, proj)
    dq_base = dq_ptr + split.to(tl.int64) * dq_ss + q_batch.to(tl.int64) * dq_sb + head * D * dq_sc
    _store_chunk(dq_base, g_a, queries, query_mask, dq_st, dq_sc, 0, DA, D)
    if DB > 0:
        _store_chunk(dq_base, g_b, queries, query_mask, dq_st, dq_sc, DA, DB, D)


@triton.jit
def _reduce_splits_kernel(
    part_ptr, x_ptr, r_ptr, out_ptr, N, NUM_HEADS, NUM_SPLITS,
    part_ss, part_sb, x_sb, x_sc, x_st, out_sb, out_sc, out_st,
    D: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum over splits of part (fp32, (splits, batch, C, N)), in split order.

    With NORMALIZE the sum is dx̂ of a normalised input x (inverse norms r, (batch, heads, N))
    and out gets the normalisation backward of it; otherwise (dv) the sum itself.
    """
    token_block = tl.program_id(0)
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    tokens = token_block * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < N
    part = part_ptr + batch.to(tl.int64) * part_sb + head * D * N
    g = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for _ in range(NUM_SPLITS):
        g += _load_chunk(part, tokens, token_mask, 1, N, 0, BLOCK_D, D)
        part += part_ss  # advanced split by split: pointer arithmetic stays 64-bit
    if NORMALIZE:
        r = tl.load(r_ptr + (batch * NUM_HEADS + head).to(tl.int64) * N + tokens, mask=token_mask, other=0.0)
        x_base = x_ptr + batch.to(tl.int64) * x_sb + head * D * x_sc
        xhat = _load_chunk(x_base, tokens, token_mask, x_st, x_sc, 0, BLOCK_D, D).to(tl.float32) * r[:, None]
        proj = tl.where(r < _INVERSE_EPS, tl.sum(xhat * g, axis=1), 0.0)  # clamped tokens: no projection
        g = _normalize_grad(xhat, g, r, proj)
    out_base = out_ptr + batch.to(tl.int64) * out_sb + head * D * out_sc
    _store_chunk(out_base, g, tokens, token_mask, out_st, out_sc, 0, BLOCK_D, D)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def head_chunks(head_dim: int) -> tuple[int, int]:
    """(DA, DB): the two power-of-two channel chunks (each >= 16, DB may be 0) covering head_dim."""
    da = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - da
    db = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return da, db


def _token_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x, batch stride, channel stride, token stride) of a (B, C, H, W) tensor read as (B, C, H*W).

    H and W merge into one token stride whenever pixel (y, x) sits at y*W*sw + x*sw (NCHW,
    channels-last, channel slices, expanded tensors). Only a layout where they do not
    (e.g. a transposed H/W view) is copied. A batch-1 tensor gets batch stride 0 (broadcast).
    """
    _, _, height, width = x.shape
    if height > 1 and width > 1 and x.stride(2) != width * x.stride(3):
        x = x.contiguous()
    token_stride = x.stride(3) if width > 1 else x.stride(2)
    return x, (0 if x.shape[0] == 1 else x.stride(0)), x.stride(1), token_stride


def empty_in_layout_of(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty (B, C, H, W) tensor stored like x: channels-last when x's channels are innermost
    (channels-last storage or a channel slice of it), NCHW otherwise, as the torch backend answers."""
    channels_last = x.stride(1) == 1 and x.shape[1] > 1
    return torch.empty(shape, device=x.device, dtype=dtype or x.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _target_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(split, batch, channel, token) strides of a final output, written as split 0 of itself."""
    return (0, *_token_strides(x)[1:])


def _num_splits(programs: int, loop_tokens: int, batches_per_program: int, device: torch.device,
                wide_head: bool) -> int:
    """How many programs share each loop (over keys, or over queries) so that the GPU is full.

    ``programs``: the grid without splitting (output rows / nominal block, times batch and
    heads). A grid with at least one program per SM is left alone: splitting it would only add
    the partials' traffic. A smaller one is split to about two programs per SM. The split count
    never exceeds the loop's block count for the largest block a config may pick, so every split
    gets at least one block; on the GPU a split gets at least 4 blocks so that its fixed cost
    (loading the owned tile, writing an fp32 partial) stays small.
    """
    if INTERPRET:
        sms, loop_block, min_blocks = 2, 16, 1  # small, so that the tests' tiny shapes split too
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms, loop_block, min_blocks = multiprocessors(index), (64 if wide_head else 128), 4
    if programs >= sms:
        return 1
    loop_blocks = batches_per_program * triton.cdiv(loop_tokens, loop_block)
    return max(1, min(triton.cdiv(2 * sms, programs), loop_blocks // min_blocks))


def _full_blocks(tokens: int) -> bool:
    """Whether ``tokens`` is a multiple of every block size a config may pick (SIPL's token
    counts are): the kernels then run without token masks."""
    return tokens % (16 if INTERPRET else 128) == 0


def _nominal_rows(head_dim: int) -> int:
    return 16 if INTERPRET else (64 if head_dim > 128 else 128)


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """float32 dots: TF32 when allowed, else 3xTF32 (float32-level error on tensor cores; IEEE
    float32 dots run on the FMA units, several times slower: docs/design.md, "Precision").
    16-bit operands have no choice to make."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


def _small_tile(head_dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) of the memory-bound per-token kernels: all channels, ~8k elements."""
    block_d = triton.next_power_of_2(head_dim)
    return max(16, 8192 // block_d), block_d


def _token_dot(a, b, num_heads: int, inverse_norm: bool) -> torch.Tensor:
    """(batch, heads, tokens) fp32: sum over each head's channels of a * b (or the inverse norm)."""
    a, a_sb, a_sc, a_st = _token_strides(a)
    b, b_sb, b_sc, b_st = _token_strides(b)
    batch, channels, height, width = a.shape
    tokens = height * width
    out = torch.empty((batch, num_heads, tokens), device=a.device, dtype=torch.float32)
    block_t = 16 if INTERPRET else 128
    grid = (triton.cdiv(tokens, block_t), batch * num_heads)
    _token_dot_kernel[grid](a, b, out, tokens, num_heads, a_sb, a_sc, a_st, b_sb, b_sc, b_st,
                            D=channels // num_heads, INVERSE_NORM=inverse_norm, BLOCK_T=block_t,
                            BLOCK_C=16 if INTERPRET else 32, num_warps=4)
    return out


def proxy_attention_forward(q, k, v, temperature, num_heads: int, *, allow_tf32: bool = False,
                            num_splits: int | None = None):
    """Returns (out, lse, q_rnorm, k_rnorm).

    out: (B, C, Hq, Wq) in q's dtype and layout (NCHW or channels-last); lse: (B, heads, Nq)
    fp32 base-2 logsumexp of the logits (times log2 e); q_rnorm (Bq, heads, Nq) and k_rnorm
    (Bk, heads, Nkv): fp32 inverse norms.
    ``num_splits`` overrides the key-range split count (tests); splits beyond the number of key
    blocks get no keys and weigh nothing.
    """
    batch = max(q.shape[0], k.shape[0])
    _, channels, height_q, width_q = q.shape
    head_dim = channels // num_heads
    n_q, n_kv = height_q * width_q, k.shape[2] * k.shape[3]
    da, db = head_chunks(head_dim)
    q, q_sb, q_sc, q_st = _token_strides(q)
    k, k_sb, k_sc, k_st = _token_strides(k)
    v, v_sb, v_sc, v_st = _token_strides(v)
    q_rnorm = _token_dot(q, q, num_heads, inverse_norm=True)
    k_rnorm = _token_dot(k, k, num_heads, inverse_norm=True)
    temperature = temperature.reshape(-1)

    out = empty_in_layout_of(q, (batch, channels, height_q, width_q))
    lse = torch.empty((batch, num_heads, n_q), device=q.device, dtype=torch.float32)
    if num_splits is None:
        programs = triton.cdiv(n_q, _nominal_rows(head_dim)) * batch * num_heads
        num_splits = _num_splits(programs, n_kv, 1, q.device, head_dim > 128)
    if num_splits == 1:
        target_out, target_lse, out_strides = out, lse[None], _target_strides(out)
    else:
        target_out = torch.empty((num_splits, batch, channels, n_q), device=q.device, dtype=torch.float32)
        target_lse = torch.empty((num_splits, *lse.shape), device=q.device, dtype=torch.float32)
        out_strides = target_out.stride()  # (split, batch, channel, token)

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * num_heads, num_splits)

    _forward_kernel[grid](
        q, k, v, temperature, q_rnorm, k_rnorm, target_out, target_lse,
        n_q, n_kv, num_heads, num_splits,
        q_sb, q_sc, q_st, k_sb, k_sc, k_st, v_sb, v_sc, v_st,
        0 if q.shape[0] == 1 else q_rnorm.stride(0), 0 if k.shape[0] == 1 else k_rnorm.stride(0),
        *out_strides, target_lse.stride(0),
        D=head_dim, DA=da, DB=db, DOT_PRECISION=_dot_precision(q.dtype, allow_tf32),
        FULL_Q=_full_blocks(n_q), FULL_KV=_full_blocks(n_kv),
    )
    if num_splits > 1:
        block_t, block_d = _small_tile(head_dim)
        _combine_splits_kernel[(triton.cdiv(n_q, block_t), batch * num_heads)](
            target_out, target_lse, out, lse, n_q, num_heads, num_splits,
            target_out.stride(0), target_out.stride(1), target_lse.stride(0), *_target_strides(out)[1:],
            D=head_dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse, q_rnorm, k_rnorm


def _reduce_splits(part, x, rnorm, out, num_heads: int, normalize: bool) -> None:
    """Sums the fp32 partials of a split backward pass into ``out`` (see _reduce_splits_kernel)."""
    _, _, channels, tokens = part.shape
    head_dim = channels // num_heads
    x, x_sb, x_sc, x_st = _token_strides(x)
    out_view, out_sb, out_sc, out_st = _token_strides(out)
    block_t, block_d = _small_tile(head_dim)
    _reduce_splits_kernel[(triton.cdiv(tokens, block_t), out.shape[0] * num_heads)](
        part, x, rnorm, out_view, tokens, num_heads, part.shape[0],
        part.stride(0), part.stride(1), x_sb, x_sc, x_st, out_sb, out_sc, out_st,
        D=head_dim, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )


def proxy_attention_backward(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm, num_heads: int, *,
                             allow_tf32: bool = False, kv_splits: int | None = None,
                             q_splits: int | None = None):
    """Returns (dq, dk, dv, dtemperature) for the forward's (out, lse, q_rnorm, k_rnorm).

    dq, dk, dv have the shapes, dtypes and layouts of q, k, v (a batch-1 input gets the batch sum);
    dtemperature the shape and dtype of temperature. ``kv_splits`` overrides how many programs
    share one key block's loop over queries (dk/dv), ``q_splits`` one query block's loop over
    keys (dq); tests use them to cover both paths on small shapes.
    """
    batch = max(q.shape[0], k.shape[0])
    batch_q, channels, height_q, width_q = q.shape
    batch_kv = k.shape[0]
    head_dim = channels // num_heads
    n_q, n_kv = height_q * width_q, k.shape[2] * k.shape[3]
    da, db = head_chunks(head_dim)
    device = q.device
    temperature_flat = temperature.reshape(-1)
    grad_out, do_sb, do_sc, do_st = _token_strides(grad_out)
    delta = _token_dot(grad_out, out, num_heads, inverse_norm=False)
    q, q_sb, q_sc, q_st = _token_strides(q)
    k, k_sb, k_sc, k_st = _token_strides(k)
    v, v_sb, v_sc, v_st = _token_strides(v)
    rq_sb = 0 if batch_q == 1 else q_rnorm.stride(0)
    rk_sb = 0 if batch_kv == 1 else k_rnorm.stride(0)
    common = dict(D=head_dim, DA=da, DB=db, DOT_PRECISION=_dot_precision(q.dtype, allow_tf32),
                  FULL_Q=_full_blocks(n_q), FULL_KV=_full_blocks(n_kv))
    strides = (q_sb, q_sc, q_st, k_sb, k_sc, k_st, v_sb, v_sc, v_st, rq_sb, rk_sb, do_sb, do_sc, do_st)
    rows = _nominal_rows(head_dim)

    # dk, dv: a key block's loop runs over the queries of every batch reading it.
    dk, dv = empty_in_layout_of(k, k.shape), empty_in_layout_of(v, v.shape)
    batches_per_kv = batch // batch_kv
    if kv_splits is None:
        kv_splits = _num_splits(triton.cdiv(n_kv, rows) * batch_kv * num_heads, n_q, batches_per_kv,
                                device, head_dim > 128)
    if kv_splits == 1:
        dk_target, dv_target, dk_strides, dv_strides = dk, dv, _target_strides(dk), _target_strides(dv)
    else:
        dk_target = torch.empty((kv_splits, batch_kv, channels, n_kv), device=device, dtype=torch.float32)
        dv_target = torch.empty_like(dk_target)
        dk_strides, dv_strides = dk_target.stride(), dv_target.stride()
    _backward_dkdv_kernel[lambda meta: (triton.cdiv(n_kv, meta["BLOCK_N"]), batch_kv * num_heads, kv_splits)](
        q, k, v, temperature_flat, q_rnorm, k_rnorm, grad_out, lse, delta, dk_target, dv_target,
        n_q, n_kv, num_heads, kv_splits, batches_per_kv, *strides, *dk_strides, *dv_strides,
        FINAL=kv_splits == 1, **common,
    )
    if kv_splits > 1:
        _reduce_splits(dk_target, k, k_rnorm, dk, num_heads, normalize=True)
        _reduce_splits(dv_target, v, k_rnorm, dv, num_heads, normalize=False)

    # dq and dtau: a query block's loop runs over the keys of every batch reading it.
    dq = empty_in_layout_of(q, q.shape)
    batches_per_q = batch // batch_q
    if q_splits is None:
        q_splits = _num_splits(triton.cdiv(n_q, rows) * batch_q * num_heads, n_kv, batches_per_q,
                               device, head_dim > 128)
    if q_splits == 1:
        dq_target, dq_strides = dq, _target_strides(dq)
    else:
        dq_target = torch.empty((q_splits, batch_q, channels, n_q), device=device, dtype=torch.float32)
        dq_strides = dq_target.stride()
    dtau_parts = torch.empty((q_splits, batch_q, num_heads, n_q), device=device, dtype=torch.float32)
    _backward_dq_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch_q * num_heads, q_splits)](
        q, k, v, temperature_flat, q_rnorm, k_rnorm, grad_out, lse, delta, dq_target, dtau_parts,
        n_q, n_kv, num_heads, q_splits, batches_per_q, *strides, *dq_strides, dtau_parts.stride(0),
        FINAL=q_splits == 1, **common,
    )
    if q_splits > 1:
        _reduce_splits(dq_target, q, q_rnorm, dq, num_heads, normalize=True)
    dtemperature = dtau_parts.sum(dim=(0, 1, 3)).to(temperature.dtype).reshape(temperature.shape)
    return dq, dk, dv, dtemperature
