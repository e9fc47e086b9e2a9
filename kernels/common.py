"""What every kernel module shares: the interpreter flag, the arithmetic dtype of the pointwise
kernels, the multiprocessor count and F.normalize's eps."""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from sipl_fast.ops.reference import NORMALIZE_EPS
from sipl_fast.settings import triton_interpreter

__all__ = ["INTERPRET", "NORMALIZE_EPS", "compute_dtype", "multiprocessors"]

# Triton reads TRITON_INTERPRET when a kernel is defined (at import of its module), so the
# value at import is the one the kernels run with; the launch plans follow the same value.
INTERPRET = triton_interpreter()


def compute_dtype(*tensors: torch.Tensor):
    """The kernels' arithmetic type: float64 if any tensor is float64, else float32 (whatever
    the storage dtype)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (the launch plans size their grids to it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
