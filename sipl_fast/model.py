"""PromptIR and SIPL-PromptIR (PromptIR with three Proxy Fusion sites, after the encoder's
levels 1, 2, 3), and the registry of every architecture (``ARCHITECTURES``).

``PromptIR()`` is the official PromptIR(decoder=True): 35,592,263 values in its state_dict
under the official keys, 35,376,967 of them trainable parameters (see
``UnusedConvolution``). ``SIPLPromptIR()`` is the authors' PromptIR_ProxyFusion(decoder=True):
40,028,562 parameters with their state_dict keys. The two share one implementation: the same
encoder (``sipl_fast.network.RestorationNetwork``) and the same decoder, which runs the Proxy
Fusion sites only where the network has them. Widths the official code hard-coded are derived
from the configuration, so other configurations stay consistent.

Deliberate departures of SIPLPromptIR from the authors' released code:
- ``forward`` always returns the image (their ``return_feature=True`` default is a bug);
  ``encode`` returns the privileged features instead.
- ``use_random_proxy`` mixes proxies only in training mode.
- The batch-1 dictionaries are broadcast, never repeated B times.
- Within one refinement call (no autograd), everything that depends only on the dictionaries
  is computed once and reused by the call's later passes (see ``DictionaryCache``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .adair import SIPLAdaIR
from .modules import PromptGenBlock, TransformerBlock, Upsample, conv1x1, conv3x3, transformer_stack
from .network import LEVELS, NO_PROXY_FUSION, DictionaryCache, Encoded, RestorationNetwork  # noqa: F401

PRESETS = {
    "base": {},
    # Small enough to train on two CPU cores in a few minutes (tests, the demo).
    "tiny": dict(dim=16, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 8),
                 prompt_dims=(8, 16, 40), train_patch=64),
}


class UnusedConvolution(nn.Module):
    """A 1x1 convolution's weight (and bias) that the official PromptIR defines and never uses
    (``chnl_reduce1/2/3``, ``reduce_noise_channel_1/2/3``), kept under its key names so that
    official checkpoints load with strict=True.

    The tensors are buffers, not parameters: a parameter no forward reads would receive no
    gradient, which DistributedDataParallel reports as an error (unless told to search for
    unused parameters on every step), and AdamW's weight decay would still shrink it. As buffers
    they stay in the state_dict, follow ``.to()`` and are left alone by optimizers.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__()
        initial = conv1x1(in_channels, out_channels, bias)   # nn.Conv2d's initialisation, as the official
        self.register_buffer("weight", initial.weight.detach())
        if bias:
            self.register_buffer("bias", initial.bias.detach())


