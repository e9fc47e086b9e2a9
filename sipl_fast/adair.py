"""SIPL-AdaIR: AdaIR (frequency mining and modulation) with three Proxy Fusion sites.

The default constructor is the authors' AdaIR_ProxyFusion(decoder=True): 33,436,419
parameters (43,098 of them frozen, as in theirs) with their state_dict keys, so their
checkpoints load with strict=True. Widths the authors hard-coded are derived from the
configuration, so other configurations stay consistent.

The network: PromptIR's Restormer encoder (no prompts); in the decoder, at each of the levels
3, 2, 1 (1/8, 1/4, 1/2 resolution): the Proxy Fusion site (``sipl_fast.proxy_fusion``), then
AdaIR's frequency module ``fre{4 - level}`` guided by the input image, then the upsampling and
the skip.

Deliberate departures from the authors' released code, the same as SIPLPromptIR's:
- ``forward`` returns the image; ``encode`` returns the privileged features
  (enc_level2, enc_level3, latent), their ``return_feature=True``.
- ``forward(x, privileged_features=pf)`` runs the privileged pass (theirs needs a
  ``privileged_weights`` argument too, which it never reads).
- ``use_random_proxy`` mixes proxies only in training mode.
- The batch-1 dictionaries are broadcast, never repeated B times.
- Within one refinement call (no autograd), dictionary-only values are computed once
  (``sipl_fast.network.DictionaryCache``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .modules import ProxyAttention, Upsample, conv1x1, conv3x3, transformer_stack
from .network import RestorationNetwork

PRESETS = {
    "base": {},
    # Small enough to train on two CPU cores (tests, the demo).
    "tiny": dict(dim=16, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 8), train_patch=64),
}

# The frequency module after the Proxy Fusion site of each level (the authors' numbering).
FREQUENCY_MODULE = {3: "fre1", 2: "fre2", 1: "fre3"}


class ChannelCrossAttention(ProxyAttention):
    """AdaIR's channel cross-attention (``Chanel_Cross_Attention``): the projections of a Proxy
    Fusion attention (q from x; k, v from y) with MDTA's channel attention core (a c_h x c_h
    matrix per head over the pixels). x and y have one shape."""

    def attend(self, q: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k, v = keys
        return self.project_out(ops.transposed_attention(q, k, v, self.temperature, self.num_heads))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attend(self.project_query(x), self.project_keys(y))


class SpatialGate(nn.Module):
    """sigmoid(conv7x7([max_c x, mean_c x])): one weight per pixel."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))


class ChannelGate(nn.Module):
    """sigmoid(mlp(mean_hw x) + mlp(max_hw x)): one weight per channel (mlp: C -> C/16 -> C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(conv1x1(channels, channels // 16, bias=False), nn.ReLU(),
                                 conv1x1(channels // 16, channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True)))


class FreRefine(nn.Module):
    """AdaIR's frequency modulation: proj(low * spatial_gate(high) + high * channel_gate(low))."""

    def __init__(self, channels: int):
        super().__init__()
        self.SpatialGate = SpatialGate()      # the authors' attribute names (state_dict keys)
        self.ChannelGate = ChannelGate(channels)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.proj(low * self.SpatialGate(high) + high * self.ChannelGate(low))


