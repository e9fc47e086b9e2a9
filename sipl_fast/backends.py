"""Backend selection: the one place that decides which implementation an op runs.

Three backends compute the same math:

- ``reference``: the authors' eager formulation (materialised attention matrices).
  The oracle of every test and the baseline of every benchmark.
- ``torch``: the best pure-PyTorch formulation (SDPA, no avoidable copies).
- ``triton``: the fused Triton kernels (``sipl_fast.kernels``). On CPU tensors it
  only runs under ``TRITON_INTERPRET=1``.

Choose with ``sipl_fast.use_backend(name)`` (a context manager, thread-local) or the
``SIPL_FAST_BACKEND`` environment variable. ``auto`` (the default) picks ``triton``
for CUDA tensors when Triton is importable, ``torch`` otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("reference", "torch", "triton")
_CHOICES = BACKENDS + ("auto",)
_state = threading.local()


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend`` or ``SIPL_FAST_BACKEND``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("SIPL_FAST_BACKEND", "auto"))


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
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
