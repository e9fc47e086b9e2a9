"""The ``torch`` backend: the fastest pure-PyTorch formulation of both attentions.

- Proxy attention: q and k are scaled by the inverse of their per-token norms (the
  temperature folded into q's scale) and handed to ``scaled_dot_product_attention`` with
  ``scale=1``, so the Nq x Nkv matrix is left to SDPA's fused kernels; bf16 on the CPU without
  autograd runs the two products as bf16 GEMMs over pieces of queries instead
  (``attend_in_pieces``), where SDPA was no faster than in float32.
- Transposed attention: the Gram matrix q kᵀ is formed from the raw q and k and divided by
  the outer product of their norms afterwards, so no normalised copies of q and k are
  written (they are as large as the activations; the c_h x c_h matrix is tiny).
- Both read NCHW and channels-last storage through views and answer in the input's layout
  (channels-last makes oneDNN's CPU convolutions several times faster).
- The 1x1-then-depthwise projections keep only their input for the backward and recompute
  the 1x1 output (one GEMM) there; the gate keeps only its input for the backward
  (autograd of the plain expression also keeps gelu(a), as large as a) and LayerNorm2d
  normalises 16-bit maps in their own precision, so training under autocast holds no
  float32 copy of the residual stream. Without autograd the gate computes gelu on dense
  copies of the halves and the products in place.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F

from . import reference
from .eager import first_order_only
from .reference import NORMALIZE_EPS


def inverse_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1 / max(||x||, eps) along ``dim`` (kept), the divisor of F.normalize."""
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(NORMALIZE_EPS).reciprocal()


