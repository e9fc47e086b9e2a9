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
  (``sipl_fast.model.DictionaryCache``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .model import LEVELS, DictionaryCache, Encoded, _is_int
from .modules import (LAYERNORM_TYPES, Downsample, OverlapPatchEmbed, ProxyAttention, Upsample, conv1x1, conv3x3,
                      transformer_stack)
from .proxy_fusion import ProxyFusion

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
        if rows == 0 or cols == 0:
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


def _check_config(*, inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads,
                  ffn_expansion_factor, train_patch, proxy_ffn_expansion_factor, low_band_unit) -> None:
    """ValueError naming the first value no network can be built from (before any allocation)."""
    for name, value in (("inp_channels", inp_channels), ("out_channels", out_channels), ("dim", dim),
                        ("train_patch", train_patch)):
        if not _is_int(value, 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim < 8:
        raise ValueError(f"dim must be at least 8 (the channel gates reduce 2*dim channels 16-fold), got {dim}")
    if not _is_int(low_band_unit, 2):
        raise ValueError(f"low_band_unit must be an int >= 2, got {low_band_unit!r}")
    for name, values in (("num_blocks", num_blocks), ("heads", heads)):
        if not isinstance(values, (list, tuple)) or len(values) != 4 or not all(_is_int(v, 1) for v in values):
            raise ValueError(f"{name} must be 4 positive ints, got {values!r}")
    if not _is_int(num_refinement_blocks, 0):
        raise ValueError(f"num_refinement_blocks must be a non-negative int, got {num_refinement_blocks!r}")
    for name, value in (("ffn_expansion_factor", ffn_expansion_factor),
                        ("proxy_ffn_expansion_factor", proxy_ffn_expansion_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if train_patch % 8:
        raise ValueError(f"train_patch must be a multiple of 8, got {train_patch}")
    # Every (width, heads) pair an attention of the network splits.
    uses = {0: (heads[0],), 1: (heads[1], heads[0], heads[2]), 2: (heads[2], heads[1]),
            3: (heads[3], heads[0], heads[2])}
    for level, counts in uses.items():
        for count in counts:
            if (dim * 2 ** level) % count:
                raise ValueError(f"heads: {dim * 2 ** level} channels (level {level}) do not split into "
                                 f"{count} heads")


class SIPLAdaIR(nn.Module):
    """AdaIR with Proxy Fusion (SIPL). See the module docstring."""

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, layernorm_type: str = "WithBias", train_patch: int = 128,
                 proxy_ffn_expansion_factor: float = 2.0, use_random_proxy: bool = False,
                 low_band_unit: int = 128):
        super().__init__()
        _check_config(inp_channels=inp_channels, out_channels=out_channels, dim=dim, num_blocks=num_blocks,
                      num_refinement_blocks=num_refinement_blocks, heads=heads,
                      ffn_expansion_factor=ffn_expansion_factor, train_patch=train_patch,
                      proxy_ffn_expansion_factor=proxy_ffn_expansion_factor, low_band_unit=low_band_unit)
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.config = dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                           num_blocks=list(num_blocks), num_refinement_blocks=num_refinement_blocks,
                           heads=list(heads), ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                           layernorm_type=layernorm_type, train_patch=train_patch,
                           proxy_ffn_expansion_factor=proxy_ffn_expansion_factor,
                           use_random_proxy=use_random_proxy, low_band_unit=low_band_unit)
        self.use_random_proxy = use_random_proxy
        self.dictionary_cache = DictionaryCache()
        width = {k: dim * 2 ** k for k in (0, 1, 2, 3)}  # channels at each encoder level
        stack = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layernorm_type=layernorm_type)

        # Encoder (Restormer, as PromptIR's).
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = transformer_stack(num_blocks[0], width[0], heads[0], **stack)
        self.down1_2 = Downsample(width[0])
        self.encoder_level2 = transformer_stack(num_blocks[1], width[1], heads[1], **stack)
        self.down2_3 = Downsample(width[1])
        self.encoder_level3 = transformer_stack(num_blocks[2], width[2], heads[2], **stack)
        self.down3_4 = Downsample(width[2])
        self.latent = transformer_stack(num_blocks[3], width[3], heads[3], **stack)

        # Proxy Fusion at level k: the level-k width and the level-k map size of a train_patch
        # crop; heads as the authors (p3_cross uses heads[0]).
        absorb_heads = {1: heads[0], 2: heads[1], 3: heads[0]}
        inject_heads = {1: heads[0], 2: heads[1], 3: heads[2]}
        self.proxy_fusions = {
            k: ProxyFusion.attach(self, k, channels=width[k], dictionary_size=train_patch // 2 ** k,
                                  absorption_heads=absorb_heads[k], injection_heads=inject_heads[k],
                                  ffn_expansion_factor=proxy_ffn_expansion_factor, bias=bias,
                                  layernorm_type=layernorm_type, cache=self.dictionary_cache)
            for k in LEVELS}
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: dict) -> "SIPLAdaIR":
        return cls(**config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SIPLAdaIR":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ checks
    def _check_image(self, x: torch.Tensor) -> None:
        channels = self.config["inp_channels"]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SIPLAdaIR expects images of shape (B, {channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"SIPLAdaIR expects a floating image tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"SIPLAdaIR expects at least one image, got shape {tuple(x.shape)}")
        weight = self.patch_embed.proj.weight
        if x.device != weight.device:
            raise ValueError(f"image is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"image dtype {x.dtype} differs from the model's {weight.dtype} "
                            "(convert one of them, or run under torch.autocast)")
        h, w = x.shape[-2:]
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ValueError(f"H and W must be positive multiples of 8 (three 2x downsamplings), got "
                             f"{h}x{w}; pad the image or use refine(), which pads and crops")

    def _check_privileged(self, pf, batch: int) -> None:
        if not isinstance(pf, (tuple, list)) or len(pf) != 3:
            raise ValueError("privileged_features must be the triple (enc_level2, enc_level3, latent) "
                             "returned by encode()")
        weight = self.patch_embed.proj.weight
        for k, feature in zip(LEVELS, pf):
            channels = self.config["dim"] * 2 ** k
            if not isinstance(feature, torch.Tensor) or feature.dim() != 4 or feature.shape[1] != channels \
                    or feature.shape[0] not in (batch, 1):
                shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
                raise ValueError(f"privileged_features[{k - 1}] must have shape ({batch}, {channels}, h, w), "
                                 f"got {shape}")
            if feature.device != weight.device:
                raise ValueError(f"privileged_features[{k - 1}] is on {feature.device}, "
                                 f"the model on {weight.device}")

    # ------------------------------------------------------------------ passes
    def encode_all(self, x: torch.Tensor) -> Encoded:
        """Run the encoder; all four outputs (the decoder needs the skips too)."""
        self._check_image(x)
        # Every stack's input is a new map of ours (inplace: see modules.BlockStack).
        level1 = self.encoder_level1(self.patch_embed(x), inplace=True)
        level2 = self.encoder_level2(self.down1_2(level1), inplace=True)
        level3 = self.encoder_level3(self.down2_3(level2), inplace=True)
        return Encoded(level1, level2, level3, self.latent(self.down3_4(level3), inplace=True))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Privileged features of x: (enc_level2, enc_level3, latent)."""
        return self.encode_all(x).privileged

    def forward(self, x: torch.Tensor, privileged_features=None) -> torch.Tensor:
        """Plain pass (dictionary-only proxies), or the privileged pass when features are given."""
        return self.decode(x, self.encode_all(x), privileged_features)

    def decode(self, x: torch.Tensor, encoded: Encoded, privileged_features=None) -> torch.Tensor:
        """Decoder and output head on encoder outputs of x (shared by both passes in refine)."""
        if privileged_features is not None:
            self._check_privileged(privileged_features, x.shape[0])
        return self.decode_releasing(x, encoded._asdict(),
                                     None if privileged_features is None else list(privileged_features))

    def decode_releasing(self, x: torch.Tensor, encoded: dict, privileged: list | None = None) -> torch.Tensor:
        """decode, taking the containers over: each encoder output (keys of Encoded) and
        privileged feature is removed from them after its last use, so that a caller who handed
        over its only references frees them as the decoder goes."""
        random_mix = self.use_random_proxy and self.training
        feature = encoded.pop("latent")
        for k in (3, 2, 1):
            if k < 3:
                feature = getattr(self, f"decoder_level{k + 1}")(feature, inplace=True)
            pi = None
            if privileged is not None:
                pi, privileged[k - 1] = privileged[k - 1], None
            feature = self.proxy_fusions[k](feature, pi, random_mix)
            del pi
            feature = getattr(self, FREQUENCY_MODULE[k])(x, feature)
            feature = torch.cat([getattr(self, f"up{k + 1}_{k}")(feature), encoded.pop(f"level{k}")], dim=1)
            if k > 1:
                feature = getattr(self, f"reduce_chan_level{k}")(feature)
        feature = self.decoder_level1(feature, inplace=True)
        feature = self.refinement(feature, inplace=True)
        return self.output(feature) + x

    # ------------------------------------------------------------------ refinement
    def refine(self, x: torch.Tensor, steps: int = 2, **options):
        """The authors' self-refinement loop for images of any size.

        Each step: plain pass y0 = f(x); PI = encode(y0); y = f(x, PI); x <- y. steps=0
        returns the plain pass. Options are those of :class:`sipl_fast.refine.Refiner`.
        """
        from .refine import Refiner

        return Refiner(self, steps=steps, **options)(x)
