"""Launching a Triton kernel without Triton's per-call argument binding (experimental, off by
default: SIPL_FAST_LAUNCH_CACHE=1 turns it on).

``kernel[grid](*args, **kwargs)`` binds the arguments to the signature, specialises each one
(dtype, 16-byte alignment, integer value classes), builds a cache key from them and only then
calls the compiled kernel's launcher: ~11 us per launch of MDTA's 31-argument channel mix on
this project's CPU machine (Triton 3.8's binder and cache key, measured without a GPU), for
kernels that run for microseconds. The eager MDTA fwd+bwd makes 9 launches.

``launch`` remembers, per kernel, grid, integer and constexpr arguments, tensor dtypes and
16-byte alignments, the compiled kernel that Triton's launcher chose on the first such call,
and later calls go straight to that kernel's own launcher (``CompiledKernel[grid]``) with the
same bound arguments. The key holds every integer exactly, so it determines Triton's
specialisation; where this Triton's internals differ from what the cache expects (the binder
of ``device_caches``, constexpr parameters last), the kernel keeps Triton's launcher.
"""
from __future__ import annotations

import os

import torch
import triton

from sipl_fast.backends import triton_interpreter

__all__ = ["launch", "stats"]

# Never under the interpreter, which compiles nothing.
_ENABLED = os.environ.get("SIPL_FAST_LAUNCH_CACHE", "0") == "1" and not triton_interpreter()
_MAX_ENTRIES = 4096  # distinct (kernel, shape) calls kept; a process with more starts over
_NO_RUNNER = object()
_runners: dict = {}
stats = {"hits": 0, "misses": 0, "fallbacks": 0}


def _argument_key(args) -> tuple:
    """Every argument as it decides the compiled kernel: tensors by dtype and 16-byte alignment,
    everything else (integers, floats, None) by value."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


def _current_device() -> int:
    return triton.runtime.driver.active.get_current_device()


def _make_runner(kernel, compiled, grid, args, kwargs):
    """The compiled kernel's launcher with this call's constexpr values appended, or _NO_RUNNER."""
    try:
        binder = kernel.device_caches[_current_device()][-1]
        bound = list(binder(*args, **kwargs)[0].values())
        head, tail = bound[:len(args)], tuple(bound[len(args):])
        if len(bound) < len(args) or any(b is not a for b, a in zip(head, args)):
            raise TypeError("bound arguments are not the positional ones in order")
        runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]
    except Exception:  # noqa: BLE001 - another Triton: keep its own launcher for this call site
        stats["fallbacks"] += 1
        return _NO_RUNNER
    return lambda *a: runner(*a, *tail)


def launch(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, through the cache where it is enabled. ``args`` are the
    kernel's leading parameters in order (tensors and plain numbers), ``kwargs`` its constexpr
    parameters and launch options."""
    if not _ENABLED:
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, grid, tuple(kwargs.items()), _argument_key(args))
    runner = _runners.get(key)
    if runner is None:
        stats["misses"] += 1
        compiled = kernel[grid](*args, **kwargs)
        if len(_runners) >= _MAX_ENTRIES:
            _runners.clear()
        _runners[key] = _make_runner(kernel, compiled, grid, args, kwargs)
        return
    if runner is _NO_RUNNER:
        kernel[grid](*args, **kwargs)
        return
    stats["hits"] += 1
    runner(*args)
