"""Peak-memory measurement for benchmarks: CUDA allocator peaks, or peak RSS on the CPU.

On the CPU torch has no allocator statistics, so the process's resident-set high-water mark
(VmHWM) is reset through /proc/self/clear_refs before the call and read after it; the peak
minus the RSS before the call is the memory the call needed on top of what was resident
(weights, inputs).
"""
from __future__ import annotations

import gc
from typing import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes the call needed at its peak beyond what was allocated/resident before it."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