class FreModule(nn.Module):
    """AdaIR's adaptive frequency learning block on a decoder map y, guided by the input image.

    The image, resized to y's size (bilinear) and embedded (conv1), is split by its 2-D spectrum
    into a low band and the rest (see :meth:`frequency_bands`). Each band queries y in a channel
    cross-attention (the authors' ``channel_cross_l`` takes the high band, ``channel_cross_h``
    the low one), FreRefine merges the two, y queries the merge (``channel_cross_agg``), and the
    block returns para1 * that + para2 * y.

    ``conv`` and ``score_gen`` are frozen and unused by the forward, as in the authors' module
    (kept for their state_dict keys); ``rate_conv`` is frozen (it only sets the band's size).
    """

    def __init__(self, channels: int, num_heads: int, bias: bool, in_channels: int, low_band_unit: int):
        super().__init__()
        self.low_band_unit = low_band_unit
        self.conv = conv3x3(in_channels, channels, bias=False)
        self.conv1 = conv3x3(in_channels, channels, bias=False)
        self.score_gen = nn.Conv2d(2, 2, kernel_size=7, padding=3)
        self.para1 = nn.Parameter(torch.zeros(channels, 1, 1))
        self.para2 = nn.Parameter(torch.ones(channels, 1, 1))
        self.channel_cross_l = ChannelCrossAttention(channels, num_heads, bias)
        self.channel_cross_h = ChannelCrossAttention(channels, num_heads, bias)
        self.channel_cross_agg = ChannelCrossAttention(channels, num_heads, bias)
        self.frequency_refine = FreRefine(channels)
        self.rate_conv = nn.Sequential(conv1x1(channels, channels // 8, bias=False), nn.GELU(),
                                       conv1x1(channels // 8, 2, bias=False))
        for frozen in (self.conv, self.score_gen, self.rate_conv):
            frozen.requires_grad_(False)

    def frequency_bands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low): magnitudes of the inverse transforms of x's spectrum outside and inside
        the low band, per channel.

        The low band of an h x w map holds the frequencies (u, v) with -a <= u < a and
        -b <= v < b (the authors' centred rectangle after an fftshift by (h // 2, w // 2)),
        where a = int((h // unit) * rate_h) and b = int((w // unit) * rate_w), with
        (rate_h, rate_w) = sigmoid(rate_conv(mean_hw x)) per image and unit = low_band_unit
        (the authors' n = 128). Below unit pixels in either side the band is empty whatever
        the image: high = |x| and low = 0 without a transform. (The rates are below 1, so below
        2 * unit pixels it is empty too unless a rate rounds to 1.) The transforms run in
        float32 at least (half-precision FFTs are limited to powers of two).
        """
        h, w = x.shape[-2:]
        rows, cols = h // self.low_band_unit, w // self.low_band_unit
        # The shortcut only while not traced: a traced size branch would fix the graph's sizes
        # (the general path below gives the same result, an all-zero band mask).
        if not torch.compiler.is_compiling() and (rows == 0 or cols == 0):
            return x.abs(), torch.zeros_like(x)
        rate = torch.sigmoid(self.rate_conv(F.adaptive_avg_pool2d(x.detach(), 1)))   # (B, 2, 1, 1)
        half_rows = (rows * rate[:, 0, 0, 0]).int()[:, None]                          # truncated, as theirs
        half_cols = (cols * rate[:, 1, 0, 0]).int()[:, None]
        u = torch.arange(h, device=x.device)
        v = torch.arange(w, device=x.device)
        in_rows = (u < half_rows) | (u >= h - half_rows)                               # (B, h)
        in_cols = (v < half_cols) | (v >= w - half_cols)                               # (B, w)
        spatial = x if x.dtype in (torch.float32, torch.float64) else x.float()
        band = (in_rows[:, :, None] & in_cols[:, None, :]).to(spatial.dtype)[:, None]  # (B, 1, h, w)
        low = torch.fft.ifft2(torch.fft.fft2(spatial, norm="forward") * band, norm="forward")
        high = spatial - low  # the inverse transform outside the band (the transform is linear)
        return high.abs().to(x.dtype), low.abs().to(x.dtype)

    def forward(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        image = F.interpolate(image, size=y.shape[-2:], mode="bilinear", align_corners=False)
        high, low = self.frequency_bands(self.conv1(image))
        high = self.channel_cross_l(high, y)
        low = self.channel_cross_h(low, y)
        merged = self.frequency_refine(low, high)
        return self.channel_cross_agg(y, merged) * self.para1 + y * self.para2


class SIPLAdaIR(RestorationNetwork):
    """AdaIR with Proxy Fusion (SIPL). See the module docstring."""

    PRESETS = PRESETS
    proxy_fusion = True

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, layernorm_type: str = "WithBias", train_patch: int = 128,
                 proxy_ffn_expansion_factor: float = 2.0, use_random_proxy: bool = False,
                 low_band_unit: int = 128):
        # The encoder and the Proxy Fusion sites (sipl_fast.network), then the decoder.
        super().__init__(dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                              num_blocks=num_blocks, num_refinement_blocks=num_refinement_blocks,
                              heads=heads, ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                              layernorm_type=layernorm_type, train_patch=train_patch,
                              proxy_ffn_expansion_factor=proxy_ffn_expansion_factor,
                              use_random_proxy=use_random_proxy, low_band_unit=low_band_unit))
        width = {k: self.width(k) for k in (0, 1, 2, 3)}
        stack = self.stack_options()
        for k, name in FREQUENCY_MODULE.items():
            setattr(self, name, FreModule(width[k], heads[2], bias, inp_channels, low_band_unit))

        # Decoder. Level k: Proxy Fusion, frequency module, upsample, join the skip, decode.
        self.up4_3 = Upsample(width[3])
        self.reduce_chan_level3 = conv1x1(2 * width[2], width[2], bias)
        self.decoder_level3 = transformer_stack(num_blocks[2], width[2], heads[2], **stack)
        self.up3_2 = Upsample(width[2])
        self.reduce_chan_level2 = conv1x1(2 * width[1], width[1], bias)
        self.decoder_level2 = transformer_stack(num_blocks[1], width[1], heads[1], **stack)
        self.up2_1 = Upsample(width[1])
        self.decoder_level1 = transformer_stack(num_blocks[0], width[1], heads[0], **stack)
        self.refinement = transformer_stack(num_refinement_blocks, width[1], heads[0], **stack)
        self.output = conv3x3(width[1], out_channels, bias)

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        dim, heads = config["dim"], config["heads"]
        if dim < 8:
            raise ValueError(f"dim must be at least 8 (the channel gates reduce 2*dim channels 16-fold), got {dim}")
        low_band_unit = config["low_band_unit"]
        if not isinstance(low_band_unit, int) or isinstance(low_band_unit, bool) or low_band_unit < 2:
            raise ValueError(f"low_band_unit must be an int >= 2, got {low_band_unit!r}")
        # Every (width, heads) pair an attention of the network splits.
        uses = {0: (heads[0],), 1: (heads[1], heads[0], heads[2]), 2: (heads[2], heads[1]),
                3: (heads[3], heads[0], heads[2])}
        for level, counts in uses.items():
            for count in counts:
                if (dim * 2 ** level) % count:
                    raise ValueError(f"heads: {dim * 2 ** level} channels (level {level}) do not split into "
                                     f"{count} heads")

    def decode_releasing(self, x: torch.Tensor, encoded: dict, privileged: list | None = None) -> torch.Tensor:
        feature = encoded.pop("latent")
        for k in (3, 2, 1):
            if k < 3:
                feature = getattr(self, f"decoder_level{k + 1}")(feature, inplace=True)
            feature = self.fuse_proxy(k, feature, privileged)
            feature = getattr(self, FREQUENCY_MODULE[k])(x, feature)
            feature = self.up_and_join(k, feature, encoded)
        return self.output_head(x, feature)

    decode_releasing.__doc__ = RestorationNetwork.decode_releasing.__doc__
