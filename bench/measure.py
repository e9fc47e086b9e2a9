"""How the benchmarks time a call and measure its memory, and what they record.

With pytest-benchmark disabled (``--benchmark-disable``, the CI smoke run) each case calls its
op or model once and measures nothing. Otherwise a case records in ``benchmark.extra_info``
its description, "ms" (the time bench/report.py reports), "peak_mib" and "first_call_s" (the
warm-up call: torch.compile, Triton's compilation and autotuning, a CUDA graph's capture):

- ops (:func:`record_op`): a warm-up call; on CUDA the allocator's peak during the next call
  above what was allocated before it (the inputs stay out); pytest-benchmark's rounds, each
  call followed by a CUDA synchronize; on CUDA "ms" is ``triton.testing.do_bench``'s median
  (calls back to back: the kernels plus their launch gaps), on the CPU the rounds' median.
  No peak on the CPU (a resident-set peak cannot see a small op).
- refinement and training step (:func:`record_end_to_end`): "ms" is the rounds' median (each
  round synchronised); the peak covers the warm-up calls (a CUDA graph's private pool, made
  while it is captured, counts) and the timed rounds, above what was allocated (CUDA) or
  resident (CPU: the VmHWM high-water mark; rough, memory the process already holds is reused
  without raising it) once the model (or trainer) and the inputs existed.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch


def synchronised(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``run`` followed, on CUDA, by a synchronize, so that a timer sees its kernels finish."""
    if device.type != "cuda":
        return run

    def run_synchronised():
        result = run()
        torch.cuda.synchronize(device)
        return result
    return run_synchronised


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """A window over which the peak memory beyond what was allocated (CUDA) or resident (CPU)
    when it opened is measured: ``with PeakMemory(device) as peak: ...; peak.mib``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
            self.before = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_bytes("VmHWM")
        self.mib = (peak - self.before) / 2**20
        return False


def record_op(benchmark, run: Callable[[], object], device: torch.device, *, rounds: int, **info) -> object:
    """An op's call: a warm-up call, the peak memory of the next call above its inputs (CUDA),
    ``rounds`` timed calls and, on CUDA, do_bench's median as "ms". Returns ``run``'s result."""
    benchmark.extra_info.update(info)
    timed = synchronised(run, device)
    if benchmark.disabled:  # the smoke run: one call
        return benchmark.pedantic(timed, rounds=1, iterations=1)
    first_call_s = _seconds(timed)
    peak_mib = None
    if device.type == "cuda":
        with PeakMemory(device) as window:
            timed()
        peak_mib = window.mib
    result = benchmark.pedantic(timed, rounds=rounds, iterations=1)
    ms = benchmark.stats.stats.median * 1e3
    if device.type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    benchmark.extra_info.update(ms=ms, peak_mib=peak_mib, first_call_s=first_call_s)
    return result


def record_end_to_end(benchmark, prepare: Callable[[], Callable[[], object]], device: torch.device, *,
                      warmup_calls: int, rounds: int, **info) -> object:
    """A refinement or training step: ``prepare()`` builds the model or trainer and returns the
    call. On CUDA a first prepared call is made and dropped (Triton compiles and autotunes its
    kernels outside the memory window); then the peak-memory window covers ``warmup_calls``
    calls (a CUDA graph's capture among them) and the ``rounds`` timed calls of a fresh one."""
    benchmark.extra_info.update(info)
    if benchmark.disabled:  # the smoke run: one call
        return benchmark.pedantic(synchronised(prepare(), device), rounds=1, iterations=1)
    if device.type == "cuda":
        synchronised(prepare(), device)()
        gc.collect()
        torch.cuda.empty_cache()
    timed = synchronised(prepare(), device)
    with PeakMemory(device) as window:
        first_call_s = _seconds(timed)
        for _ in range(warmup_calls - 1):
            timed()
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1)
    benchmark.extra_info.update(ms=benchmark.stats.stats.median * 1e3, peak_mib=window.mib,
                                first_call_s=first_call_s)
    return result


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def assert_finite(result) -> None:
    """Every tensor in ``result`` (a tensor or a tuple of them) is finite: the smoke check."""
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            assert torch.isfinite(tensor.float()).all(), "non-finite values"
