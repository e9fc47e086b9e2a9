"""The SIPL shapes every benchmark measures, defined once, and their small smoke variants.

The shapes are the real call sites of the default (base) SIPLPromptIR: a training step on
128x128 patches, batch 8 ("train128 B8"), and the refinement of one 512x512 image (and, for
MDTA, one 1280x720 image). :func:`smoke` derives from each shape a tiny one of the same kind
(same heads, same layout, a few pixels) that runs in milliseconds on the CPU, also under the
Triton interpreter: the CPU suite and the CI smoke run use those.

Channels per site (base preset, dim 48): level 1 (enc1) 48 channels, dec1 and the refinement
blocks 96, level 2 48*2 = 96, level 3 192, the latent 384; a GDFN's hidden width is
int(2.66 C) per gate half; the DualGate feed-forward of cross_p1 has 2C hidden channels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AttentionShape:
    """A Proxy Fusion cross-attention call: q (batch, heads*head_dim, *q_hw) against
    k, v (batch, heads*head_dim, *kv_hw)."""
    name: str
    batch: int
    heads: int
    head_dim: int
    q_hw: tuple[int, int]
    kv_hw: tuple[int, int]

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class MapShape:
    """A per-pixel op's call on a (batch, channels, *hw) map: MDTA (``heads``), LayerNorm2d,
    a gate (``channels`` = both halves; ``dual``: the DualGate), a 1x1 + depthwise projection
    (``hidden`` output channels; with a gate, ``hidden`` is both halves)."""
    name: str
    batch: int
    channels: int
    hw: tuple[int, int]
    heads: int = 1
    hidden: int = 0
    dual: bool = False


PROXY_ATTENTION = (
    AttentionShape("level1 train128 B8", 8, 1, 96, (64, 64), (64, 64)),   # p1_cross / cross_p1 in training
    AttentionShape("p1_cross 512x512", 1, 1, 96, (64, 64), (256, 256)),   # 4096 queries x 65536 keys
    AttentionShape("cross_p1 512x512", 1, 1, 96, (256, 256), (64, 64)),   # 65536 x 4096
    AttentionShape("p3_cross 512x512", 1, 1, 384, (16, 16), (64, 64)),    # 256 x 4096, head size 384
    AttentionShape("cross_p3 512x512", 1, 4, 96, (64, 64), (16, 16)),     # 4096 x 256, 4 heads
)

TRANSPOSED_ATTENTION = (  # MDTA at full resolution, where its time goes
    MapShape("dec1 512x512", 1, 96, (512, 512)),
    MapShape("enc1 512x512", 1, 48, (512, 512)),
    MapShape("dec1 train128 B8", 8, 96, (128, 128)),
    MapShape("enc1 train128 B8", 8, 48, (128, 128)),
    MapShape("dec1 1280x720", 1, 96, (720, 1280)),
    MapShape("enc1 1280x720", 1, 48, (720, 1280)),
)


def _both_scenarios(name: str, channels: int, scale: int, **fields) -> tuple[MapShape, MapShape]:
    """A site at 1/scale resolution in the training step and in the 512x512 refinement."""
    return (MapShape(f"{name} train128 B8", 8, channels, (128 // scale,) * 2, **fields),
            MapShape(f"{name} 512x512", 1, channels, (512 // scale,) * 2, **fields))


LAYER_NORM2D = (*_both_scenarios("dec1", 96, 1), *_both_scenarios("enc3", 192, 4))
GATED_GELU = (*_both_scenarios("dec1 GDFN", 2 * 255, 1), *_both_scenarios("cross_p1 DualGate", 2 * 192, 2, dual=True))
POINTWISE_DEPTHWISE = (*_both_scenarios("dec1 ffn", 96, 1, hidden=2 * 255),
                       *_both_scenarios("enc3 ffn", 192, 4, hidden=2 * 510))
POINTWISE_DEPTHWISE_GATE = (*_both_scenarios("dec1 ffn", 96, 1, hidden=2 * 255),
                            *_both_scenarios("cross_p1 ffn", 96, 2, hidden=2 * 192, dual=True))

OPS = {
    "proxy_attention": PROXY_ATTENTION,
    "transposed_attention": TRANSPOSED_ATTENTION,
    "layer_norm2d": LAYER_NORM2D,
    "gated_gelu": GATED_GELU,
    "pointwise_depthwise": POINTWISE_DEPTHWISE,
    "pointwise_depthwise_gate": POINTWISE_DEPTHWISE_GATE,
}


def _small(side: int, divisor: int) -> int:
    return max(4, side // divisor)


def smoke(shape: AttentionShape | MapShape) -> AttentionShape | MapShape:
    """The shape shrunk for the CPU: batch 1, a few pixels (at least 4 per side), channels a
    quarter (head size 384 stays above the others; gate halves stay even)."""
    name = f"{shape.name} smoke"
    if isinstance(shape, AttentionShape):
        return replace(shape, name=name, batch=1, head_dim=shape.head_dim // 4,
                       q_hw=tuple(_small(s, 16) for s in shape.q_hw), kv_hw=tuple(_small(s, 16) for s in shape.kv_hw))
    return replace(shape, name=name, batch=1, channels=shape.channels // 8 * 2, hidden=shape.hidden // 8 * 2,
                   hw=tuple(_small(s, 32) for s in shape.hw))


def shapes(op: str, full_size: bool) -> tuple:
    """The op's SIPL shapes, or their smoke variants."""
    return OPS[op] if full_size else tuple(smoke(shape) for shape in OPS[op])


# End to end: refinement (steps=2, the full model) and one training step.
REFINE_SIZES = {"cuda": ((512, 512), (720, 1280)), "cpu": ((256, 256), (512, 512))}  # (H, W)
REFINE_SMOKE = ("tiny", (32, 32))  # the tiny preset on a 32x32 image
TRAIN_STEP = {"cuda": dict(preset="base", batch=8, patch=128), "cpu": dict(preset="base", batch=2, patch=64)}
TRAIN_SMOKE = dict(preset="tiny", batch=2, patch=64)
