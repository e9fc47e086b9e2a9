"""pytest-benchmark: MDTA transposed attention, triton vs reference vs torch vs torch.compile.

    pytest bench/test_bench_transposed_attention.py --benchmark-only      # CUDA: SIPL shapes, bf16
    pytest bench/test_bench_transposed_attention.py --benchmark-disable   # CPU: a tiny shape, each case once

Shapes, providers and inputs come from bench/transposed_attention_table.py (the script that
prints the whole table with GB/s and the targets). On the CPU the triton provider is skipped
(the interpreter is ~1000x slower: a correctness tool, not a benchmark). Timings are
recorded, never asserted; GB/s and peak memory go into each case's extra_info.
"""
from __future__ import annotations

import pytest
import torch

import table_harness as harness
import transposed_attention_table as table
from peak_memory import peak_extra_bytes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    torch.set_num_threads(1)  # tiny ops on a loaded 2-core machine: threads only contend
DTYPE = torch.bfloat16 if CUDA else torch.float32
# CUDA: the bandwidth-target shape and the training step's; CPU: one tiny shape.
SHAPES = [s for s in table.SHAPES if s.name in ("dec1 512x512", "enc1 128x128 B8")] if CUDA else table.SMOKE_SHAPES


@pytest.mark.parametrize("provider", table.PROVIDERS)
@pytest.mark.parametrize("mode", table.MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_transposed_attention(benchmark, shape, mode, provider):
    if not CUDA and provider == "triton":
        pytest.skip("triton is benchmarked on CUDA only (the CPU interpreter is a correctness tool)")
    run, _ = table.make_runner(shape, DTYPE, mode, provider, DEVICE)
    run_synchronised = harness.synchronised(run, DEVICE)
    run_synchronised()  # compile and warm up outside the timed rounds
    moved = table.TENSORS_MOVED[mode] * shape.stream_bytes(DTYPE)
    benchmark.extra_info.update(dtype=str(DTYPE), channels=shape.channels, heads=shape.heads, hw=shape.hw,
                                bytes_moved=moved, peak_extra_MiB=peak_extra_bytes(run_synchronised, DEVICE) / 2**20)
    harness.benchmark_calls(benchmark, run_synchronised, DEVICE)
    if benchmark.stats:
        benchmark.extra_info["GBs"] = moved / benchmark.stats.stats.median / 1e9
    if provider == "compile":
        torch._dynamo.reset()  # one static compile per case
