"""``pointwise_depthwise`` on the ``triton`` backend: the 1x1 convolution by cuBLAS/cuDNN, the
depthwise 3x3 convolution by the kernels of sipl_fast.kernels.depthwise3x3.

``sipl_fast::depthwise3x3_fwd`` (forward, and with ``flip`` the input gradient) and
``sipl_fast::depthwise3x3_wgrad`` (weight and bias gradients, deterministic) are torch.library
custom ops with fake implementations, so torch.compile traces through them. Training uses
torch_impl's autograd Function (x alone saved, the 1x1 output recomputed in the backward)
with these kernels as its depthwise step. The output has the 1x1 output's dtype (under
autocast, 16 bits); the kernels read the float32 weights and accumulate in float32.
channels_last maps keep cuDNN's NHWC depthwise convolution (the kernels write NCHW).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.depthwise3x3 import depthwise3x3, depthwise3x3_weight_grad
from . import torch_impl

__all__ = ["pointwise_depthwise", "depthwise3x3_fwd", "depthwise3x3_wgrad", "TritonDepthwise"]


@torch.library.custom_op("sipl_fast::depthwise3x3_fwd", mutates_args=())
def depthwise3x3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], flip: bool) -> torch.Tensor:
    """Depthwise 3x3 convolution (padding 1) of x (B, C, H, W); ``flip`` mirrors the taps."""
    return depthwise3x3(x, weight.contiguous(), None if bias is None else bias.contiguous(), flip)


@depthwise3x3_fwd.register_fake
def _(x, weight, bias, flip):
    return x.new_empty(x.shape)


@torch.library.custom_op("sipl_fast::depthwise3x3_wgrad", mutates_args=())
def depthwise3x3_wgrad(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d weight (C, 1, 3, 3), d bias (C,)), float32 (float64 for float64 inputs)."""
    return depthwise3x3_weight_grad(grad_out, x)


@depthwise3x3_wgrad.register_fake
def _(grad_out, x):
    accumulate = torch.float64 if torch.float64 in (x.dtype, grad_out.dtype) else torch.float32
    channels = x.shape[1]
    return x.new_empty((channels, 1, 3, 3), dtype=accumulate), x.new_empty(channels, dtype=accumulate)


class TritonDepthwise:
    """The depthwise step of torch_impl._PointwiseDepthwise, by the Triton kernels."""

    @staticmethod
    def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return depthwise3x3_fwd(hidden, weight, bias, False)

    @staticmethod
    def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                 needs: tuple[bool, bool, bool]):
        grad_hidden = depthwise3x3_fwd(grad, weight, None, True) if needs[0] else None  # the Function casts
        grad_weight = grad_bias = None
        if needs[1] or needs[2]:
            grad_weight, grad_bias = depthwise3x3_wgrad(grad, hidden)
        return grad_hidden, grad_weight, grad_bias if has_bias else None


def pointwise_depthwise(x: torch.Tensor, pointwise: torch.Tensor, pointwise_bias: Optional[torch.Tensor],
                        depthwise: torch.Tensor, depthwise_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.pointwise_depthwise` (inputs validated there)."""
    impl = torch_impl.TorchDepthwise if torch_impl.channels_innermost(x) else TritonDepthwise
    return torch_impl.pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias, impl)
