"""pytest-benchmark: the Proxy Fusion cross-attention, triton vs torch vs torch.compile vs reference.

    pytest bench/test_bench_proxy_attention.py --benchmark-only      # CUDA: the SIPL shapes
    pytest bench/test_bench_proxy_attention.py --benchmark-disable   # CPU: tiny shapes, each case once

Cases, providers and inputs come from bench/proxy_attention_table.py (the GPU script that
prints the whole table and checks the targets). On CPU the triton provider (the interpreter is
~1000x slower) and torch.compile (minutes of C++ compilation) are skipped. On CUDA the
compile provider's cases are marked slow (one static compile each; run them with --run-slow
or read them from the table script). Peak memory above the inputs goes to extra_info.
Timings are recorded, never asserted.
"""
from __future__ import annotations

import pytest
import torch

import proxy_attention_table as table
import table_harness as harness

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = table.SHAPES if CUDA else table.SMOKE_SHAPES[:1]
DTYPES = ("bf16", "fp32") if CUDA else ("fp32", "bf16")
PROVIDERS = [pytest.param(p, marks=pytest.mark.slow) if CUDA and p == "compile" else p for p in table.PROVIDERS]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", table.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_proxy_attention(benchmark, shape, dtype, mode, provider):
    if not CUDA and provider in ("triton", "compile"):
        pytest.skip(f"{provider} is benchmarked on CUDA only")
    run, _ = table.make_runner(shape, table.DTYPES[dtype], mode, provider, DEVICE)
    run_synchronised = harness.synchronised(run, DEVICE)
    run_synchronised()  # compile, autotune and warm up outside the timed rounds
    n_q, n_kv = shape.tokens
    benchmark.extra_info.update(n_q=n_q, n_kv=n_kv, batch=shape.batch, heads=shape.heads, head_dim=shape.head_dim,
                                dtype=dtype, peak_MiB=harness.peak_mib(run, DEVICE))
    if CUDA:
        benchmark.pedantic(run_synchronised, rounds=10, iterations=1, warmup_rounds=1)
    else:  # a few fixed rounds instead of pytest-benchmark's one second of calibration per case
        benchmark.pedantic(run_synchronised, rounds=3, iterations=1)
