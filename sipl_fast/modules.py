"""Building blocks of SIPL-PromptIR, each written once (docs/faithfulness.md lists them).

Attribute names follow the authors' modules so that state_dict keys are identical and their
checkpoints load with strict=True. The attention cores, the norm and the feed-forward gate go
through :mod:`sipl_fast.ops`, so the active backend (reference / torch / triton) decides how
they are computed.
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backends import resolve_backend
from .ops import torch_impl

LAYERNORM_TYPES = ("WithBias", "BiasFree")


# Elements a strip may hold alive at once (its intermediates together) when blocks are
# ``streaming``: 16 MiB of float32 on the CPU (cache-sized), 192 MiB on a GPU. Smaller strips
# mean less memory and more, smaller kernels; docs/design.md ("Strips") has the sweep that
# chose these. ``strip_budget`` (``Refiner(strip_elements=...)``) overrides both in a block.
STRIP_ELEMENTS = {"cpu": 1 << 22, "cuda": 12 << 22}
_strip_override = threading.local()


@contextlib.contextmanager
def strip_budget(elements: int | None):
    """Within the block (in this thread), strips hold at most ``elements`` elements alive at
    once on every device; ``None`` keeps the per-device defaults of STRIP_ELEMENTS."""
    if elements is not None and (isinstance(elements, bool) or not isinstance(elements, int) or elements < 1):
        raise ValueError(f"strip_elements must be a positive int or None, got {elements!r}")
    outer = getattr(_strip_override, "elements", None)
    _strip_override.elements = elements if elements is not None else outer
    try:
        yield
    finally:
        _strip_override.elements = outer


def strip_elements(device_type: str) -> int:
    """The strip budget in elements for maps on ``device_type`` (the innermost strip_budget)."""
    override = getattr(_strip_override, "elements", None)
    return override if override is not None else STRIP_ELEMENTS.get(device_type, STRIP_ELEMENTS["cuda"])


def streaming(x: torch.Tensor) -> bool:
    """Whether blocks may run strip-wise and overwrite maps they own: autograd is off, the
    backend is not ``reference`` and torch.compile is not tracing. The reference backend keeps
    the structure of the authors' eager code too (whole maps, a new tensor for every sum): it
    is the baseline the benchmarks compare against and the oracle of the tests. Under
    torch.compile the compiler plans memory and fuses; unrolled strips would only multiply
    the graph (a tiny model at 48x40 took 441 s to compile with them, on two CPU cores)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and resolve_backend(x.device) != "reference")


def strip_rows(x: torch.Tensor, live_channels: int) -> int | None:
    """Rows per strip for a strip-local fn that holds live_channels per pixel alive at its
    peak (all its intermediates together), or None where x goes whole (not ``streaming``,
    or the image fits in one strip)."""
    if not streaming(x):  # first: on symbolic sizes (torch.export) the comparison below would add a guard
        return None
    b, _, h, w = x.shape
    rows = strip_elements(x.device.type) // max(1, b * live_channels * w)
    return None if rows >= h else max(rows, 1)


def strip_bounds(height: int, rows: int):
    """(lo, hi, top, bottom): output rows [top, bottom) of a strip, from input rows [lo, hi)
    (a one-row halo above and below: exact for pixel-local and 3x3 layers)."""
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        yield max(top - 1, 0), min(bottom + 1, height), top, bottom


