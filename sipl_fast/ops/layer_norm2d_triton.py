"""``layer_norm2d`` on the ``triton`` backend: custom ops around the fused kernels.

``sipl_fast::layer_norm2d_fwd`` and ``sipl_fast::layer_norm2d_bwd`` are torch.library custom
ops (fake implementations included, so torch.compile traces through them); autograd is
registered on the forward op; plain eager calls run the same launchers as an
autograd.Function (sipl_fast.ops.eager). The kernels (sipl_fast.kernels.layer_norm2d) read x once per
pass and recompute the per-pixel statistics in the backward, so only x and the weight are
saved.

Dtypes follow the torch backend (torch_impl.layer_norm_dtype): a 16-bit x (autocast, float32
parameters) gives an output of x's dtype, so no float32 copy of the map is made or kept;
otherwise the promoted dtype of x, weight and bias.
Each gradient has its input's dtype. A tensor whose H*W planes are not contiguous (e.g.
channels_last) is copied once to contiguous; channel slices of a larger tensor are used in place.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.layer_norm2d import layer_norm2d_backward, layer_norm2d_forward
from . import torch_impl
from .eager import kernel_autograd, plain_eager

__all__ = ["layer_norm2d", "layer_norm2d_fwd", "layer_norm2d_bwd"]


def _with_contiguous_planes(t: torch.Tensor) -> torch.Tensor:
    _, _, height, width = t.shape
    if (t.stride(3) == 1 or width == 1) and (t.stride(2) == width or height == 1):
        return t
    return t.contiguous()


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    return torch_impl.layer_norm_dtype(x, weight, bias)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm2d of x (B, C, H, W); WithBias when ``bias`` is given, BiasFree otherwise."""
    return layer_norm2d_forward(_with_contiguous_planes(x), weight.contiguous(),
                                None if bias is None else bias.contiguous(), eps,
                                _output_dtype(x, weight, bias))


layer_norm2d_fwd = torch.library.custom_op("sipl_fast::layer_norm2d_fwd", mutates_args=())(_forward)


@layer_norm2d_fwd.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape, dtype=_output_dtype(x, weight, bias))


def _backward_launch(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) in the dtypes of x, weight and weight; dbias is empty when not with_bias."""
    dx, dweight, dbias = layer_norm2d_backward(
        _with_contiguous_planes(grad_out), _with_contiguous_planes(x), weight.contiguous(), with_bias, eps)
    dbias = weight.new_empty(0) if dbias is None else dbias.to(weight.dtype)
    return dx, dweight.to(weight.dtype), dbias


layer_norm2d_bwd = torch.library.custom_op("sipl_fast::layer_norm2d_bwd", mutates_args=())(_backward_launch)


@layer_norm2d_bwd.register_fake
def _(grad_out, x, weight, with_bias, eps):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty(weight.shape if with_bias else 0)


def _save(ctx, inputs, out, state):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.eps = eps


def _backward(ctx, grad_out, launch):
    x, weight = ctx.saved_tensors
    with_bias = ctx.bias_dtype is not None
    dx, dweight, dbias = launch(grad_out, x, weight, with_bias, ctx.eps)
    return dx, dweight, dbias.to(ctx.bias_dtype) if with_bias else None, None


_Eager = kernel_autograd("LayerNorm2d", layer_norm2d_fwd, layer_norm2d_bwd, _forward, _backward_launch, _save,
                         _backward)


def layer_norm2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 eps: float = 1e-5) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.layer_norm2d` (inputs validated there)."""
    return (_Eager.apply if plain_eager(x) else layer_norm2d_fwd)(x, weight, bias, float(eps))
