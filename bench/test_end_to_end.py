"""End to end: refinement (steps=2) and one training step, sipl_fast against the authors' code path.

    pytest bench/test_end_to_end.py --benchmark-only               # CUDA: 512x512, 1280x720, base preset b8 128px
    pytest bench/test_end_to_end.py --benchmark-only [--run-slow]  # CPU: the tiny preset (--run-slow: the full
                                                                   # model at 256x256 and 512x512)

Refinement of one image with steps=2: ``authors`` is the authors' loop as released
(``sipl_fast.refine.authors_loop``: 2 forward passes and 1 encoder pass per step over whole
maps) on the reference backend in float32, the baseline; ``eager`` is
``model.refine(x, steps=2, cuda_graph=False)``; ``graph`` (CUDA) is one
``Refiner(model, steps=2, cuda_graph=True)`` kept, its first call capturing a step and later
calls replaying it. ``eager`` and ``graph`` run in fp32 (the model's dtype) and in bf16
(``dtype=torch.bfloat16``: the network on the model's cast copy, the image state float32; the
copy is made before the measured calls, as the model itself is). The full (base) model in eval
mode with random dictionaries (trained ones are not zeros).

On the CPU the full model is measured by ``test_refine_cpu``, one case per size that calls the
authors' loop, eager fp32 and eager bf16 in turn, round after round, so that the load of a
shared CPU reaches all three alike; each implementation gives a row (the median of its rounds,
each round's time, the load average before and after). Its peak memory is measured in a child
process per implementation (``cpu_peak_mib``) that returns freed memory to the system, so that
the peak is the refinement's own and not the history of the heap (in one process glibc keeps
freed memory, and a later case reuses what an earlier one grew without raising the resident set).

Training step (``Trainer.train_step``: the no-grad plain pass and encoder on the clean batch,
the privileged pass, L1, backward, clipping, AdamW): ``reference`` is the reference backend in
the authors' NCHW layout, the baseline; ``eager`` the automatic backend in the trainer's
default layout, stepping eagerly; ``graph`` (CUDA) the step replayed from a CUDA graph (the
trainer's default on one CUDA process). fp32, and bf16 autocast on CUDA.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import Refiner, authors_loop, cast_model
from sipl_fast.train import GRAPH_WARMUP_STEPS, TrainOptions, Trainer

import shapes
from measure import PeakMemory, assert_finite, record_end_to_end

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (impl, dtype) of the refinement cases; the authors' loop is the fp32 baseline only.
REFINE_RUNS = [("authors", "fp32"), ("eager", "fp32"), ("eager", "bf16")] + (
    [("graph", "fp32"), ("graph", "bf16")] if CUDA else [])
REFINE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TRAIN_IMPLS = ("reference", "eager", "graph") if CUDA else ("reference", "eager")
TRAIN_DTYPES = ("fp32", "bf16") if CUDA else ("fp32",)


def _refine_cases():
    """(preset, (H, W)): CUDA the full model at its sizes; CPU the tiny preset (the full model:
    test_refine_cpu)."""
    if CUDA:
        return [pytest.param("base", size, id=f"base-{size[1]}x{size[0]}") for size in shapes.REFINE_SIZES["cuda"]]
    preset, size = shapes.REFINE_SMOKE
    return [pytest.param(preset, size, id=f"{preset}-{size[1]}x{size[0]}")]


def make_model(preset: str) -> SIPLPromptIR:
    """The model in eval mode, seeded, its dictionaries random (trained ones are not zeros)."""
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset(preset).eval().to(DEVICE)
    with torch.no_grad():
        for k in (1, 2, 3):
            getattr(model, f"privileged_dictionary{k}").normal_()
    return model


def refine_call(model, x: torch.Tensor, impl: str, dtype: str = "fp32"):
    """A zero-argument refinement of x with steps=2 as ``impl`` does in ``dtype`` (module docstring)."""
    if impl == "authors":
        def run():
            with sipl_fast.use_backend("reference"):
                return authors_loop(model, x, steps=2)
        return run
    precision = REFINE_DTYPES[dtype]
    if precision is not None:
        cast_model(model, precision)   # the cast copy exists before the measured calls
    if impl == "graph":
        return lambda refiner=Refiner(model, steps=2, cuda_graph=True, dtype=precision): refiner(x)
    return lambda: model.refine(x, steps=2, cuda_graph=False, dtype=precision)


@pytest.mark.parametrize("impl,dtype", REFINE_RUNS, ids=[f"{impl}-{dtype}" for impl, dtype in REFINE_RUNS])
@pytest.mark.parametrize("preset,size", _refine_cases())
def test_refine(benchmark, preset, size, impl, dtype):
    model = make_model(preset)
    x = refine_input(size)
    label = f"{size[1]}x{size[0]}"
    benchmark.group = f"refine steps=2 {preset} {label}"
    result = record_end_to_end(benchmark, lambda: refine_call(model, x, impl, dtype), DEVICE, warmup_calls=1,
                               rounds=3 if not CUDA else 5, table="refine",
                               case=f"{label} {preset}", dtype=dtype, mode="steps=2", impl=impl,
                               baseline="authors", baseline_dtype="fp32")
    assert_finite(result)


def refine_input(size: tuple[int, int]) -> torch.Tensor:
    """The image every refinement case of ``size`` refines (seeded: a child process makes the same)."""
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def cpu_peak_mib(preset: str, size: tuple[int, int], impl: str, dtype: str) -> float:
    """The peak memory of one CPU refinement (MiB of resident set beyond what was resident before
    the call; the weights, the input and a bf16 cast copy already exist), measured in a child
    process after a warm-up call, with glibc returning freed blocks of 64 KiB and more to the
    system (MALLOC_MMAP_THRESHOLD_), so that the resident set follows the memory in use."""
    command = [sys.executable, __file__, "--peak-mib", preset, str(size[0]), str(size[1]), impl, dtype]
    done = subprocess.run(command, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def _print_peak_mib(preset: str, height: str, width: str, impl: str, dtype: str) -> None:
    """cpu_peak_mib's child: one warm-up call, then one call in the measured window."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))   # as conftest.py sets for the suite
    model = make_model(preset)
    call = refine_call(model, refine_input((int(height), int(width))), impl, dtype)
    call()
    with PeakMemory(torch.device("cpu")) as window:
        call()
    print(f"{window.mib:.1f}")


