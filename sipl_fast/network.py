"""The shared base of sipl_fast's networks: PromptIR's Restormer encoder, the input checks, the
passes, the refinement entry point, presets and configuration checks.

Three architectures build on :class:`RestorationNetwork` and add only their decoders (the
names are those of ``sipl_fast.model.ARCHITECTURES``):

- ``promptir``: :class:`sipl_fast.model.PromptIR`, the official PromptIR (no Proxy Fusion);
- ``sipl-promptir``: :class:`sipl_fast.model.SIPLPromptIR`, PromptIR with Proxy Fusion;
- ``sipl-adair``: :class:`sipl_fast.adair.SIPLAdaIR`, AdaIR with Proxy Fusion.

A SIPL network (``proxy_fusion = True``) registers its three Proxy Fusion sites right after
the encoder (the authors' registration order, so their checkpoints' keys and the parameter
order stay theirs); ``encode``, the privileged pass and refinement need them, and a network
without them refuses those with :data:`NO_PROXY_FUSION`.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn

from .backends import resolve_backend
from .modules import LAYERNORM_TYPES, Downsample, OverlapPatchEmbed, streaming, transformer_stack
from .proxy_fusion import ProxyFusion

LEVELS = (1, 2, 3)  # Proxy Fusion sites; level k works at 1/2^k resolution with 2^k * dim channels

NO_PROXY_FUSION = "PromptIR has no Proxy Fusion: refinement needs a SIPL architecture"


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


def check_config(config: dict) -> None:
    """ValueError naming the first value of ``config`` no network can be built from (before
    any allocation). Checks the keys every architecture shares and those it has of
    prompt_len, prompt_dims and proxy_ffn_expansion_factor."""
    for name in ("inp_channels", "out_channels", "dim", "prompt_len", "train_patch"):
        if name in config and not _is_int(config[name], 1):
            raise ValueError(f"{name} must be a positive int, got {config[name]!r}")
    for name, length in (("num_blocks", 4), ("heads", 4), ("prompt_dims", 3)):
        values = config.get(name, (1,) * length)
        if not isinstance(values, (list, tuple)) or len(values) != length \
                or not all(_is_int(v, 1) for v in values):
            raise ValueError(f"{name} must be {length} positive ints, got {values!r}")
    if not _is_int(config["num_refinement_blocks"], 0):
        raise ValueError(f"num_refinement_blocks must be a non-negative int, got {config['num_refinement_blocks']!r}")
    for name in ("ffn_expansion_factor", "proxy_ffn_expansion_factor"):
        value = config.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if config["train_patch"] % 8:
        raise ValueError(f"train_patch must be a multiple of 8, got {config['train_patch']}")
    if config["layernorm_type"] not in LAYERNORM_TYPES:
        raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {config['layernorm_type']!r}")


class RestorationNetwork(nn.Module):
    """The encoder, checks and passes every architecture shares (see the module docstring).

    A subclass passes its whole configuration to ``__init__`` (stored as ``self.config``,
    sequences as lists), builds its decoder after it and implements ``decode_releasing``;
    ``PRESETS`` maps preset names to constructor arguments; ``proxy_fusion`` says whether the
    network has Proxy Fusion sites (then ``config`` holds ``proxy_ffn_expansion_factor`` and
    ``use_random_proxy``).
    """

    PRESETS: dict[str, dict] = {"base": {}}
    proxy_fusion = False

    def __init__(self, config: dict):
        super().__init__()
        self.check_config(config)
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        self.use_random_proxy = bool(config.get("use_random_proxy", False))
        # Dictionary-only values of one refinement call (empty without Proxy Fusion).
        self.dictionary_cache = DictionaryCache()
        dim, num_blocks, heads = config["dim"], config["num_blocks"], config["heads"]
        stack = self.stack_options()

        # Encoder (untouched PromptIR / Restormer).
        self.patch_embed = OverlapPatchEmbed(config["inp_channels"], dim)
        self.encoder_level1 = transformer_stack(num_blocks[0], self.width(0), heads[0], **stack)
        self.down1_2 = Downsample(self.width(0))
        self.encoder_level2 = transformer_stack(num_blocks[1], self.width(1), heads[1], **stack)
        self.down2_3 = Downsample(self.width(1))
        self.encoder_level3 = transformer_stack(num_blocks[2], self.width(2), heads[2], **stack)
        self.down3_4 = Downsample(self.width(2))
        self.latent = transformer_stack(num_blocks[3], self.width(3), heads[3], **stack)

        # Proxy Fusion at level k (sipl_fast.proxy_fusion): the level-k width and the level-k map
        # size of a train_patch crop; heads as the authors (p3_cross uses heads[0]).
        self.proxy_fusions: dict[int, ProxyFusion] = {}
        if self.proxy_fusion:
            absorb_heads = {1: heads[0], 2: heads[1], 3: heads[0]}
            inject_heads = {1: heads[0], 2: heads[1], 3: heads[2]}
            self.proxy_fusions = {
                k: ProxyFusion.attach(self, k, channels=self.width(k),
                                      dictionary_size=config["train_patch"] // 2 ** k,
                                      absorption_heads=absorb_heads[k], injection_heads=inject_heads[k],
                                      ffn_expansion_factor=config["proxy_ffn_expansion_factor"],
                                      bias=config["bias"], layernorm_type=config["layernorm_type"],
                                      cache=self.dictionary_cache)
                for k in LEVELS}

    # ------------------------------------------------------------------ construction
    @classmethod
    def check_config(cls, config: dict) -> None:
        """ValueError for a configuration no network of this class can be built from."""
        check_config(config)

    def width(self, level: int) -> int:
        """Channels of the encoder's level ``level`` (0: full resolution, 3: the latent)."""
        return self.config["dim"] * 2 ** level

    def stack_options(self) -> dict:
        """Options of every transformer block of the network."""
        c = self.config
        return dict(ffn_expansion_factor=c["ffn_expansion_factor"], bias=c["bias"], layernorm_type=c["layernorm_type"])

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    # ------------------------------------------------------------------ checks
    def _check_image(self, x: torch.Tensor) -> None:
        name, channels = type(self).__name__, self.config["inp_channels"]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} expects images of shape (B, {channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating image tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} expects at least one image, got shape {tuple(x.shape)}")
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

    def require_proxy_fusion(self, steps: int = 1) -> None:
        """ValueError (:data:`NO_PROXY_FUSION`) when ``steps`` > 0 refinement steps, the
        privileged features or the privileged pass are asked of a network without Proxy Fusion."""
        if steps and not self.proxy_fusion:
            raise ValueError(NO_PROXY_FUSION)

    def _check_privileged(self, pf, batch: int) -> None:
        self.require_proxy_fusion()
        if not isinstance(pf, (tuple, list)) or len(pf) != 3:
            raise ValueError("privileged_features must be the triple (enc_level2, enc_level3, latent) "
                             "returned by encode()")
        weight = self.patch_embed.proj.weight
        for k, feature in zip(LEVELS, pf):
            channels = self.width(k)
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
        self.require_proxy_fusion()
        return self.encode_all(x).privileged

    def forward(self, x: torch.Tensor, privileged_features=None) -> torch.Tensor:
        """Plain pass (dictionary-only proxies), or the privileged pass when features are given."""
        if privileged_features is not None:
            self.require_proxy_fusion()   # before the encoder runs
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
        over its only references frees them as the decoder goes (the refiner's last pass; see
        docs/design.md, "Refinement engine")."""
        raise NotImplementedError

    def up_and_join(self, level: int, feature: torch.Tensor, encoded: dict) -> torch.Tensor:
        """The upsampling from level + 1 to ``level``, joined with encoder level ``level``'s output
        (taken over from ``encoded``) and, above level 1, reduced back to the level's width."""
        feature = torch.cat([getattr(self, f"up{level + 1}_{level}")(feature), encoded.pop(f"level{level}")], dim=1)
        return getattr(self, f"reduce_chan_level{level}")(feature) if level > 1 else feature

    def output_head(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Decoder level 1, the refinement blocks, the output convolution and the global residual."""
        feature = self.decoder_level1(feature, inplace=True)
        feature = self.refinement(feature, inplace=True)
        return self.output(feature) + x

    def fuse_proxy(self, level: int, feature: torch.Tensor, privileged: list | None) -> torch.Tensor:
        """The decoder feature after the Proxy Fusion site of ``level``, taking the privileged
        feature of that level over from ``privileged`` (None: the plain pass)."""
        pi = None
        if privileged is not None:
            pi, privileged[level - 1] = privileged[level - 1], None
        return self.proxy_fusions[level](feature, pi, self.use_random_proxy and self.training)

    # ------------------------------------------------------------------ refinement
    def refine(self, x: torch.Tensor, steps: int = 2, **options):
        """The authors' self-refinement loop for images of any size.

        Each step: plain pass y0 = f(x); PI = encode(y0); y = f(x, PI); x <- y. steps=0
        returns the plain pass (the only choice without Proxy Fusion). Options are those of
        :class:`sipl_fast.refine.Refiner` (dtype, return_deltas, tol, tile, overlap, pad_to,
        strip_elements, graph_kernels, ...); ``cuda_graph`` None (the default) replays captured
        refinements on CUDA where it can, False runs eagerly (:func:`sipl_fast.refine.refine`).
        Safe to call from several threads at once on one model.
        """
        from .refine import refine

        self.require_proxy_fusion(steps)
        return refine(self, x, steps, **options)
