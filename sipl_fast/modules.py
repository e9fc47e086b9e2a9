"""Building blocks of SIPL-PromptIR (SPEC.md section 1.2), each written once.

Attribute names follow the authors' modules so that state_dict keys are identical and their
checkpoints load with strict=True. The attention cores, the norm and the feed-forward gate go
through :mod:`sipl_fast.ops`, so the active backend (reference / torch / triton) decides how
they are computed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

LAYERNORM_TYPES = ("WithBias", "BiasFree")


# Elements of the widest intermediate per strip when a block runs without autograd (see
# in_strips): about 8 MiB of float32 on the CPU, 128 MiB on a GPU.
STRIP_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def in_strips(fn, x: torch.Tensor, out_channels: int, widest_channels: int) -> torch.Tensor:
    """fn(x) for a fn made of pixel-local and 3x3 layers, in horizontal strips when autograd is
    off and its widest intermediate (widest_channels per pixel) would exceed STRIP_ELEMENTS.

    Each strip carries a one-row halo above and below, so the result is exact; the
    intermediates then never exist for the whole image at once.
    """
    b, _, h, w = x.shape
    rows = STRIP_ELEMENTS.get(x.device.type, STRIP_ELEMENTS["cuda"]) // max(1, b * widest_channels * w)
    if torch.is_grad_enabled() or rows >= h:
        return fn(x)
    rows = max(rows, 1)
    out = torch.empty((b, out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    for top in range(0, h, rows):
        bottom = min(top + rows, h)
        lo, hi = max(top - 1, 0), min(bottom + 1, h)
        out[..., top:bottom, :] = fn(x[..., lo:hi, :])[..., top - lo:bottom - lo, :]
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored so (and not trivially both), else contiguous (NCHW)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(ops.gated_gelu(self.dwconv(self.project_in(x)), self.dual))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_strips(self._dense, x, x.shape[1], self.project_in.out_channels)


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
        return self.qkv_dwconv(self.qkv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.qkv.out_channels
        q, k, v = in_strips(self._project, x, width, width).chunk(3, dim=1)
        return self.project_out(ops.transposed_attention(q, k, v, self.temperature, self.num_heads))


class TransformerBlock(nn.Module):
    """Restormer block: x + MDTA(LN(x)), then + GDFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.norm1 = ChannelNorm(dim, layernorm_type)
        self.attn = TransposedAttention(dim, num_heads, bias)
        self.norm2 = ChannelNorm(dim, layernorm_type)
        self.ffn = GatedFFN(dim, ffn_expansion_factor, bias, dual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stack(depth: int, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                      layernorm_type: str) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, num_heads, ffn_expansion_factor, bias, layernorm_type)
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
    """The spatial cross-attention of a Proxy Fusion block ("XAttn", SPEC 1.2).

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
        return self.q_dwconv(self.q(x))

    def project_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_dwconv(self.kv(x)).chunk(2, dim=1)
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
    """The authors' prompt-interaction block (CrossTransformerRestormer_Block_PIM, SPEC 1.2/1.5).

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
        return y + self.ffn(self.norm2(y))

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.prepare_query(x_q), self.prepare_keys(x_kv))
