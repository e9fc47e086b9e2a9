"""One SIPL training step, reference backend vs the fastest backend: time and peak memory.

    python bench/train_step_table.py [--json out.json] [--steps 10] [--dtypes fp32,bf16]

On CUDA: the authors' configuration (base preset), 128 x 128 crops, batch 8, fp32 and bf16
autocast. On CPU: the tiny preset, 64 x 64 crops, batch 2, fp32. "auto" is the backend
sipl_fast picks by itself (triton on CUDA, torch on CPU) in the trainer's default layout (NHWC
on the CPU, NCHW on CUDA); "reference" is the authors' eager math in NCHW; "+graph" replays the whole step as a CUDA graph (``--cuda-graph``: the eager step at
these sizes is bound by the CPU issuing kernels); "+nhwc" trains on channels-last activations
(``--channels-last``: cuDNN's depthwise convolutions instead of ATen's NCHW kernels); the graph
records the kernels of ops.graph_kernels("train") (the depthwise convolutions by sipl_fast's
Triton kernels), "+aten" what eager steps run instead (SIPL_FAST_GRAPH_KERNELS=0); "+dwk"
runs the depthwise convolutions (and, in the no-grad plain pass, the feed-forward's fused
depthwise convolution + gate) with the Triton kernels in eager steps too
(``ops.kernels_forced(*ops.DEPTHWISE_OPS)``). The step is ``Trainer.train_step``: the no-grad plain
pass and encoder on the clean batch, the privileged pass on the degraded batch, L1, backward,
clipping, AdamW.
Peak memory: on CUDA the allocator's peak over the whole measurement (warm-up, the capture
for "+graph", the timed steps), in total and beyond what was allocated before the first step
(the weights and the batch); a graph's private pool is allocated while it is captured, so the
peak covers it. On the CPU the resident-set peak of one step beyond the RSS before it (rough:
memory freed by earlier steps is reused without raising the RSS, so CPU numbers understate).
Prints a table and JSON; takes about two minutes on an H100 (fourteen configurations).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import date
from unittest import mock

import torch

import sipl_fast
from sipl_fast import ops
from peak_memory import peak_extra_bytes
from sipl_fast.train import GRAPH_WARMUP_STEPS, TrainOptions, Trainer

PROVIDERS = {"cpu": ("reference", "auto"),
             "cuda": ("reference", "auto", "reference+graph", "auto+graph", "auto+graph+nhwc", "auto+graph+aten",
                      "auto+dwk")}


def default_shape(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(preset="base", batch=8, patch=128)
    return dict(preset="tiny", batch=2, patch=64)


def _layout(backend: str, extras) -> bool | None:
    """NHWC for "+nhwc"; the authors' NCHW for the reference; else the library's default (None:
    NHWC on the CPU, NCHW on CUDA)."""
    if "nhwc" in extras:
        return True
    return False if backend == "reference" else None


def make_step(provider: str, device: torch.device, preset: str, batch: int, patch: int, amp: bool):
    """A zero-argument function running one training step with ``provider`` (a backend, plus
    "+graph", "+nhwc", "+dwk" as in the module docstring); also returns the trainer."""
    backend, *extras = provider.split("+")
    options = TrainOptions(data="skimage", tasks="noise25", preset=preset, batch=batch, patch=patch, amp=amp,
                           cuda_graph="graph" in extras, channels_last=_layout(backend, extras), device=str(device),
                           out=tempfile.mkdtemp(prefix="sipl_bench_"), progress=False)
    trainer = Trainer(options, log=lambda line: None)
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(batch, 3, patch, patch, generator=g)
    lq = (gt + 0.1 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    gt, lq = gt.to(device), lq.to(device)

    forced = ops.DEPTHWISE_OPS if "dwk" in extras else ()
    graph_kernels = {"SIPL_FAST_GRAPH_KERNELS": "0" if "aten" in extras else "1"}

    def step():
        with sipl_fast.use_backend(backend), ops.kernels_forced(*forced), mock.patch.dict(os.environ, graph_kernels):
            return trainer.train_step(lq, gt)

    return step, trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(provider: str, device: torch.device, amp: bool, steps: int, warmup: int, **shape) -> dict:
    step, trainer = make_step(provider, device, amp=amp, **shape)
    if trainer.cuda_graph:
        warmup = max(warmup, GRAPH_WARMUP_STEPS + 1)  # the eager warm-up steps, then the capture
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    for _ in range(warmup):          # autotuning, allocator warm-up, optimizer state, capture
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        total = torch.cuda.max_memory_allocated(device) / 2**20
        extra = total - resident / 2**20
    else:
        total, extra = None, peak_extra_bytes(step, device) / 2**20
    del step, trainer                # the LR schedule's closure makes a reference cycle: collect it
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"backend": provider, "dtype": "bf16" if amp else "fp32", "ms_per_step": 1000 * seconds,
            "peak_extra_mib": extra, "peak_total_mib": total, "loss": float(loss), **shape}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", default=None, help="fp32,bf16 on CUDA (default), fp32 on CPU")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of the device's providers (reference is always run)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    shape = default_shape(device)
    providers = PROVIDERS[device.type]
    if args.providers:
        unknown = set(args.providers.split(",")) - set(providers)
        if unknown:
            parser.error(f"--providers: unknown {sorted(unknown)}; on {device.type}: {', '.join(providers)}")
        providers = [p for p in providers if p == "reference" or p in args.providers.split(",")]
    rows = [measure(backend, device, dtype == "bf16", args.steps, args.warmup, **shape)
            for dtype in dtypes for backend in providers]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"training step on {name}: {shape['preset']} preset, batch {shape['batch']}, "
          f"{shape['patch']}x{shape['patch']}, torch {torch.__version__}")
    print(f"{'dtype':<6} {'provider':<16} {'ms/step':>9} {'speed-up':>9} {'extra MiB':>10} {'memory':>7} "
          f"{'total MiB':>10} {'memory':>7}")
    for row in rows:
        reference = next(r for r in rows if r["dtype"] == row["dtype"] and r["backend"] == "reference")
        row["speedup_vs_reference"] = reference["ms_per_step"] / row["ms_per_step"]
        cells = []
        for kind in ("extra", "total"):
            mine, theirs = row[f"peak_{kind}_mib"], reference[f"peak_{kind}_mib"]
            ratio = mine / theirs if mine is not None and theirs else None
            row[f"{kind}_memory_vs_reference"] = ratio
            cells += [f"{mine:.0f}" if mine is not None else "n/a", f"{ratio:.2f}x" if ratio else "n/a"]
        print(f"{row['dtype']:<6} {row['backend']:<16} {row['ms_per_step']:>9.1f} "
              f"{row['speedup_vs_reference']:>8.2f}x {cells[0]:>10} {cells[1]:>7} {cells[2]:>10} {cells[3]:>7}")
    report = {"device": name, "date": date.today().isoformat(), "torch": torch.__version__, "results": rows}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