# The CPU rounds per implementation of test_refine_cpu (medians of 3; one warm-up call first).
CPU_REFINE_ROUNDS = 3


@pytest.mark.skipif(CUDA, reason="the CPU's interleaved refinement (CUDA: test_refine)")
@pytest.mark.slow
@pytest.mark.parametrize("size", shapes.REFINE_SIZES["cpu"], ids=lambda size: f"base-{size[1]}x{size[0]}")
def test_refine_cpu(benchmark, size):
    """The full model on the CPU: REFINE_RUNS' implementations called in turn, round after round
    (module docstring). pytest-benchmark times the whole interleaved run; the rows are in
    extra_info["rows"] (bench/report.py makes one row of each)."""
    model = make_model("base")
    x = refine_input(size)
    label = f"{size[1]}x{size[0]}"
    benchmark.group = f"refine steps=2 base {label} interleaved"
    calls = {run: refine_call(model, x, *run) for run in REFINE_RUNS}
    if benchmark.disabled:  # the smoke run: each implementation once
        for result in benchmark.pedantic(lambda: [call() for call in calls.values()], rounds=1, iterations=1):
            assert_finite(result)
        return
    seconds = {run: [] for run in REFINE_RUNS}   # the warm-up round first
    outputs = {}
    load_before = os.getloadavg()[0]

    def interleaved():
        for _ in range(1 + CPU_REFINE_ROUNDS):
            for run, call in calls.items():
                started = time.perf_counter()
                outputs[run] = call()
                seconds[run].append(time.perf_counter() - started)
    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-minute load average)"
    rows = []
    for (impl, dtype), (first_call_s, *timed) in seconds.items():
        assert_finite(outputs[impl, dtype])
        rows.append(dict(table="refine", case=f"{label} base", dtype=dtype, mode="steps=2", impl=impl,
                         baseline="authors", baseline_dtype="fp32", ms=statistics.median(timed) * 1e3,
                         calls_ms=[round(t * 1e3, 1) for t in timed], first_call_s=first_call_s,
                         peak_mib=cpu_peak_mib("base", size, impl, dtype), load=load))
    benchmark.extra_info["rows"] = rows


def _train_cases():
    if CUDA:
        return [pytest.param(shapes.TRAIN_STEP["cuda"], id="base-b8-128px")]
    return [pytest.param(shapes.TRAIN_SMOKE, id="tiny-b2-64px"),
            pytest.param(shapes.TRAIN_STEP["cpu"], marks=pytest.mark.slow, id="base-b2-64px")]


def make_step(impl: str, dtype: str, preset: str, batch: int, patch: int, out: str):
    """A zero-argument training step as ``impl`` runs it (module docstring)."""
    options = TrainOptions(data="skimage", tasks="noise25", preset=preset, batch=batch, patch=patch,
                           amp=dtype == "bf16", cuda_graph=impl == "graph",
                           channels_last=False if impl == "reference" else None, device=str(DEVICE), out=out,
                           progress=False)
    trainer = Trainer(options, log=lambda line: None)
    generator = torch.Generator().manual_seed(0)
    gt = torch.rand(batch, 3, patch, patch, generator=generator)
    lq = (gt + 0.1 * torch.randn(gt.shape, generator=generator)).clamp(0, 1)
    gt, lq = gt.to(DEVICE), lq.to(DEVICE)
    backend = "reference" if impl == "reference" else "auto"

    def step():
        with sipl_fast.use_backend(backend):
            return trainer.train_step(lq, gt)
    return step


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("setup", _train_cases())
def test_train_step(benchmark, tmp_path, setup, dtype, impl):
    case = f"{setup['preset']} b{setup['batch']} {setup['patch']}px"
    benchmark.group = f"train step {case} {dtype}"
    runs = iter(range(1000))
    result = record_end_to_end(
        benchmark, lambda: make_step(impl, dtype, out=str(tmp_path / f"run{next(runs)}"), **setup), DEVICE,
        warmup_calls=GRAPH_WARMUP_STEPS + 1 if impl == "graph" else 2,
        rounds=5 if CUDA else 2 if setup["preset"] == "base" else 3,
        table="train_step", case=case, dtype=dtype, mode="step", impl=impl, baseline="reference")
    assert_finite(result)


if __name__ == "__main__":   # cpu_peak_mib's child process: --peak-mib PRESET H W IMPL DTYPE
    if len(sys.argv) != 7 or sys.argv[1] != "--peak-mib":
        sys.exit(f"usage: {sys.argv[0]} --peak-mib PRESET HEIGHT WIDTH IMPL DTYPE")
    _print_peak_mib(*sys.argv[2:])
