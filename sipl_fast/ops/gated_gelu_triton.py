"""``gated_gelu`` on the ``triton`` backend: custom ops around the fused gate kernels.

``sipl_fast::gated_gelu_fwd`` and ``sipl_fast::gated_gelu_bwd`` are torch.library custom ops
(fake implementations included, so torch.compile traces through them); autograd is registered
on the forward op and saves only x (the backward recomputes gelu); plain eager calls run the
same launchers as an autograd.Function (sipl_fast.ops.eager). The output and gradient
keep x's dtype. A tensor whose per-image (2h, H, W) block is not contiguous (e.g.
channels_last) is copied once to contiguous; a channel slice of a larger tensor is used in place.
"""
from __future__ import annotations

import torch

from ..kernels.gated_gelu import gated_gelu_backward, gated_gelu_forward
from .eager import kernel_autograd, plain_eager

__all__ = ["gated_gelu", "gated_gelu_fwd", "gated_gelu_bwd"]


def _with_contiguous_images(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() == 0 or t[0].is_contiguous() else t.contiguous()


def _forward(x: torch.Tensor, dual: bool) -> torch.Tensor:
    """gelu(x1) * x2, or gelu(x2) * x1 + gelu(x1) * x2 when ``dual``, for x = (x1, x2) split on channels."""
    return gated_gelu_forward(_with_contiguous_images(x), dual)


gated_gelu_fwd = torch.library.custom_op("sipl_fast::gated_gelu_fwd", mutates_args=())(_forward)


@gated_gelu_fwd.register_fake
def _(x, dual):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


def _backward_launch(grad_out: torch.Tensor, x: torch.Tensor, dual: bool) -> torch.Tensor:
    """dL/dx (B, 2h, H, W) from dL/dout (B, h, H, W)."""
    return gated_gelu_backward(_with_contiguous_images(grad_out), _with_contiguous_images(x), dual)


gated_gelu_bwd = torch.library.custom_op("sipl_fast::gated_gelu_bwd", mutates_args=())(_backward_launch)


@gated_gelu_bwd.register_fake
def _(grad_out, x, dual):
    return x.new_empty(x.shape)


def _save(ctx, inputs, out, state):
    x, dual = inputs
    ctx.save_for_backward(x)
    ctx.dual = dual


def _backward(ctx, grad_out, launch):
    (x,) = ctx.saved_tensors
    return launch(grad_out, x, ctx.dual), None


_Eager = kernel_autograd("GatedGelu", gated_gelu_fwd, gated_gelu_bwd, _forward, _backward_launch, _save, _backward)


def gated_gelu(x: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.gated_gelu` (inputs validated there)."""
    return (_Eager.apply if plain_eager(x) else gated_gelu_fwd)(x, bool(dual))
