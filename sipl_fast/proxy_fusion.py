"""Proxy Fusion: how a SIPL network lets privileged information into its decoder.

One Proxy Fusion site works at one decoder resolution with C channels. It has three parts:

- the privileged dictionary ``D``, a learned map of shape (1, C, S, S) (zero-initialised,
  S = the training crop's side at this resolution), the same for every input;
- the absorption block (a :class:`~sipl_fast.modules.ProxyFusionBlock`): ``D`` queries the
  privileged feature ``PI``, giving the proxy ``P = absorption(D, PI)``;
- the injection block (another ProxyFusionBlock): the decoder feature ``F`` queries the proxy,
  ``F' = injection(F, P)``; in the plain pass (no privileged feature) it queries ``D`` itself.

Contract of ``fusion(feature, privileged=None, random_mix=False)``:

- ``feature`` is the decoder map at the site, (B, C, h, w); the result replaces it, same shape.
- ``privileged`` is the privileged feature ``PI``: the encoder output, at the site's resolution
  and width, of the image the privileged information comes from (in SIPL: the network's own
  plain-pass output, or the clean image in training). Shape (B or 1, C, h', w'): the attention
  runs over pixels, so its size need not be h x w. In the SIPL networks, for the site at 1/2^k
  resolution with C = dim * 2^k: k = 1 reads enc_level2, k = 2 enc_level3, k = 3 the latent.
- ``random_mix`` (the authors' ``use_random_proxy``; pass it only while training): the proxy
  becomes (1 - w) P + w D with w ~ U(0, 1) drawn per image.
- ``D`` has batch 1 and is broadcast against the batch, never repeated. Dictionary-only values
  (the injection block's keys of ``D``, the absorption block's query of ``D``) go through the
  owner's DictionaryCache when one is given (reused within one refinement call).

Where the weights live: on the network, not in this object. ``ProxyFusion.attach(network,
level, ...)`` registers the three parts on ``network`` under the authors' names,
``privileged_dictionary{level}``, ``p{level}_cross`` (absorption) and ``cross_p{level}``
(injection), and returns a ProxyFusion that looks them up there by name at every call. So the
network's ``state_dict`` keys are the authors' (their checkpoints load with ``strict=True``), and
``.to()``, ``.train()``, ``parameters()``, optimizers and ``load_state_dict`` (``assign=True``
too) act on the parts as on any other layer. A ProxyFusion is not an ``nn.Module``: it has no
weights or mode of its own. Keep it in a plain attribute of the network::

    self.fusion1 = ProxyFusion.attach(self, 1, channels=2 * dim, dictionary_size=patch // 2,
                                      absorption_heads=1, injection_heads=1)
    ...
    feature = self.fusion1(feature, privileged_features[0],
                           random_mix=self.use_random_proxy and self.training)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .modules import ProxyFusionBlock, QuerySide


class ProxyFusion:
    """One Proxy Fusion site of ``owner``, whose parts are ``owner``'s attributes named after
    ``level`` (see the module docstring). ``cache``: a DictionaryCache for dictionary-only values,
    or None to compute them at every call."""

    def __init__(self, owner: nn.Module, level: int, cache=None):
        self.owner, self.level, self.cache = owner, level, cache
        self.dictionary_name = f"privileged_dictionary{level}"
        self.absorption_name = f"p{level}_cross"
        self.injection_name = f"cross_p{level}"
        for name in (self.dictionary_name, self.absorption_name, self.injection_name):
            if not hasattr(owner, name):
                raise ValueError(f"ProxyFusion level {level}: {type(owner).__name__} has no {name} "
                                 "(create the parts with ProxyFusion.attach)")

    @classmethod
    def attach(cls, owner: nn.Module, level: int, *, channels: int, dictionary_size: int,
               absorption_heads: int, injection_heads: int, ffn_expansion_factor: float = 2.0,
               bias: bool = False, layernorm_type: str = "WithBias", cache=None) -> "ProxyFusion":
        """Register a site's dictionary (1, channels, dictionary_size, dictionary_size), zeros,
        and its absorption and injection blocks on ``owner``; return the site."""
        block = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layernorm_type=layernorm_type)
        owner.register_parameter(f"privileged_dictionary{level}",
                                 nn.Parameter(torch.zeros(1, channels, dictionary_size, dictionary_size)))
        owner.add_module(f"p{level}_cross", ProxyFusionBlock(channels, channels, absorption_heads, **block))
        owner.add_module(f"cross_p{level}", ProxyFusionBlock(channels, channels, injection_heads, **block))
        return cls(owner, level, cache)

    # ------------------------------------------------------------------ the parts
    @property
    def dictionary(self) -> nn.Parameter:
        return getattr(self.owner, self.dictionary_name)

    @property
    def absorption(self) -> ProxyFusionBlock:
        return getattr(self.owner, self.absorption_name)

    @property
    def injection(self) -> ProxyFusionBlock:
        return getattr(self.owner, self.injection_name)

    def _dictionary_only(self, name: str, block: nn.Module, compute):
        if self.cache is None:
            return compute()
        return self.cache.get((name, self.level), [self.dictionary, *block.parameters()], compute)

    # ------------------------------------------------------------------ the computation
    def proxy(self, privileged: torch.Tensor, random_mix: bool = False) -> torch.Tensor:
        """P = absorption(D, PI), mixed with D when ``random_mix``."""
        dictionary, absorption = self.dictionary, self.absorption
        query: QuerySide = self._dictionary_only("query", absorption, lambda: absorption.prepare_query(dictionary))
        proxy = absorption.fuse(query, absorption.prepare_keys(privileged))
        if random_mix:
            w = torch.rand(proxy.shape[0], 1, 1, 1, device=proxy.device, dtype=proxy.dtype)
            proxy = (1 - w) * proxy + w * dictionary
        return proxy

    def keys(self, privileged: torch.Tensor | None = None,
             random_mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the injection block attends to: of D (plain pass, batch 1) or of
        the proxy (privileged pass)."""
        injection = self.injection
        if privileged is None:
            dictionary = self.dictionary
            return self._dictionary_only("keys", injection, lambda: injection.prepare_keys(dictionary))
        return injection.prepare_keys(self.proxy(privileged, random_mix))

    def __call__(self, feature: torch.Tensor, privileged: torch.Tensor | None = None,
                 random_mix: bool = False) -> torch.Tensor:
        """The decoder feature after the site: injection(feature, P or D)."""
        injection = self.injection
        return injection.fuse(injection.prepare_query(feature), self.keys(privileged, random_mix))

    def __repr__(self) -> str:
        return (f"ProxyFusion({self.dictionary_name}, absorption={self.absorption_name}, "
                f"injection={self.injection_name})")
