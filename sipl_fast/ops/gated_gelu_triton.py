"""``gated_gelu`` on the ``triton`` backend: custom ops around the fused gate kernels.

``sipl_fast::gated_gelu_fwd`` and ``sipl_fast::gated_gelu_bwd`` are torch.library custom ops
(fake implementations included, so torch.compile traces through them); autograd is registered
on the forward op and saves only x (the backward recomputes gelu). The output and gradient
keep x's dtype. A tensor whose per-image (2h, H, W) block is not contiguous (e.g.
channels_last) is copied once to contiguous; a channel slice of a larger tensor is used in place.
"""
from __future__ import annotations

import torch

from ..kernels.gated_gelu import gated_gelu_backward, gated_gelu_forward

__all__ = ["gated_gelu", "gated_gelu_fwd", "gated_gelu_bwd"]


def _with_contiguous_images(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() == 0 or t[0].is_contiguous() else t.contiguous()


@torch.library.custom_op("sipl_fast::gated_gelu_fwd", mutates_args=())
def gated_gelu_fwd(x: torch.Tensor, dual: bool) -> torch.Tensor:
    """gelu(x1) * x2, or gelu(x2) * x1 + gelu(x1) * x2 when ``dual``, for x = (x1, x2) split on channels."""
    return gated_gelu_forward(_with_contiguous_images(x), dual)


@gated_gelu_fwd.register_fake
def _(x, dual):
    batch, channels, height, width = x.shape
    return x.new_empty((batch, channels // 2, height, width))


@torch.library.custom_op("sipl_fast::gated_gelu_bwd", mutates_args=())
def gated_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, dual: bool) -> torch.Tensor:
    """dL/dx (B, 2h, H, W) from dL/dout (B, h, H, W)."""
    return gated_gelu_backward(_with_contiguous_images(grad_out), _with_contiguous_images(x), dual)


@gated_gelu_bwd.register_fake
def _(grad_out, x, dual):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, dual = inputs
    ctx.save_for_backward(x)
    ctx.dual = dual


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return gated_gelu_bwd(grad_out, x, ctx.dual), None


gated_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_gelu(x: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """The ``triton`` backend of :func:`sipl_fast.ops.gated_gelu` (inputs validated there)."""
    return gated_gelu_fwd(x, bool(dual))
