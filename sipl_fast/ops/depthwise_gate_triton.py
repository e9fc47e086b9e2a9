"""``depthwise_gate`` on the ``triton`` backend: the fused depthwise 3x3 convolution and gate
of sipl_fast.kernels.depthwise3x3_gate, for inference.

``sipl_fast::depthwise_gate_fwd`` is a torch.library custom op with a fake implementation
(torch.compile traces through it, CUDA-graph capture records it). The kernel has no backward:
where autograd records, and on channels_last maps (the kernel writes NCHW), the op runs the
torch formulation. The output keeps x's dtype; arithmetic is float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.depthwise3x3_gate import depthwise3x3_gate
from . import torch_impl

__all__ = ["depthwise_gate", "depthwise_gate_fwd"]


@torch.library.custom_op("sipl_fast::depthwise_gate_fwd", mutates_args=())
def depthwise_gate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dual: bool) -> torch.Tensor:
    """gated_gelu(depthwise3x3(x) + bias, dual) of x (B, 2h, H, W): (B, h, H, W)."""
    return depthwise3x3_gate(x, weight.contiguous(), None if bias is None else bias.contiguous(), dual)


@depthwise_gate_fwd.register_fake
def _(x, weight, bias, dual):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


def depthwise_gate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dual: bool) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.depthwise_gate` (inputs validated there)."""
    if torch_impl.needs_autograd(x, weight, bias) or torch_impl.channels_innermost(x):
        return torch_impl.depthwise_gate(x, weight, bias, dual)
    return depthwise_gate_fwd(x, weight, bias, dual)