def in_strips(fn, x: torch.Tensor, out_channels: int, live_channels: int) -> torch.Tensor:
    """fn(x) for a fn made of pixel-local and 3x3 layers, in horizontal strips when autograd is
    off and its intermediates (live_channels per pixel at its peak) would exceed
    the strip budget, so that they never exist for the whole image at once."""
    rows = strip_rows(x, live_channels)
    if rows is None:
        return fn(x)
    b, _, h, w = x.shape
    out = torch.empty((b, out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    for lo, hi, top, bottom in strip_bounds(h, rows):
        out[..., top:bottom, :] = fn(x[..., lo:hi, :])[..., top - lo:bottom - lo, :]
    return out


def _residual(x: torch.Tensor, branch: torch.Tensor, inplace: bool) -> torch.Tensor:
    """x + branch, into x when the caller owns x and blocks are ``streaming``."""
    return x.add_(branch) if inplace and streaming(x) else x + branch


def convolution_precision(x: torch.Tensor):
    """A context in which cuBLAS computes float32 products on ``x``'s device at the precision
    torch gives float32 convolutions: TF32 where convolutions may use it (convolutions_use_tf32;
    torch's default), whatever torch.backends.cuda.matmul.allow_tf32 says. For GEMMs that stand in
    for 1x1 convolutions (ChannelMix): the authors' project_out is an nn.Conv2d, which cuDNN
    runs in TF32 by default, while the same product through cuBLAS would run on the CUDA cores
    in full float32 (docs/design.md, "Precision"). The matmul flag is process-wide: it is set for the block and restored after it."""
    if not (x.is_cuda and x.dtype == torch.float32):
        return contextlib.nullcontext()
    wanted = convolutions_use_tf32()
    if torch.backends.cuda.matmul.allow_tf32 == wanted:
        return contextlib.nullcontext()
    return matmul_tf32(wanted)


# The convolutions' precision settings, most specific first (None: a torch before that API).
_CONV_PRECISION_LEVELS = (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
if any(not hasattr(level, "fp32_precision") for level in _CONV_PRECISION_LEVELS):
    _CONV_PRECISION_LEVELS = None


def convolutions_use_tf32() -> bool:
    """Whether torch lets cuDNN run float32 convolutions in TF32. Read from the precision API
    (torch.backends.cudnn.conv.fp32_precision, then its parents where it says "none"), which
    answers in every state: the legacy torch.backends.cudnn.allow_tf32 raises once a user has
    set the convolutions' precision apart from the RNNs' with that API."""
    if _CONV_PRECISION_LEVELS is None:
        return torch.backends.cudnn.allow_tf32
    for level in _CONV_PRECISION_LEVELS:
        if level.fp32_precision != "none":
            return level.fp32_precision == "tf32"
    return False


@contextlib.contextmanager
def matmul_tf32(allowed: bool):
    """torch.backends.cuda.matmul.allow_tf32 = ``allowed`` within the block, restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class ChannelMix(NamedTuple):
    """The 1x1 mix that ends a residual branch: per pixel, a (Co, Ci) matrix times the channels
    (+ bias). weight is a 1x1 convolution's (Co, Ci, 1, 1), shared by the images, or
    (B, Co, Ci), one matrix per image."""
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] if self.weight.dim() == 4 else self.weight.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The mix as a new map; a convolution's weight goes in as it is, so that autograd gives
        its gradient the weight's strides (DDP's buckets expect them)."""
        if self.weight.dim() == 4:
            return F.conv2d(x, self.weight, self.bias)
        return self.add_into(x.new_zeros((x.shape[0], self.weight.shape[1], *x.shape[2:])), x)

    def add_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out += mix(x), in place: one GEMM per batch whose epilogue reads and writes out, so
        the branch never becomes a map of its own (a convolution and an add would write it and
        read it back: two of the five passes over C channels)."""
        b, co, h, w = out.shape
        matrix = self.weight.flatten(1) if self.weight.dim() == 4 else self.weight
        matrix = (matrix if matrix.dtype == out.dtype else matrix.to(out.dtype)).expand(b, co, -1)
        x = x if x.dtype == out.dtype else x.to(out.dtype)
        with convolution_precision(out):
            if h > 1 and out.stride(2) != w * out.stride(3):  # a column crop: its pixels are no matrix
                out.add_(torch.einsum("boi,bihw->bohw", matrix, x))
            elif torch_impl.channels_innermost(out):  # pixel-major rows of channels: out_t += x_t M^T
                out.permute(0, 2, 3, 1).view(b, h * w, co).baddbmm_(
                    x.permute(0, 2, 3, 1).reshape(b, h * w, -1), matrix.transpose(1, 2))
            else:
                out.view(b, co, h * w).baddbmm_(matrix, x.reshape(b, -1, h * w))
        if self.bias is not None:
            out.add_(self.bias.to(out.dtype).view(1, -1, 1, 1))
        return out


def add_in_strips(prepare, mix: ChannelMix, x: torch.Tensor, live_channels: int, inplace: bool) -> torch.Tensor:
    """x + mix(prepare(x)) for a strip-local ``prepare`` (pixel-local and 3x3 layers) whose
    intermediates hold live_channels per pixel at their peak; in strips as in_strips. The mix
    is added into the sum's rows in place (ChannelMix.add_into), so each strip's residual
    costs no pass of its own. With ``inplace`` (x owned by the caller) the sum overwrites x:
    each strip is added only after the next strip has read its halo row from the original
    x, so no second copy of x is needed."""
    if not streaming(x):
        return x + mix(prepare(x))
    out = x if inplace else x.clone()
    pending_channels = mix.in_channels  # the previous strip's prepared rows, not yet added
    rows = strip_rows(x, live_channels + pending_channels)
    if rows is None:
        return mix.add_into(out, prepare(x))
    pending = None
    for lo, hi, top, bottom in strip_bounds(x.shape[-2], rows):
        prepared = prepare(x[..., lo:hi, :])[..., top - lo:bottom - lo, :]
        if pending is not None:
            mix.add_into(out[..., pending[0]:pending[1], :], pending[2])
        pending = (top, bottom, prepared)
    mix.add_into(out[..., pending[0]:pending[1], :], pending[2])
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored so (and not trivially both), else contiguous (NCHW)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def pointwise_then_depthwise(pointwise: nn.Conv2d, depthwise: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """depthwise(pointwise(x)) through ops.pointwise_depthwise (training keeps only x)."""
    return ops.pointwise_depthwise(x, pointwise.weight, pointwise.bias, depthwise.weight, depthwise.bias)


def conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


def conv3x3(cin: int, cout: int, bias: bool, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, groups=groups, bias=bias)


def depthwise3x3(channels: int, bias: bool) -> nn.Conv2d:
    return conv3x3(channels, channels, bias, groups=channels)


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels of an NCHW map, eps 1e-5 (with or without bias)."""

    def __init__(self, channels: int, with_bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels)) if with_bias else None)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm2d(x, self.weight, self.bias, self.eps)


class ChannelNorm(nn.Module):
    """The authors' ``LayerNorm(dim, LayerNorm_type)``; the ``body`` level keeps their keys."""

    def __init__(self, channels: int, layernorm_type: str):
        super().__init__()
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.body = LayerNorm2d(channels, with_bias=layernorm_type == "WithBias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GatedFFN(nn.Module):
    """Gated-Dconv feed-forward: 1x1 up to 2 hidden, depthwise 3x3, gate, 1x1 down.

    dual=False is Restormer's GDFN (gelu(a) * b); dual=True is the DualGate FFN of the Proxy
    Fusion blocks (gelu(b) * a + gelu(a) * b).
    """

    def __init__(self, dim: int, expansion: float, bias: bool, dual: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.dual = dual
        self.project_in = conv1x1(dim, hidden * 2, bias)
        self.dwconv = depthwise3x3(hidden * 2, bias)
        self.project_out = conv1x1(hidden, dim, bias)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        return ops.pointwise_depthwise_gate(x, self.project_in.weight, self.project_in.bias,
                                            self.dwconv.weight, self.dwconv.bias, self.dual)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self._gated(x))

    def _live_channels(self) -> int:
        """Per pixel alive at _gated's peak: the pointwise and depthwise outputs together."""
        return 2 * self.project_in.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_strips(self._dense, x, x.shape[1], self._live_channels())

    def add_to(self, x: torch.Tensor, norm: nn.Module, inplace: bool = False) -> torch.Tensor:
        """x + ffn(norm(x)), in strips when ``streaming`` (in place on x with ``inplace``)."""
        project_out = ChannelMix(self.project_out.weight, self.project_out.bias)
        return add_in_strips(lambda part: self._gated(norm(part)), project_out, x,
                             x.shape[1] + self._live_channels(), inplace)


class TransposedAttention(nn.Module):
    """MDTA: channel attention with a c_h x c_h attention matrix per head."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = depthwise3x3(dim * 3, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_then_depthwise(self.qkv, self.qkv_dwconv, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.qkv.out_channels
        q, k, v = in_strips(self._project, x, width, 2 * width).chunk(3, dim=1)
        return self.project_out(ops.transposed_attention(q, k, v, self.temperature, self.num_heads))

    def add_to(self, x: torch.Tensor, norm: nn.Module, inplace: bool = False) -> torch.Tensor:
        """x + attn(norm(x)). Without autograd, on an image wider than a strip, streamed in two
        passes over strips of x so that q, k and v never exist whole: the first accumulates
        the Gram matrix and the row norms of q and k (the attention matrix needs only those),
        the second projects v, mixes it and adds the result (in place on x with ``inplace``)."""
        dim = x.shape[1]
        rows = strip_rows(x, 5 * dim)  # the normed strip, the pointwise and depthwise q and k
        if rows is None:  # one piece (never strips of the attention itself: it is global)
            return _residual(x, self(norm(x)), inplace)
        mix = self._output_mix(self._attention_matrix(x, norm, rows))
        values = lambda part: self._projected_channels(norm(part), 2 * dim, dim)  # noqa: E731
        # alive per strip: the normed strip and v's 1x1 and depthwise outputs
        return add_in_strips(values, mix, x, 3 * dim, inplace)

    def _projected_channels(self, x: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Channels [first, first + count) of qkv_dwconv(qkv(x)), computing only those."""
        part = slice(first, first + count)
        bias = lambda conv: conv.bias[part] if conv.bias is not None else None  # noqa: E731
        return ops.pointwise_depthwise(x, self.qkv.weight[part], bias(self.qkv),
                                       self.qkv_dwconv.weight[part], bias(self.qkv_dwconv))

    def _attention_matrix(self, x: torch.Tensor, norm: nn.Module, rows: int) -> torch.Tensor:
        """The attention matrix per head from strips of x: the Gram matrix and row norms of q
        and k accumulated strip by strip."""
        b, dim, h, _ = x.shape
        heads = self.num_heads
        accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = dim // heads
        gram = torch.zeros(b, heads, c, c, device=x.device, dtype=accumulate)
        squares = torch.zeros(b, 2 * heads, c, device=x.device, dtype=accumulate)  # |q_i|^2 heads, then |k_j|^2
        for lo, hi, top, bottom in strip_bounds(h, rows):
            qk = self._projected_channels(norm(x[..., lo:hi, :]), 0, 2 * dim)[..., top - lo:bottom - lo, :]
            qk_rows = torch_impl.rows(qk, 2 * heads)  # q's heads, then k's
            if qk.is_cuda:   # the Gram product runs in pieces (torch_impl.gram), each summed in float32
                qk_rows = qk_rows.to(accumulate)
            # On the CPU each strip's products run in the map's dtype (a 16-bit GEMM accumulates
            # in float32 and rounds its result once) and are summed over the strips in float32:
            # a float32 copy of a 16-bit strip would cost a pass over it and its memory.
            gram += torch_impl.gram(qk_rows[:, :heads], qk_rows[:, heads:])
            squares += torch_impl.row_norms(qk_rows, squared=True)  # q and k in one reduction (launches)
        norms = squares.sqrt()
        return torch_impl.channel_attention(gram, norms[:, :heads], norms[:, heads:], self.temperature)

    def _output_mix(self, attn: torch.Tensor) -> ChannelMix:
        """project_out after the attention as one (C, C) matrix per image: project_out(A v)
        = (W A) v, so each strip's values take one product instead of two and no A v map."""
        b, heads, c, _ = attn.shape
        weight = self.project_out.weight.reshape(-1, heads, c).to(attn.dtype)
        return ChannelMix(torch.einsum("ohi,bhij->bohj", weight, attn).reshape(b, heads * c, heads * c),
                          self.project_out.bias)


class TransformerBlock(nn.Module):
    """Restormer block: x + MDTA(LN(x)), then + GDFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.norm1 = ChannelNorm(dim, layernorm_type)
        self.attn = TransposedAttention(dim, num_heads, bias)
        self.norm2 = ChannelNorm(dim, layernorm_type)
        self.ffn = GatedFFN(dim, ffn_expansion_factor, bias, dual=False)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace`` (honoured only when ``streaming``): x is the caller's to overwrite."""
        if not streaming(x):
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        x = self.attn.add_to(x, self.norm1, inplace)
        return self.ffn.add_to(x, self.norm2, inplace=True)  # x is now ours either way


class BlockStack(nn.Sequential):
    """Transformer blocks in sequence. Without autograd only the first block allocates a new
    map (none with ``inplace``); the rest update it in place."""

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        for index, block in enumerate(self):
            x = block(x, inplace=inplace or index > 0)
        return x


def transformer_stack(depth: int, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                      layernorm_type: str) -> nn.Sequential:
    return BlockStack(*[TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, layernorm_type)
                        for _ in range(depth)])


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, bias: bool = False):
        super().__init__()
        self.proj = conv3x3(in_channels, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """C -> 2C at half resolution: 3x3 conv to C/2, then pixel-unshuffle."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels // 2, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """C -> C/2 at double resolution: 3x3 conv to 2C, then pixel-shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels * 2, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PromptGenBlock(nn.Module):
    """PromptIR's prompt: a softmax-weighted sum of L learned maps, resized, then a 3x3 conv."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = conv3x3(prompt_dim, prompt_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, L)
        # Weighted sum over the bank without materialising it B times.
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # Follow the feature map's memory layout, so that concatenating the two keeps it.
        return self.conv3x3(prompt.contiguous(memory_format=memory_format_of(x)))


class ProxyAttention(nn.Module):
    """The spatial cross-attention of a Proxy Fusion block ("XAttn" in the authors' code).

    Split into its query projection, key/value projection and the attention proper, so a
    side that does not change (a dictionary at inference) can be projected once and reused.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kv = conv1x1(dim, dim * 2, bias)
        self.kv_dwconv = depthwise3x3(dim * 2, bias)
        self.q = conv1x1(dim, dim, bias)
        self.q_dwconv = depthwise3x3(dim, bias)
        self.project_out = conv1x1(dim, dim, bias)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_then_depthwise(self.q, self.q_dwconv, x)

    def project_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = pointwise_then_depthwise(self.kv, self.kv_dwconv, x).chunk(2, dim=1)
        return k, v

    def attend(self, q: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k, v = keys
        return self.project_out(ops.proxy_attention(q, k, v, self.temperature, self.num_heads))


class QuerySide(NamedTuple):
    """The query half of a Proxy Fusion block, ready for attention."""
    residual: torch.Tensor       # normalised query at attention width (the block's residual)
    stable: torch.Tensor | None  # channels beyond the attention width (feat_dim > prompt_dim)
    q: torch.Tensor              # projected query


class ProxyFusionBlock(nn.Module):
    """The authors' prompt-interaction block (CrossTransformerRestormer_Block_PIM).

    Both inputs are LayerNorm-ed; the residual is the *normalised* query; attention runs at
    the key/value width (prompt_dim) with channel alignment when the widths differ; then a
    DualGate FFN at the query width. ``forward(x_q, x_kv)`` is ``fuse(prepare_query(x_q),
    prepare_keys(x_kv))``; the halves are public so constant inputs can be prepared once.
    """

    def __init__(self, feat_dim: int, prompt_dim: int, num_heads: int, ffn_expansion_factor: float,
                 bias: bool, layernorm_type: str):
        super().__init__()
        self.feat_dim, self.prompt_dim = feat_dim, prompt_dim
        self.norm11 = ChannelNorm(feat_dim, layernorm_type)
        self.norm12 = ChannelNorm(prompt_dim, layernorm_type)
        self.attn = ProxyAttention(prompt_dim, num_heads, bias)
        if feat_dim < prompt_dim:
            self.reduce_channel = conv1x1(prompt_dim, feat_dim, bias=False)
        self.norm2 = ChannelNorm(feat_dim, layernorm_type)
        self.ffn = GatedFFN(feat_dim, ffn_expansion_factor, bias, dual=True)

    def prepare_query(self, x_q: torch.Tensor) -> QuerySide:
        x = self.norm11(x_q)
        stable = None
        if self.feat_dim > self.prompt_dim:
            x, stable = x.split([self.prompt_dim, self.feat_dim - self.prompt_dim], dim=1)
        elif self.feat_dim < self.prompt_dim:
            x = F.pad(x, (0, 0, 0, 0, 0, self.prompt_dim - self.feat_dim))  # zero channels
        return QuerySide(x, stable, self.attn.project_query(x))

    def prepare_keys(self, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.project_keys(self.norm12(x_kv))

    def fuse(self, query: QuerySide, keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        y = query.residual + self.attn.attend(query.q, keys)
        if query.stable is not None:
            y = torch.cat([y, query.stable.expand(y.shape[0], -1, -1, -1)], dim=1)
        elif self.feat_dim < self.prompt_dim:
            y = self.reduce_channel(y)
        return self.ffn.add_to(y, self.norm2, inplace=True)  # y is new here

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.prepare_query(x_q), self.prepare_keys(x_kv))
