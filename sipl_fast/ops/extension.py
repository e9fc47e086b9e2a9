"""Loading of the compiled extension ``sipl_fast._C`` and the Python side of its ops.

The package works without the extension (every op has a torch fallback); when ``_C`` is
missing or fails to load, one warning says why. Fake (meta) implementations registered here
let torch.compile and FakeTensor tracing see the C++ ops' output shapes.
"""
from __future__ import annotations

import warnings

import torch

LOAD_ERROR: str | None = None
BUILD_INFO: dict = {}


def _load() -> bool:
    global LOAD_ERROR, BUILD_INFO
    try:
        from .._build_info import BUILD_INFO as info
    except ImportError:
        info = {}
    BUILD_INFO = dict(info)
    built_for = info.get("torch_version")
    if built_for is not None and built_for.split("+")[0] != torch.__version__.split("+")[0]:
        LOAD_ERROR = (f"sipl_fast._C was built against torch {built_for} but torch {torch.__version__} "
                      "is running; rebuild with: pip install --no-build-isolation -e .")
        return False
    try:
        from .. import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as exc:
        LOAD_ERROR = f"sipl_fast._C could not be loaded ({exc}); build it with: pip install --no-build-isolation -e ."
        return False
    return True


LOADED = _load()
if not LOADED:
    warnings.warn(f"{LOAD_ERROR} Falling back to pure-torch implementations.", RuntimeWarning, stacklevel=2)


def built_with_cuda() -> bool:
    """True when the loaded extension has its CUDA kernels compiled in."""
    return LOADED and bool(torch.ops.sipl_fast.built_with_cuda())


if LOADED:
    @torch.library.register_fake("sipl_fast::step_delta")
    def _step_delta_fake(prev, new):
        torch._check(prev.shape == new.shape, lambda: "step_delta: shapes differ")
        return prev.new_empty((prev.shape[0],), dtype=torch.float32)


def _step_delta_torch(prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return (new.float() - prev.float()).abs().flatten(1).mean(1)


def step_delta(prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-image mean |new - prev| (float32), the convergence measure of a refinement step."""
    if prev.shape != new.shape or prev.dtype != new.dtype or prev.device != new.device:
        raise ValueError(
            f"step_delta: prev {tuple(prev.shape)} {prev.dtype}@{prev.device} and new "
            f"{tuple(new.shape)} {new.dtype}@{new.device} must match in shape, dtype and device"
        )
    if LOADED and (new.device.type == "cpu" or (new.device.type == "cuda" and built_with_cuda())):
        return torch.ops.sipl_fast.step_delta(prev, new)
    return _step_delta_torch(prev, new)
