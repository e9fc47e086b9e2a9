"""End to end: refinement (steps=2) and one training step, sipl_fast against the authors' code path.

    pytest bench/test_end_to_end.py --benchmark-only               # CUDA: 512x512, 1280x720, base preset b8 128px
    pytest bench/test_end_to_end.py --benchmark-only [--run-slow]  # CPU: the tiny preset (--run-slow: the full model)

Refinement of one image with steps=2: ``authors`` is the authors' loop as released
(``sipl_fast.refine.authors_loop``: 2 forward passes and 1 encoder pass per step over whole
maps) on the reference backend in float32, the baseline; ``eager`` is
``model.refine(x, steps=2, cuda_graph=False)``; ``graph`` (CUDA) is one
``Refiner(model, steps=2, cuda_graph=True)`` kept, its first call capturing a step and later
calls replaying it. ``eager`` and ``graph`` run in fp32 (the model's dtype) and in bf16
(``dtype=torch.bfloat16``: the network on the model's cast copy, the image state float32; the
copy is made before the measured calls, as the model itself is). The full (base) model in eval
mode with random dictionaries (trained ones are not zeros).

Training step (``Trainer.train_step``: the no-grad plain pass and encoder on the clean batch,
the privileged pass, L1, backward, clipping, AdamW): ``reference`` is the reference backend in
the authors' NCHW layout, the baseline; ``eager`` the automatic backend in the trainer's
default layout, stepping eagerly; ``graph`` (CUDA) the step replayed from a CUDA graph (the
trainer's default on one CUDA process). fp32, and bf16 autocast on CUDA.
"""
from __future__ import annotations

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import Refiner, authors_loop, cast_model
from sipl_fast.train import GRAPH_WARMUP_STEPS, TrainOptions, Trainer

import shapes
from measure import assert_finite, record_end_to_end

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (impl, dtype) of the refinement cases; the authors' loop is the fp32 baseline only.
REFINE_RUNS = [("authors", "fp32"), ("eager", "fp32"), ("eager", "bf16")] + (
    [("graph", "fp32"), ("graph", "bf16")] if CUDA else [])
REFINE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TRAIN_IMPLS = ("reference", "eager", "graph") if CUDA else ("reference", "eager")
TRAIN_DTYPES = ("fp32", "bf16") if CUDA else ("fp32",)


def _refine_cases():
    """(preset, (H, W)): CUDA the full model at its sizes; CPU the tiny preset, and the full
    model marked slow."""
    if CUDA:
        return [pytest.param("base", size, id=f"base-{size[1]}x{size[0]}") for size in shapes.REFINE_SIZES["cuda"]]
    preset, size = shapes.REFINE_SMOKE
    return [pytest.param(preset, size, id=f"{preset}-{size[1]}x{size[0]}")] + [
        pytest.param("base", size, marks=pytest.mark.slow, id=f"base-{size[1]}x{size[0]}")
        for size in shapes.REFINE_SIZES["cpu"]]


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
    x = torch.rand(1, 3, *size, device=DEVICE)
    label = f"{size[1]}x{size[0]}"
    benchmark.group = f"refine steps=2 {preset} {label}"
    slow = not CUDA and preset == "base"
    result = record_end_to_end(benchmark, lambda: refine_call(model, x, impl, dtype), DEVICE, warmup_calls=1,
                               rounds=2 if slow else 3 if not CUDA else 5, table="refine",
                               case=f"{label} {preset}", dtype=dtype, mode="steps=2", impl=impl,
                               baseline="authors")
    assert_finite(result)


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
