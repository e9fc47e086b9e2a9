"""A helper for the custom ops whose extra outputs carry state to their own backward."""
from __future__ import annotations

import torch

__all__ = ["mark_saved_state"]


def mark_saved_state(ctx, *outputs: torch.Tensor) -> None:
    """In a custom op's setup_context: ``outputs`` only carry state to the backward
    (statistics, normalisers) and are never differentiated, so autograd neither zero-fills
    gradients for them (one fill kernel each per backward) nor passes any: the backward gets
    None for them (it runs only when the op's result received a gradient)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)