def row_norms(rows_: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """The L2 norms (or their squares) of the rows (..., N) of a rows() view. On unit-stride
    rows (NCHW) vector_norm reduces in one pass; on channels-last rows (stride C) the CPU's
    square-then-sum is faster than vector_norm at SIPL's level sizes. Under autograd
    the norms are vector_norm's: its gradient at a zero row is 0, sqrt's would be NaN."""
    if rows_.stride(-1) == 1 or (not squared and needs_autograd(rows_)):
        norms = torch.linalg.vector_norm(rows_, dim=-1)
        return norms.square() if squared else norms
    squares = rows_.square().sum(-1)
    return squares if squared else squares.sqrt()


def channels_innermost(x: torch.Tensor) -> bool:
    """Channels-last storage (or a channel slice of it): per-pixel channel vectors are contiguous."""
    return x.stride(1) == 1 and x.shape[1] > 1


def rows(x: torch.Tensor, num_heads: int, batch: int | None = None) -> torch.Tensor:
    """(B or 1, C, H, W) -> (batch, heads, C/heads, H*W) view of the channel rows, for NCHW or
    channels-last storage alike; a batch-1 side is broadcast (expand), never copied."""
    b, c, h, w = x.shape
    x = x.expand(batch or b, c, h, w)
    if channels_innermost(x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], h * w, num_heads, c // num_heads).permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], num_heads, c // num_heads, h * w)


def image(tokens: torch.Tensor, height: int, width: int, channels_last: bool) -> torch.Tensor:
    """(B, heads, N, d) token-major result -> (B, C, H, W), in the layout of the inputs."""
    b = tokens.shape[0]
    if channels_last:
        return tokens.transpose(1, 2).reshape(b, height, width, -1).permute(0, 3, 1, 2)
    return tokens.transpose(-1, -2).reshape(b, -1, height, width)


def _tokens(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, H*W, d) with unit stride over d, which SDPA's fused CPU and
    GPU kernels need (otherwise they fall back to materialising the attention matrix): a view
    for channels-last storage, one transposing copy for NCHW."""
    tokens = rows(x, num_heads).transpose(-1, -2)
    return tokens if tokens.stride(-1) == 1 else tokens.contiguous()


def proxy_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    batch = max(q.shape[0], k.shape[0])
    height, width = q.shape[-2:]
    channels_last = channels_innermost(q)
    q, k, v = (_tokens(t, num_heads) for t in (q, k, v))
    q = q * (inverse_norm(q) * temperature.reshape(1, num_heads, 1, 1).to(q.dtype))
    k = k * inverse_norm(k)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not needs_autograd(q, k, v):
        out = attend_in_pieces(q, k, v, batch)
    else:   # a batch-1 side is broadcast only now, after its own-size work (expand: no copy)
        out = F.scaled_dot_product_attention(*(t.expand(batch, -1, -1, -1) for t in (q, k, v)), scale=1.0)
    return image(out, height, width, channels_last)


# Logits per piece of attend_in_pieces (queries x keys x heads): one buffer of 8 MiB of bf16,
# the CPU's strip budget in elements (sipl_fast.modules.STRIP_ELEMENTS).
ATTENTION_PIECE_ELEMENTS = 1 << 22


def attend_in_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
    """softmax(q k^T) v of tokens (B or 1, heads, N, d) without autograd, by pieces of queries
    whose logits hold at most ATTENTION_PIECE_ELEMENTS. For bf16 on the CPU, where SDPA's fused
    kernel ran no faster than in float32 and the two products as bf16 GEMMs (float32
    accumulation) ran faster than it (docs/performance.md, "Refinement in bf16: speed and
    memory on the CPU"). One logits buffer serves every piece, its softmax computed in place (in float32 inside
    the kernel); logits and probabilities are rounded to the input dtype, as in the reference
    formulation. A batch-1 side is read for every image, never expanded (a broadcast operand
    of a batched product is copied per image)."""
    heads, queries, keys = q.shape[1], q.shape[2], k.shape[2]
    rows = min(queries, max(1, ATTENTION_PIECE_ELEMENTS // (heads * keys)))
    out = q.new_empty((batch, heads, queries, v.shape[-1]))
    buffer = q.new_empty(heads * rows * keys)
    for image_index in range(batch):
        q_i, k_i, v_i = (t[image_index if t.shape[0] > 1 else 0] for t in (q, k, v))
        keys_t = k_i.transpose(-2, -1)
        for top in range(0, queries, rows):
            count = min(rows, queries - top)
            logits = buffer[:heads * count * keys].view(heads, count, keys)   # dense for every count
            torch.bmm(q_i[:, top:top + count], keys_t, out=logits)
            torch.softmax(logits, dim=-1, out=logits)
            out[image_index, :, top:top + count] = torch.bmm(logits, v_i)
    return out


# Pixels per piece of the Gram product on CUDA (gram): a piece of 1024 pixels gives a ~53k-pixel
# strip at 96 channels 468 programs of cuBLAS's 32 x 32 tiles, a few per multiprocessor, where
# 4096-pixel pieces left half the schedulers idle (docs/design.md, "Refinement engine"). On the
# CPU one product is faster (MKL), so there it stays whole.
GRAM_PIECE_CUDA = 1024


# Pixels from which a bf16 Gram product on the CPU runs as one 2-D GEMM per matrix: at SIPL's
# strip sizes ATen's batched bf16 product was slower than torch.mm per matrix, below about 4096
# pixels faster (docs/performance.md, "Refinement in bf16: speed and memory on the CPU").
GRAM_MM_MIN_PIXELS = 4096


def _gram_per_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T as one torch.mm per matrix of the leading axes (q and k of one shape; the
    matrices are views, never copied)."""
    out = q.new_empty((*q.shape[:-1], k.shape[-2]))
    for index in itertools.product(*map(range, q.shape[:-2])):
        torch.mm(q[index], k[index].transpose(0, 1), out=out[index])
    return out


def gram(q: torch.Tensor, k: torch.Tensor, piece: int | None = None) -> torch.Tensor:
    """q k^T over the last axis (c x n times n x c), on CUDA as a batch of products over pieces
    of n (``piece`` pixels each: GRAM_PIECE_CUDA by default; one product on other devices and
    for 16-bit inputs, whose pieces would each be rounded to 16 bits before their sum).

    One c x c product with n in the tens of thousands gives a GEMM of a few output tiles
    that leaves most of a GPU idle; one product
    per piece of the pixels fills it, and the pieces' sum costs a few c x c additions.
    Under autograd the single product is kept: the batched one would save contiguous copies of
    the pieces for the backward (+0.5 GB in a 128x128 batch-8 training step)."""
    n = q.shape[-1]
    if (q.dtype == torch.bfloat16 and q.device.type == "cpu" and n >= GRAM_MM_MIN_PIXELS
            and not needs_autograd(q, k)):
        return _gram_per_matrix(q, k)
    if piece is None:
        piece = GRAM_PIECE_CUDA if q.is_cuda and q.element_size() >= 4 else n
    pieces = n // piece
    if pieces < 2 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return q @ k.transpose(-2, -1)
    even = pieces * piece
    split = lambda t: t[..., :even].unflatten(-1, (pieces, piece)).transpose(-3, -2)  # (..., pieces, c, piece)
    product = (split(q) @ split(k).transpose(-2, -1)).sum(-3)
    if even < n:
        product = product + q[..., even:] @ k[..., even:].transpose(-2, -1)
    return product


def channel_attention(gram_qk: torch.Tensor, norm_q: torch.Tensor, norm_k: torch.Tensor,
                      temperature: torch.Tensor) -> torch.Tensor:
    """MDTA's attention matrix per head, softmax over j of temperature * (q_i . k_j) /
    (max(|q_i|, eps) max(|k_j|, eps)), from the Gram matrix (B, heads, c, c) and the row norms
    (B, heads, c) of q and k (F.normalize's eps)."""
    inverse = lambda norm: norm.clamp_min(NORMALIZE_EPS).reciprocal()  # noqa: E731
    scale = inverse(norm_q)[..., :, None] * inverse(norm_k)[..., None, :] * temperature.reshape(1, -1, 1, 1)
    return (gram_qk * scale).softmax(dim=-1)


def mix_channels(attn: torch.Tensor, v_rows: torch.Tensor, height: int, width: int,
                 channels_last: bool) -> torch.Tensor:
    """A v for v's channel rows (B, heads, c, H*W), as a (B, C, H, W) map: the token-major
    product (v^T A^T), so that channels-last inputs give a channels-last output."""
    return image(v_rows.transpose(-2, -1) @ attn.to(v_rows.dtype).transpose(-2, -1), height, width, channels_last)


def transposed_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    height, width = q.shape[-2:]
    channels_last = channels_innermost(q)
    q, k, v = (rows(t, num_heads) for t in (q, k, v))
    attn = channel_attention(gram(q, k), row_norms(q), row_norms(k), temperature)
    return mix_channels(attn, v, height, width, channels_last)


def _autocast_off(device_type: str):
    """Autocast disabled within the block; a no-op where it is off already (entering an
    autocast context costs about 4 us of CPU per call, and LayerNorm2d runs per strip)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def layer_norm_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """LayerNorm2d's output dtype (torch and triton backends): a 16-bit x keeps its dtype,
    otherwise the promoted dtype of x and the parameters (the reference always promotes)."""
    if x.element_size() == 2:
        return x.dtype
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def layer_norm2d(x, weight, bias, eps: float) -> torch.Tensor:
    if bias is None:  # BiasFree: not centred, so not F.layer_norm; mean pass, then one product
        centred_var = (x - x.mean(1, keepdim=True)).square().mean(1, keepdim=True)
        return x * torch.rsqrt(centred_var + eps) * weight.view(1, -1, 1, 1)
    # WithBias is F.layer_norm over the channel axis of the (B, H, W, C) view: its fused kernel
    # (statistics and affine in one pass; a fused backward) runs in place on channels-last
    # storage, and costs one transposing copy each way for NCHW, which is still several times
    # faster than the separate passes of the reference formulation.
    # F.layer_norm wants one dtype. A 16-bit map (autocast) is normalised in its own dtype
    # (statistics in float32 inside the kernel): promoting it to the float32 parameters, as
    # the reference formulation does, would keep a float32 copy of it for the backward; the
    # consumers are convolutions that autocast runs in 16 bits anyway.
    # (Autocast would cast to float32 inside F.layer_norm, which it runs in float32: off here.)
    dtype = layer_norm_dtype(x, weight, bias)
    x = x.to(dtype)
    with _autocast_off(x.device.type):
        out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight.to(dtype), bias.to(dtype), eps)
    out = out.permute(0, 3, 1, 2)
    return out if channels_innermost(x) else out.contiguous()


class _GatedGelu(torch.autograd.Function):
    """gelu(a) * b (dual: + gelu(b) * a) for x = [a, b] on the channel axis; saves only x.

    The backward recomputes gelu and applies its slope with ATen's fused gelu_backward, in the
    order the reference's autograd uses (the same rounding in 16 bits): five fused passes
    (nine for the dual gate) instead of a pass per term of the slope."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dual: bool) -> torch.Tensor:
        ctx.dual = dual
        ctx.save_for_backward(x)
        return reference.gated_gelu(x, dual)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        a, b = x.chunk(2, dim=1)
        grad = grad.to(x.dtype)
        grad_a = torch.ops.aten.gelu_backward(grad * b, a)
        grad_b = grad * F.gelu(a)
        if ctx.dual:
            grad_a += grad * F.gelu(b)
            grad_b += torch.ops.aten.gelu_backward(grad * a, b)
        return torch.cat([grad_a, grad_b], dim=1), None


def _dense_gelu(half: torch.Tensor) -> torch.Tensor:
    """gelu of a channel half as a new dense map: a half of channels-last storage is first
    copied dense, then gelu runs in place over one flat run. On the half itself ATen's CPU
    kernel would run per pixel over h channels, and where h is not a multiple of the vector
    width (SIPL's 127, 255 and 510 channels) compute the rest of every run one element at a
    time (docs/performance.md, "Refinement in bf16: speed and memory on the CPU")."""
    if half.is_contiguous() or half.is_contiguous(memory_format=torch.channels_last):
        return F.gelu(half)
    return torch.ops.aten.gelu_(half.clone())   # clone keeps the layout and makes it dense


def _gate_without_autograd(x: torch.Tensor, dual: bool) -> torch.Tensor:
    """reference.gated_gelu without autograd: gelu over dense copies of the halves, the
    products written into the gelu's own buffer."""
    a, b = x.chunk(2, dim=1)
    gelu_a = _dense_gelu(a)
    if not dual:
        return gelu_a.mul_(b)
    return _dense_gelu(b).mul_(a).addcmul_(gelu_a, b)   # gelu(b) a + gelu(a) b, the reference's order


def gated_gelu(x: torch.Tensor, dual: bool) -> torch.Tensor:
    if needs_autograd(x):
        return _GatedGelu.apply(x, dual)
    if torch.compiler.is_compiling():   # the compiler fuses the plain expression into one pass
        return reference.gated_gelu(x, dual)
    return _gate_without_autograd(x, dual)


class TorchDepthwise:
    """The depthwise 3x3 convolution (padding 1) of pointwise_depthwise, by ATen: the forward
    and the backward that _PointwiseDepthwise calls (the triton backend supplies its own)."""

    @staticmethod
    def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(hidden, weight, bias, padding=1, groups=weight.shape[0])

    @staticmethod
    def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                 needs: tuple[bool, bool, bool]):
        """(d hidden, d weight, d bias), each None where not needed, in hidden's dtype."""
        channels = weight.shape[0]
        return torch.ops.aten.convolution_backward(
            grad.to(hidden.dtype), hidden, weight.to(hidden.dtype), [channels] if has_bias else None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], channels, list(needs))


