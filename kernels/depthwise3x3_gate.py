"""The feed-forward's depthwise 3x3 convolution and gate in one pass, for inference (Triton).

    hidden = depthwise3x3(x) + bias            x: (B, 2h, H, W), halves (x1, x2)
    out    = gelu(hidden1) * hidden2            (GDFN)
           + gelu(hidden2) * hidden1            (and this too: the DualGate FFN)

out is (B, h, H, W). Unfused, the depthwise output (2h channels) is written and read back by
the gate; here a program convolves the tile of channel c and of channel c + h and gates
them in registers: one read of x and one write of h channels, a third of the unfused traffic
at the GDFN's 510 hidden channels. Forward only: training keeps the separate ops, whose
backward needs the depthwise output anyway.

The kernel is depthwise3x3.py's row-streaming forward with GATE set (any strided x,
contiguous output, float32 arithmetic, float64 for float64 inputs); gelu as in gated_gelu.py
(exact, erf).
"""
from __future__ import annotations

import torch

from .depthwise3x3 import convolve_rows

__all__ = ["depthwise3x3_gate"]


def depthwise3x3_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dual: bool = False,
                      tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """gate(depthwise3x3(x, weight, bias)) for x (B, 2h, H, W) with any strides, weight
    (2h, 1, 3, 3) and bias (2h,) contiguous: a new contiguous (B, h, H, W) tensor of x's dtype.
    ``tile`` (BLOCK_C, BLOCK_R, BLOCK_W[, num_warps]) overrides the stream config (tests)."""
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels // 2, height, width), dtype=x.dtype, device=x.device)
    return convolve_rows(x, weight, bias, out, gate=2 if dual else 1, tile=tile)
