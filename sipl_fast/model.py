"""SIPL-PromptIR: PromptIR with three Proxy Fusion sites (after the encoder's levels 1, 2, 3).

The default constructor is the authors' PromptIR_ProxyFusion(decoder=True): 40,028,562
parameters with their state_dict keys. Widths the authors hard-coded are derived from the
configuration, so other configurations stay consistent.

Deliberate departures from the authors' released code:
- ``forward`` always returns the image (their ``return_feature=True`` default is a bug);
  ``encode`` returns the privileged features instead.
- ``use_random_proxy`` mixes proxies only in training mode.
- The batch-1 dictionaries are broadcast, never repeated B times.
- Within one refinement call (no autograd), everything that depends only on the dictionaries
  is computed once and reused by the call's later passes (see ``DictionaryCache``).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn

from .backends import resolve_backend
from .modules import (LAYERNORM_TYPES, OverlapPatchEmbed, Downsample, PromptGenBlock, TransformerBlock, Upsample,
                      conv1x1, conv3x3, streaming, transformer_stack)
from .proxy_fusion import ProxyFusion

LEVELS = (1, 2, 3)  # Proxy Fusion sites; level k works at 1/2^k resolution with 2^k * dim channels

PRESETS = {
    "base": {},
    # Small enough to train on two CPU cores in a few minutes (tests, the demo).
    "tiny": dict(dim=16, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 8),
                 prompt_dims=(8, 16, 40), train_patch=64),
}


class Encoded(NamedTuple):
    """Encoder outputs: the three skips and the latent."""
    level1: torch.Tensor
    level2: torch.Tensor
    level3: torch.Tensor
    latent: torch.Tensor

    @property
    def privileged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The privileged-feature triple (enc_level2, enc_level3, latent) that the privileged pass reads."""
        return self.level2, self.level3, self.latent


class _Entry(NamedTuple):
    signature: tuple
    value: object
    compute: Callable[[], object]


def _copy_into(target, source) -> None:
    """Copy the tensors of ``source`` into those of ``target`` (same nesting of tuples)."""
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, (tuple, list)):
        for t, s in zip(target, source):
            _copy_into(t, s)
    elif target is not None:
        raise TypeError(f"DictionaryCache: cannot refresh a {type(target).__name__} in place")


