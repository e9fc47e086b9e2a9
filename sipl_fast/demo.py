"""The main job: train SIPL-PromptIR briefly on bundled photos and show what refinement does.

``sipl-fast demo`` (no arguments needed):

1. trains the ``tiny`` preset on scikit-image's bundled photographs (``SKIMAGE_TRAIN``) on
   the 3-task set (Gaussian noise sigma 15/25/50, rain, haze) for a short, fixed number of
   steps, with the authors' training step (see :mod:`sipl_fast.train`);
2. degrades the held-out photos (``SKIMAGE_HELD_OUT``, never seen in training) with every
   task, restores them with the plain pass (step 0) and with 1 and 2 self-refinement steps;
3. prints a PSNR/SSIM table per task and step (with the degraded input for comparison) and
   writes into the output folder (default ``./demo_out``):
   ``grid.png`` (degraded | plain pass | step 1 | step 2 | clean, one row per task),
   ``psnr_vs_step.png``, ``results.json`` and the trained ``checkpoint.safetensors``
   (usable with ``sipl-fast restore``).

The default budget (300 steps, batch 4, 64 x 64 crops) takes about 3 minutes on 2 CPU cores;
training stops early, saying so, if it has not finished after ``TRAIN_TIME_LIMIT`` seconds, so
the whole job stays under 5 minutes on a slower machine too. A few hundred steps of a
1.7 M-parameter model are far from a full all-in-one training of the 40 M model (PromptIR's
took about 3.5 days on 4 GPUs), so expect modest numbers; they are printed as measured.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .images import atomic_write_bytes
from .train import Evaluation, TrainOptions, Trainer, evaluate, format_table

DEFAULT_STEPS = 300
DEMO_BATCH = 4
DEMO_LR = 1e-3           # a short run of a small model: a higher rate than the paper-scale 2e-4
# Training stops early after this many seconds (a slow or busy machine still finishes the demo
# in its 5-minute budget; the number of steps done is printed). 300 steps take ~3 minutes on 2 cores.
TRAIN_TIME_LIMIT = 220.0
EVAL_SIZE = 128          # centre crops of the held-out photos (keeps evaluation quick on a CPU)


def _figure_bytes(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def save_grid(evaluation: Evaluation, samples, path: Path, image_name: str) -> None:
    """One row per task: degraded | plain pass | step 1 | ... | clean, PSNR in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import psnr

    rows = [s for s in samples if s.name == image_name]
    steps = len(evaluation.scores[0].psnr)
    columns = 2 + steps
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.3 * len(rows)), squeeze=False)
    for r, sample in enumerate(rows):
        outputs = evaluation.outputs[(sample.task, sample.name)]
        panels = [("degraded", sample.lq)] + [("plain pass" if t == 0 else f"step {t}", out)
                                               for t, out in enumerate(outputs)] + [("clean", sample.gt)]
        for c, (label, image) in enumerate(panels):
            axis = axes[r][c]
            axis.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            title = label if label == "clean" else f"{label}\n{float(psnr(image[None], sample.gt[None])):.2f} dB"
            axis.set_title(title, fontsize=8)
            if c == 0:
                axis.set_ylabel(sample.task, fontsize=9)
    figure.suptitle(f"SIPL-PromptIR tiny, held-out photo '{image_name}'", fontsize=10)
    atomic_write_bytes(path, _figure_bytes(figure))
    plt.close(figure)


def save_psnr_plot(evaluation: Evaluation, path: Path) -> None:
    """PSNR against refinement step per task (dashed: the degraded input)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for index, scores in enumerate(evaluation.scores + [evaluation.average()]):
        color = "black" if scores.task == "average" else f"C{index}"
        steps = list(range(len(scores.psnr)))
        axis.plot(steps, scores.psnr, marker="o", color=color, label=scores.task,
                  linewidth=2.5 if scores.task == "average" else 1.5)
        axis.axhline(scores.input_psnr, color=color, linestyle=":", linewidth=0.8)
    axis.set_xticks(steps)
    axis.set_xticklabels(["0 (plain)"] + [str(t) for t in steps[1:]])
    axis.set_xlabel("refinement step")
    axis.set_ylabel("PSNR (dB), held-out photos")
    axis.set_title("Self-refinement: PSNR per step (dotted: degraded input)", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    atomic_write_bytes(path, _figure_bytes(figure))
    plt.close(figure)


def summary_lines(evaluation: Evaluation) -> list[str]:
    """Plain statements of what the numbers say (gains over the input and per step)."""
    lines = []
    for s in evaluation.scores + [evaluation.average()]:
        best = max(range(len(s.psnr)), key=lambda t: s.psnr[t])
        change = ", ".join(f"step {t}: {s.psnr[t] - s.psnr[t - 1]:+.2f}" for t in range(1, len(s.psnr)))
        lines.append(f"{s.task:>8}: plain pass {s.psnr[0] - s.input_psnr:+.2f} dB over the input; "
                     f"refinement {change} dB; best at step {best}")
    return lines


def run_demo(steps: int = DEFAULT_STEPS, out: str | Path = "demo_out", seed: int = 0, lr: float = DEMO_LR,
             eval_size: int = EVAL_SIZE, time_limit: float | None = TRAIN_TIME_LIMIT, progress: bool = True,
             log=print) -> dict:
    """Train, evaluate, write the figures; returns the results dictionary (also results.json)."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:   # other processes compete for the cores: say so, the timings will show it
        log(f"note: the CPU is busy (load average {load:.1f} on {cores} cores); expect slower timings")
    options = TrainOptions(data="skimage", tasks="3task", preset="tiny", steps=steps, batch=DEMO_BATCH,
                           lr=lr, seed=seed, out=str(out), overwrite=True, save_every=0,
                           log_every=max(1, steps // 5), eval_size=eval_size, progress=progress)
    trainer = Trainer(options, log=log)
    trainer.run(time_limit=time_limit)
    train_seconds = time.perf_counter() - start

    samples = trainer.eval_samples()
    evaluation = evaluate(trainer.eval_model(), samples, steps=2, keep_outputs=True, progress=progress)
    table = format_table(evaluation)
    log("")
    log(f"PSNR (dB) / SSIM on held-out photos ({', '.join(sorted({s.name for s in samples}))}, "
        f"{eval_size}x{eval_size} centre crops), after {trainer.step} training steps:")
    log(table)
    for line in summary_lines(evaluation):
        log(line)

    save_grid(evaluation, samples, out / "grid.png", samples[0].name)
    save_psnr_plot(evaluation, out / "psnr_vs_step.png")
    elapsed = time.perf_counter() - start
    results = {
        "steps": trainer.step, "steps_requested": steps, "seed": seed, "batch": DEMO_BATCH, "lr": lr,
        "patch": trainer.patch, "eval_size": eval_size,
        "threads": torch.get_num_threads(), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(elapsed, 1), "loss_log": [(e.step, e.loss) for e in trainer.history],
        **evaluation.to_dict(),
    }
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    log(f"wrote {out / 'grid.png'}, {out / 'psnr_vs_step.png'}, {out / 'results.json'}, "
        f"{out / 'checkpoint.safetensors'}")
    log(f"elapsed: {elapsed:.1f} s (training {train_seconds:.1f} s) on {torch.get_num_threads()} CPU thread(s)")
    return results