class _PointwiseDepthwise(torch.autograd.Function):
    """depthwise3x3(conv1x1(x)) saving x alone: the 1x1 output, the widest map of a block, is
    recomputed in the backward (a GEMM) instead of kept, and the depthwise convolution is not
    run again (its backward takes its input directly). ``depthwise`` computes the depthwise
    convolution and its backward (TorchDepthwise, or the triton backend's kernels)."""

    @staticmethod
    def forward(ctx, x, pointwise, pointwise_bias, depthwise, depthwise_bias, depthwise_impl):
        hidden = F.conv2d(x, pointwise, pointwise_bias)  # autocast, when on, picks the dtype
        ctx.compute_dtype = hidden.dtype
        ctx.depthwise_bias = depthwise_bias is not None
        ctx.depthwise_impl = depthwise_impl
        ctx.save_for_backward(x, pointwise, pointwise_bias, depthwise)
        return depthwise_impl.forward(hidden, depthwise, depthwise_bias)

    @staticmethod
    @first_order_only("pointwise_depthwise")
    def backward(ctx, grad):
        x, pointwise, pointwise_bias, depthwise = ctx.saved_tensors
        dtype, needs = ctx.compute_dtype, ctx.needs_input_grad
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        x16, pointwise16 = cast(x), cast(pointwise)
        with _autocast_off(x.device.type):
            hidden = F.conv2d(x16, pointwise16, cast(pointwise_bias))
            grad_hidden, grad_depthwise, grad_depthwise_bias = ctx.depthwise_impl.backward(
                grad, hidden, depthwise, ctx.depthwise_bias, (any(needs[:3]), needs[3], needs[4]))
            del hidden
            grad_x = grad_pointwise = grad_pointwise_bias = None
            if grad_hidden is not None:
                grad_x, grad_pointwise, grad_pointwise_bias = torch.ops.aten.convolution_backward(
                    grad_hidden.to(dtype), x16, pointwise16,
                    [pointwise.shape[0]] if pointwise_bias is not None else None,
                    [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [needs[0], needs[1], needs[2]])
        like = lambda g, t: None if g is None or t is None else g.to(t.dtype)  # noqa: E731
        return (like(grad_x, x), like(grad_pointwise, pointwise), like(grad_pointwise_bias, pointwise_bias),
                like(grad_depthwise, depthwise), like(grad_depthwise_bias, depthwise), None)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias,
                        depthwise_impl=TorchDepthwise) -> torch.Tensor:
    if needs_autograd(x, pointwise, pointwise_bias, depthwise, depthwise_bias):
        return _PointwiseDepthwise.apply(x, pointwise, pointwise_bias, depthwise, depthwise_bias, depthwise_impl)
    return depthwise_impl.forward(F.conv2d(x, pointwise, pointwise_bias), depthwise, depthwise_bias)


def pointwise_depthwise_gate(x, pointwise, pointwise_bias, depthwise, depthwise_bias, dual: bool) -> torch.Tensor:
    # the 1x1 output is freed inside pointwise_depthwise, before the gate's temporaries exist
    return gated_gelu(pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias), dual)