class DictionaryCache:
    """Dictionary-only computations, shared by the passes of one refinement call.

    A Proxy Fusion block's dictionary side (LayerNorm, projections) is the same for every
    input: the key/value side of cross_p{k} in the plain pass and the query side of
    p{k}_cross in the privileged pass. Values are cached only inside a scope
    (``with cache.scope():``, which every refinement call opens): the first pass computes
    them, the later passes and steps of the same call reuse them, and the scope's end forgets
    them. Every call therefore starts from the weights as they are, however they were changed:
    an optimizer, ``load_state_dict``, or writes through ``.data``, which change neither a
    tensor's version counter nor its storage and so cannot be detected cheaply. Inside a scope
    an entry is also recomputed when a parameter's storage, version or dtype, the backend or the
    autocast state changes. Entries are cached only where blocks are ``streaming``
    (modules.streaming).

    Each scope has its own entries, so calls from several threads never read each other's.
    The cache is runtime state: pickling or deep-copying a model gives it a new, empty cache.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # off: recompute every time, as the authors' code does
        self._entries: dict[tuple[int, tuple], _Entry] = {}
        self._lock = threading.Lock()
        self._scope_ids = itertools.count()
        self._local = threading.local()   # this thread's open scope

    def __reduce__(self):
        return (type(self), (self.enabled,))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def new_scope(self) -> int:
        """A scope id for :meth:`scope`; its entries stay until :meth:`drop` (a captured CUDA graph
        reads them in place across calls: :meth:`refresh` recomputes them there)."""
        return next(self._scope_ids)

    @contextlib.contextmanager
    def scope(self, scope_id: int | None = None) -> Iterator[int]:
        """Cache dictionary-side values in this thread for the block. A new scope's entries are
        dropped at its end; a scope_id from :meth:`new_scope` keeps them. A scope opened without
        an id inside another joins it."""
        outer = getattr(self._local, "scope", None)
        if scope_id is None and outer is not None:
            yield outer
            return
        own = scope_id is None
        scope_id = self.new_scope() if own else scope_id
        self._local.scope = scope_id
        try:
            yield scope_id
        finally:
            self._local.scope = outer
            if own:
                self.drop(scope_id)

    def drop(self, scope_id: int) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == scope_id]:
                del self._entries[key]

    def refresh(self, scope_id: int) -> None:
        """Recompute every entry of a kept scope from the current weights, in place (same
        storage), so that a CUDA graph that reads them sees the new values."""
        with self._lock:
            entries = [(key, entry) for key, entry in self._entries.items() if key[0] == scope_id]
        for _, entry in entries:
            _copy_into(entry.value, entry.compute())

    @staticmethod
    def _signature(params: Sequence[torch.Tensor], device: torch.device) -> tuple:
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        return (tuple((p.data_ptr(), p._version, p.dtype) for p in params), resolve_backend(device), autocast)

    def get(self, name: tuple, params: Sequence[torch.Tensor], compute: Callable[[], object]):
        # Only inside a scope and where blocks stream: not under autograd, not on the reference
        # backend (the authors' code caches nothing), not while torch.compile traces (no
        # data-pointer keys).
        scope_id = getattr(self._local, "scope", None)
        if scope_id is None or not self.enabled or not streaming(params[0]):
            return compute()
        signature = self._signature(params, params[0].device)
        key = (scope_id, name)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit.signature == signature:
            return hit.value
        value = compute()
        with self._lock:
            self._entries[key] = _Entry(signature, value, compute)
        return value


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_config(*, inp_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads,
                  ffn_expansion_factor, prompt_len, prompt_dims, train_patch, proxy_ffn_expansion_factor) -> None:
    """ValueError naming the first value no network can be built from (before any allocation)."""
    for name, value in (("inp_channels", inp_channels), ("out_channels", out_channels), ("dim", dim),
                        ("prompt_len", prompt_len), ("train_patch", train_patch)):
        if not _is_int(value, 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    lists = (("num_blocks", num_blocks, 4, 1), ("heads", heads, 4, 1), ("prompt_dims", prompt_dims, 3, 1))
    for name, values, length, low in lists:
        if not isinstance(values, (list, tuple)) or len(values) != length \
                or not all(_is_int(v, low) for v in values):
            raise ValueError(f"{name} must be {length} positive ints, got {values!r}")
    if not _is_int(num_refinement_blocks, 0):
        raise ValueError(f"num_refinement_blocks must be a non-negative int, got {num_refinement_blocks!r}")
    for name, value in (("ffn_expansion_factor", ffn_expansion_factor),
                        ("proxy_ffn_expansion_factor", proxy_ffn_expansion_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if train_patch % 8:
        raise ValueError(f"train_patch must be a multiple of 8, got {train_patch}")


class SIPLPromptIR(nn.Module):
    """PromptIR with Proxy Fusion (SIPL). See the module docstring."""

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, layernorm_type: str = "WithBias", prompt_len: int = 5,
                 prompt_dims: Sequence[int] = (64, 128, 320), train_patch: int = 128,
                 proxy_ffn_expansion_factor: float = 2.0, use_random_proxy: bool = False):
        super().__init__()
        _check_config(inp_channels=inp_channels, out_channels=out_channels, dim=dim, num_blocks=num_blocks,
                      num_refinement_blocks=num_refinement_blocks, heads=heads,
                      ffn_expansion_factor=ffn_expansion_factor, prompt_len=prompt_len, prompt_dims=prompt_dims,
                      train_patch=train_patch, proxy_ffn_expansion_factor=proxy_ffn_expansion_factor)
        if layernorm_type not in LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
        self.config = dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                           num_blocks=list(num_blocks), num_refinement_blocks=num_refinement_blocks,
                           heads=list(heads), ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                           layernorm_type=layernorm_type, prompt_len=prompt_len,
                           prompt_dims=list(prompt_dims), train_patch=train_patch,
                           proxy_ffn_expansion_factor=proxy_ffn_expansion_factor,
                           use_random_proxy=use_random_proxy)
        self.use_random_proxy = use_random_proxy
        self.dictionary_cache = DictionaryCache()
        width = {k: dim * 2 ** k for k in (0, 1, 2, 3)}  # channels at each encoder level
        stack = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layernorm_type=layernorm_type)

        # Encoder (untouched PromptIR / Restormer).
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = transformer_stack(num_blocks[0], width[0], heads[0], **stack)
        self.down1_2 = Downsample(width[0])
        self.encoder_level2 = transformer_stack(num_blocks[1], width[1], heads[1], **stack)
        self.down2_3 = Downsample(width[1])
        self.encoder_level3 = transformer_stack(num_blocks[2], width[2], heads[2], **stack)
        self.down3_4 = Downsample(width[2])
        self.latent = transformer_stack(num_blocks[3], width[3], heads[3], **stack)

        # Proxy Fusion at level k (sipl_fast.proxy_fusion): the level-k width and the level-k map
        # size of a train_patch crop; heads as the authors (p3_cross uses heads[0]).
        absorb_heads = {1: heads[0], 2: heads[1], 3: heads[0]}
        inject_heads = {1: heads[0], 2: heads[1], 3: heads[2]}
        self.proxy_fusions = {
            k: ProxyFusion.attach(self, k, channels=width[k], dictionary_size=train_patch // 2 ** k,
                                  absorption_heads=absorb_heads[k], injection_heads=inject_heads[k],
                                  ffn_expansion_factor=proxy_ffn_expansion_factor, bias=bias,
                                  layernorm_type=layernorm_type, cache=self.dictionary_cache)
            for k in LEVELS}

        # Decoder. Level k: fuse the proxy, add the prompt, upsample, join the skip, decode.
        # decoder_width[k]: channels where the proxy and prompt join at level k (latent, dec3,
        # dec2); out_width[k]: channels after reduce_noise_level{k}, as the authors wire them.
        decoder_width = {3: width[3], 2: width[2], 1: width[1]}
        out_width = {3: width[2], 2: width[2], 1: width[1]}
        for k in LEVELS:
            setattr(self, f"prompt{k}", PromptGenBlock(prompt_dims[k - 1], prompt_len, train_patch // 2 ** k,
                                                      decoder_width[k]))
            joined = decoder_width[k] + prompt_dims[k - 1]
            setattr(self, f"noise_level{k}", TransformerBlock(joined, heads[2], **stack))
            setattr(self, f"reduce_noise_level{k}", conv1x1(joined, out_width[k], bias))
        self.up4_3 = Upsample(width[2])
        self.reduce_chan_level3 = conv1x1(width[1] + width[2], width[2], bias)
        self.decoder_level3 = transformer_stack(num_blocks[2], width[2], heads[2], **stack)
        self.up3_2 = Upsample(width[2])
        self.reduce_chan_level2 = conv1x1(width[2], width[1], bias)
        self.decoder_level2 = transformer_stack(num_blocks[1], width[1], heads[1], **stack)
        self.up2_1 = Upsample(width[1])
        self.decoder_level1 = transformer_stack(num_blocks[0], width[1], heads[0], **stack)
        self.refinement = transformer_stack(num_refinement_blocks, width[1], heads[0], **stack)
        self.output = conv3x3(width[1], out_channels, bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: dict) -> "SIPLPromptIR":
        return cls(**config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SIPLPromptIR":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ checks
    def _check_image(self, x: torch.Tensor) -> None:
        channels = self.config["inp_channels"]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SIPLPromptIR expects images of shape (B, {channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"SIPLPromptIR expects a floating image tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"SIPLPromptIR expects at least one image, got shape {tuple(x.shape)}")
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
        # Every stack's input is a new map of ours (inplace: see BlockStack).
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
        over its only references frees them as the decoder goes (the refiner's last pass: its
        peak at 512x512 falls below the plain pass's, 45 MiB under the old overall peak on fake
        tensors)."""
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
            feature = torch.cat([feature, getattr(self, f"prompt{k}")(feature)], dim=1)
            feature = getattr(self, f"reduce_noise_level{k}")(getattr(self, f"noise_level{k}")(feature, inplace=True))
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
        returns the plain pass. Options are those of :class:`sipl_fast.refine.Refiner`
        (return_deltas, tol, tile, overlap, pad_to, strip_elements, graph_kernels, ...).
        Safe to call from several threads at once on one model.
        """
        from .refine import Refiner

        return Refiner(self, steps=steps, **options)(x)
