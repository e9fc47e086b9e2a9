"""What refinement in bfloat16 costs in quality: PSNR per task and step, float32 against bf16.

    python dev/precision_quality.py --checkpoint DEMO_OUT/checkpoint.safetensors

The held-out photos (``sipl_fast.data.SKIMAGE_HELD_OUT``) degraded with every task of the
task set (default the demo's ``3task``, fixed seed, the demo's centre crops), restored with
``Refiner(model, steps=t, dtype=...)`` for t = 0 (plain pass) .. ``--steps``, clamped to
[0, 1]; the table gives the mean PSNR of each task and step in float32 and in bf16 and the
change, and the mean change over every task and step.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from sipl_fast.checkpoint import load_model
from sipl_fast.data import open_source
from sipl_fast.data.degradations import resolve_tasks
from sipl_fast.metrics import psnr
from sipl_fast.refine import Refiner

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(model, samples, steps: int = 2) -> dict:
    """{task: {precision: [mean PSNR at step 0, 1, ...]}} over ``samples`` (any iterable of
    EvalSample: each sample is read once)."""
    table: dict[str, dict[str, list[float]]] = {}
    counts: collections.Counter = collections.Counter()
    for sample in samples:
        lq, gt = sample.lq[None], sample.gt[None]
        counts[sample.task] += 1
        for name, dtype in PRECISIONS.items():
            scores = [float(psnr(Refiner(model, steps=t, dtype=dtype)(lq).clamp(0, 1), gt)) for t in range(steps + 1)]
            per_task = table.setdefault(sample.task, {}).setdefault(name, [0.0] * (steps + 1))
            for t, score in enumerate(scores):
                per_task[t] += score
    return {task: {name: [v / counts[task] for v in values] for name, values in by_precision.items()}
            for task, by_precision in table.items()}


def format_table(table: dict) -> tuple[str, float]:
    """A markdown table (task, step, fp32, bf16, change) and the mean change."""
    lines = ["| task | step | fp32 PSNR (dB) | bf16 PSNR (dB) | change (dB) |", "|---|---|---|---|---|"]
    changes = []
    for task, by_precision in table.items():
        for t, (full, low) in enumerate(zip(by_precision["fp32"], by_precision["bf16"])):
            changes.append(low - full)
            lines.append(f"| {task} | {t} | {full:.3f} | {low:.3f} | {low - full:+.3f} |")
    mean = sum(changes) / len(changes)
    lines.append(f"| mean | | | | {mean:+.3f} |")
    return "\n".join(lines), mean


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tasks", default="3task")
    parser.add_argument("--size", type=int, default=128, help="centre crop of the held-out photos (the demo's)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234, help="the degradations' seed (the evaluation's)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    model, _ = load_model(args.checkpoint)
    # a sequence of samples read when iterated (measure reads each once)
    samples = open_source("skimage").eval_set(resolve_tasks(args.tasks), args.size, seed=args.seed)
    table = measure(model.eval(), samples, args.steps)
    text, mean = format_table(table)
    print(text)
    print(f"mean change over tasks and steps: {mean:+.3f} dB")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"psnr": table, "mean_change_db": mean}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
