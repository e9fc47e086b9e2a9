"""``pointwise_depthwise_gate`` on the ``triton`` backend: the 1x1 convolution by cuBLAS/cuDNN,
then the depthwise 3x3 convolution and the gate fused in one pass
(sipl_fast.kernels.depthwise3x3_gate), for inference.

``sipl_fast::depthwise_gate_fwd`` (the fused pass on the 1x1 output) is a torch.library custom
op with a fake implementation (torch.compile traces through it, CUDA-graph capture records
it). The kernel has no backward: where autograd records, ops.pointwise_depthwise_gate is
pointwise_depthwise and gated_gelu and never comes here; on channels-last maps (the kernel
writes NCHW) this runs the torch formulation. The output has the 1x1 output's dtype
(under autocast, 16 bits); arithmetic is float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.depthwise3x3_gate import depthwise3x3_gate
from . import torch_impl

__all__ = ["pointwise_depthwise_gate", "depthwise_gate_fwd"]


@torch.library.custom_op("sipl_fast::depthwise_gate_fwd", mutates_args=())
def depthwise_gate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dual: bool) -> torch.Tensor:
    """gated_gelu(depthwise3x3(x) + bias, dual) of x (B, 2h, H, W): (B, h, H, W)."""
    return depthwise3x3_gate(x, weight.contiguous(), None if bias is None else bias.contiguous(), dual)


@depthwise_gate_fwd.register_fake
def _(x, weight, bias, dual):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


def pointwise_depthwise_gate(x: torch.Tensor, pointwise: torch.Tensor, pointwise_bias: Optional[torch.Tensor],
                             depthwise: torch.Tensor, depthwise_bias: Optional[torch.Tensor], dual: bool) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.pointwise_depthwise_gate` (inputs validated there)."""
    if torch_impl.channels_innermost(x):
        return torch_impl.pointwise_depthwise_gate(x, pointwise, pointwise_bias, depthwise, depthwise_bias, dual)
    return depthwise_gate_fwd(F.conv2d(x, pointwise, pointwise_bias), depthwise, depthwise_bias, dual)
