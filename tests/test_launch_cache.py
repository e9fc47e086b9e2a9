"""kernels/launch_cache.py's bookkeeping on stand-ins for Triton's JIT function and compiled
kernel (the real launchers need a GPU: the GPU test in test_transposed_attention_triton.py
holds MDTA's results with the cache to those without it, bit for bit)."""
from __future__ import annotations

import pytest
import torch

from sipl_fast.kernels import launch_cache


class _Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *values: self.log.append(("compiled", grid, values))


class _Kernel:
    """A JIT function with parameters (x, n, BLOCK): Triton's launcher logs "jit"."""

    def __init__(self, binder_fails=False):
        self.log = []
        self.binder_fails = binder_fails
        self.device_caches = {0: ({}, {}, None, None, self._binder)}

    def _binder(self, x, n, BLOCK, **options):
        if self.binder_fails:
            raise TypeError("another Triton")
        return {"x": x, "n": n, "BLOCK": BLOCK}, [], options

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture
def cache(monkeypatch):
    monkeypatch.setattr(launch_cache, "_ENABLED", True)
    monkeypatch.setattr(launch_cache, "_current_device", lambda: 0)
    monkeypatch.setattr(launch_cache, "_runners", {})
    monkeypatch.setattr(launch_cache, "stats", dict.fromkeys(launch_cache.stats, 0))
    return launch_cache


def test_repeated_calls_go_to_the_compiled_launcher(cache):
    kernel, x = _Kernel(), torch.zeros(64)
    options = dict(BLOCK=32, num_warps=4)
    for _ in range(3):
        cache.launch(kernel, (5,), (x, 64), options)
    assert [entry[0] for entry in kernel.log] == ["jit", "compiled", "compiled"]
    assert kernel.log[1] == ("compiled", (5, 1, 1), (x, 64, 32))  # constexprs appended, grid 3-D
    assert cache.stats == {"hits": 2, "misses": 1, "fallbacks": 0}


def test_anything_that_decides_the_compiled_kernel_misses(cache):
    kernel, x = _Kernel(), torch.zeros(64)
    cache.launch(kernel, (5,), (x, 64), dict(BLOCK=32))
    for grid, args, options in [((6,), (x, 64), dict(BLOCK=32)),          # grid
                                ((5,), (x, 65), dict(BLOCK=32)),          # an integer
                                ((5,), (x, 64), dict(BLOCK=64)),          # a constexpr
                                ((5,), (x.double(), 64), dict(BLOCK=32)),  # a dtype
                                ((5,), (x[1:], 64), dict(BLOCK=32))]:     # 16-byte alignment
        cache.launch(kernel, grid, args, options)
        assert kernel.log[-1][0] == "jit", (grid, args, options)
    cache.launch(kernel, (5,), (torch.ones(64), 64), dict(BLOCK=32))  # another tensor, same key
    assert kernel.log[-1][0] == "compiled"


def test_another_triton_keeps_its_own_launcher(cache):
    kernel, x = _Kernel(binder_fails=True), torch.zeros(64)
    for _ in range(3):
        cache.launch(kernel, (5,), (x, 64), dict(BLOCK=32))
    assert [entry[0] for entry in kernel.log] == ["jit"] * 3
    assert cache.stats["fallbacks"] == 1 and cache.stats["hits"] == 0


def test_off_by_default_and_under_the_interpreter():
    assert launch_cache._ENABLED is False
    kernel = _Kernel()
    launch_cache.launch(kernel, (5,), (torch.zeros(64), 64), dict(BLOCK=32))
    launch_cache.launch(kernel, (5,), (torch.zeros(64), 64), dict(BLOCK=32))
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]
