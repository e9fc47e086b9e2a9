"""Self-refinement (steps=2): the authors' loop on the reference backend vs sipl_fast's Refiner.

CPU: the tiny preset always; the full configuration at 128x128 and 256x256 with --run-slow
(tens of seconds per call on two cores). CUDA (marked gpu): the full configuration at 512x512
and 1280x720. Peak memory beyond what was resident before the call goes to extra_info.

    pytest bench/test_bench_refine.py --benchmark-only [--run-slow]
"""
from __future__ import annotations

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import authors_loop

from peak_memory import peak_extra_bytes

CASES = [
    ("tiny", "cpu", (32, 32), []),
    ("base", "cpu", (128, 128), [pytest.mark.slow]),
    ("base", "cpu", (256, 256), [pytest.mark.slow]),
    ("base", "cuda", (512, 512), [pytest.mark.gpu]),
    ("base", "cuda", (720, 1280), [pytest.mark.gpu]),
]


def _refine_call(provider: str, model, x):
    if provider == "reference":
        def run():
            with sipl_fast.use_backend("reference"):
                return authors_loop(model, x, steps=2)
    else:
        def run():
            return model.refine(x, steps=2)
    if x.is_cuda:
        def synced():
            out = run()
            torch.cuda.synchronize()
            return out
        return synced
    return run


@pytest.mark.parametrize("provider", ["reference", "sipl_fast"])
@pytest.mark.parametrize("preset,device,size", [pytest.param(p, d, s, marks=m, id=f"{p}-{d}-{s[0]}x{s[1]}")
                                                for p, d, s, m in CASES])
def test_refine_steps2(benchmark, provider, preset, device, size):
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset(preset).eval().to(device)
    x = torch.rand(1, 3, *size, device=device)
    run = _refine_call(provider, model, x)
    run()  # warm-up: kernels compiled and autotuned, caches filled, buffers allocated
    benchmark.group = f"refine-{preset}-{device}-{size[0]}x{size[1]}"
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(run, device)
    benchmark.pedantic(run, rounds=3 if device == "cuda" or preset == "tiny" else 1, iterations=1)
