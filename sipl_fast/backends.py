"""Backend selection: the one place that decides which implementation an op runs.

Three backends compute the same math:

- ``reference``: the authors' eager formulation (materialised attention matrices).
  The oracle of every test and the baseline of every benchmark.
- ``torch``: the best pure-PyTorch formulation (SDPA, no avoidable copies).
- ``triton``: the fused Triton kernels (``sipl_fast.kernels``). On CPU tensors it
  only runs under ``TRITON_INTERPRET=1``.

Choose with ``sipl_fast.use_backend(name)`` (a context manager, thread-local) or the
``SIPL_FAST_BACKEND`` environment variable (read by :mod:`sipl_fast.settings` on each call).
``auto`` (the default) picks ``triton`` for CUDA tensors when Triton is importable, ``torch``
otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import threading
from typing import Iterator

import torch

from . import settings
from .settings import BACKENDS, triton_interpreter  # noqa: F401 - re-exported

_state = threading.local()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend`` or ``SIPL_FAST_BACKEND``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return settings.backend()


def resolve_backend(device: torch.device) -> str:
    """The backend an op on ``device`` runs with."""
    name = requested_backend()
    if name != "auto":
        return name
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with the given backend (``reference``, ``torch``, ``triton``, ``auto``)."""
    settings.check_backend(name, "use_backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
