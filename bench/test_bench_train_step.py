"""pytest-benchmark: one SIPL training step, reference backend vs the automatic (fastest) one,
each also replayed as a CUDA graph on CUDA.

    pytest bench/test_bench_train_step.py --benchmark-only

CUDA: base preset, batch 8, 128 x 128 (fp32 and bf16 autocast); CPU: tiny preset, batch 2,
64 x 64, fp32. The peak memory of one step beyond what was allocated before it goes into
each result's extra_info. Timings are measured and reported, never asserted.
"""
import pytest
import torch

from peak_memory import peak_extra_bytes
from sipl_fast.train import GRAPH_WARMUP_STEPS
from train_step_table import PROVIDERS, default_shape, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = ("fp32", "bf16") if DEVICE.type == "cuda" else ("fp32",)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", PROVIDERS[DEVICE.type])
def test_train_step(benchmark, backend, dtype):
    shape = default_shape(DEVICE)
    step, _ = make_step(backend, DEVICE, amp=dtype == "bf16", **shape)

    def run():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(GRAPH_WARMUP_STEPS + 1):  # "+graph": eager warm-up steps, then the capture
        run()
    benchmark.group = f"train step {shape['preset']} b{shape['batch']} {shape['patch']}px {dtype}"
    benchmark.pedantic(run, rounds=5 if DEVICE.type == "cuda" else 2, iterations=1)
    benchmark.extra_info.update(shape, backend=backend, dtype=dtype,
                                peak_extra_mib=peak_extra_bytes(run, DEVICE) / 2**20)