class PromptIR(RestorationNetwork):
    """The official PromptIR (no Proxy Fusion); see the module docstring. ``forward(x)`` only:
    ``encode``, the privileged pass and refinement steps raise ``NO_PROXY_FUSION``."""

    PRESETS = PRESETS

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, layernorm_type: str = "WithBias", prompt_len: int = 5,
                 prompt_dims: Sequence[int] = (64, 128, 320), train_patch: int = 128):
        super().__init__(dict(inp_channels=inp_channels, out_channels=out_channels, dim=dim,
                              num_blocks=num_blocks, num_refinement_blocks=num_refinement_blocks,
                              heads=heads, ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                              layernorm_type=layernorm_type, prompt_len=prompt_len,
                              prompt_dims=prompt_dims, train_patch=train_patch))
        self._build_decoder()

    def _build_decoder(self) -> None:
        """PromptIR's decoder (after the encoder and, in SIPLPromptIR, the Proxy Fusion sites).
        Level k: fuse the proxy (SIPL), add the prompt, upsample, join the skip, decode."""
        c = self.config
        num_blocks, heads, prompt_dims, bias = c["num_blocks"], c["heads"], c["prompt_dims"], c["bias"]
        width = {k: self.width(k) for k in (0, 1, 2, 3)}
        stack = self.stack_options()
        # decoder_width[k]: channels where the proxy and prompt join at level k (latent, dec3,
        # dec2); out_width[k]: channels after reduce_noise_level{k}, as the official code wires them.
        decoder_width = {3: width[3], 2: width[2], 1: width[1]}
        out_width = {3: width[2], 2: width[2], 1: width[1]}
        for k in LEVELS:
            setattr(self, f"prompt{k}", PromptGenBlock(prompt_dims[k - 1], c["prompt_len"],
                                                      c["train_patch"] // 2 ** k, decoder_width[k]))
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
        self.refinement = transformer_stack(c["num_refinement_blocks"], width[1], heads[0], **stack)
        self.output = conv3x3(width[1], c["out_channels"], bias)
        if not self.proxy_fusion:
            # The official network's unused 1x1 convolutions: chnl_reduce{k} maps prompt_dims[k-1]
            # channels to reduced[k], reduce_noise_channel_{k} width[k-1] + reduced[k] to width[k-1]
            # (the official 64, 128, 256 at the default prompt widths 64, 128, 320).
            reduced = {1: prompt_dims[0], 2: prompt_dims[1], 3: 2 * prompt_dims[1]}
            for k in LEVELS:
                setattr(self, f"chnl_reduce{k}", UnusedConvolution(prompt_dims[k - 1], reduced[k], bias))
            for k in LEVELS:
                setattr(self, f"reduce_noise_channel_{k}",
                        UnusedConvolution(width[k - 1] + reduced[k], width[k - 1], bias))

    def decode_releasing(self, x: torch.Tensor, encoded: dict, privileged: list | None = None) -> torch.Tensor:
        feature = encoded.pop("latent")
        for k in (3, 2, 1):
            if k < 3:
                feature = getattr(self, f"decoder_level{k + 1}")(feature, inplace=True)
            if self.proxy_fusion:
                feature = self.fuse_proxy(k, feature, privileged)
            feature = torch.cat([feature, getattr(self, f"prompt{k}")(feature)], dim=1)
            feature = getattr(self, f"reduce_noise_level{k}")(getattr(self, f"noise_level{k}")(feature, inplace=True))
            feature = self.up_and_join(k, feature, encoded)
        return self.output_head(x, feature)

    decode_releasing.__doc__ = RestorationNetwork.decode_releasing.__doc__


class SIPLPromptIR(PromptIR):
    """PromptIR with Proxy Fusion (SIPL). See the module docstring."""

    proxy_fusion = True

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
                 bias: bool = False, layernorm_type: str = "WithBias", prompt_len: int = 5,
                 prompt_dims: Sequence[int] = (64, 128, 320), train_patch: int = 128,
                 proxy_ffn_expansion_factor: float = 2.0, use_random_proxy: bool = False):
        # PromptIR's layers with the Proxy Fusion sites between the encoder and the decoder.
        RestorationNetwork.__init__(self, dict(
            inp_channels=inp_channels, out_channels=out_channels, dim=dim, num_blocks=num_blocks,
            num_refinement_blocks=num_refinement_blocks, heads=heads, ffn_expansion_factor=ffn_expansion_factor,
            bias=bias, layernorm_type=layernorm_type, prompt_len=prompt_len, prompt_dims=prompt_dims,
            train_patch=train_patch, proxy_ffn_expansion_factor=proxy_ffn_expansion_factor,
            use_random_proxy=use_random_proxy))
        self._build_decoder()


# The architectures by name: the names the command line's --arch and the checkpoints' "arch"
# metadata use. Files that record none hold the default.
ARCHITECTURES: dict[str, type[RestorationNetwork]] = {
    "sipl-promptir": SIPLPromptIR,
    "sipl-adair": SIPLAdaIR,
    "promptir": PromptIR,
}
DEFAULT_ARCH = "sipl-promptir"


def architecture(name: str) -> type[RestorationNetwork]:
    """The network class of an architecture name; ValueError naming the choices."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def arch_name(model: nn.Module) -> str:
    """The architecture name of a network (its exact class in ARCHITECTURES)."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not one of the architectures {', '.join(ARCHITECTURES)}")
