"""pytest-benchmark: LayerNorm2d, the FFN gates and the depthwise3x3(conv1x1) projection, triton
vs torch vs reference vs torch.compile.

    pytest bench/test_bench_pixel_ops.py --benchmark-only      # CUDA: 128x128 batch-8 training shapes
    pytest bench/test_bench_pixel_ops.py --benchmark-disable   # CPU: tiny shapes, each case run once

Cases, providers and inputs come from bench/pixel_ops_table.py (the script that prints the
whole table). On CPU the triton provider (the interpreter is ~1000x slower) and torch.compile
(minutes of C++ compilation) are skipped. Timings are recorded, never asserted.
"""
from __future__ import annotations

import pytest
import torch

import pixel_ops_table as table
import table_harness as harness

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    # The CPU run only checks the cases; on a loaded 2-core machine OpenMP threads contend
    # (tiny elementwise ops go from 0.05 ms to 20 ms), so one thread keeps it fast and steady.
    torch.set_num_threads(1)
SCENARIO, DTYPE = ("train128", "amp") if CUDA else ("smoke", "fp32")
# One site per kind: the norm at full and at quarter resolution, the GDFN gate, the DualGate,
# the widest projection at full and at quarter resolution.
SITES = [site for site in table.SITES
         if (site.op, site.name) in {("layer_norm2d", "dec1+refinement"), ("layer_norm2d", "enc3+dec3+cross_p2"),
                                     ("gated_gelu", "dec1+refinement"), ("dual_gate", "cross_p1"),
                                     ("pointwise_depthwise", "dec1+refinement ffn"),
                                     ("pointwise_depthwise", "enc3+dec3 ffn")}]


@pytest.mark.parametrize("provider", table.PROVIDERS)
@pytest.mark.parametrize("mode", table.MODES)
@pytest.mark.parametrize("site", SITES, ids=lambda s: f"{s.op}-{s.name}-{s.channels}ch-1/{s.scale}")
def test_pixel_op(benchmark, site, mode, provider):
    if not CUDA and provider in ("triton", "compile"):
        pytest.skip(f"{provider} is benchmarked on CUDA only")
    run, _ = table.make_runner(site, SCENARIO, DTYPE, mode, provider, DEVICE)
    run_synchronised = harness.synchronised(run, DEVICE)
    run_synchronised()  # compile and warm up outside the timed rounds
    benchmark.extra_info.update(scenario=SCENARIO, dtype=DTYPE, channels=site.channels, scale=site.scale)
    harness.benchmark_calls(benchmark, run_synchronised, DEVICE)
