"""The main job: train SIPL-PromptIR briefly on bundled photos and show what refinement does,
and (``--compare``) how it compares with the plain PromptIR trained alike.

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

``--arch`` trains another architecture of ``sipl_fast.model.ARCHITECTURES`` the same way (a
plain PromptIR reports step 0 only).

``sipl-fast demo --compare`` trains the ``tiny`` SIPL-PromptIR and the ``tiny`` plain PromptIR
with the same budget, seed, data and degradations (the batch of step s is a function of the
seed and s alone), evaluates both on the same held-out samples and prints, per task, PromptIR
next to SIPL-PromptIR's plain pass (step 0) and its second refinement step; it writes
``compare_grid.png`` (degraded | PromptIR | SIPL step 0 | SIPL step 2 | clean),
``compare.json`` and each network's checkpoint in ``<out>/<arch>/``.

Training always runs its fixed number of steps (the default budget: 300 steps, batch 4,
64 x 64 crops, a few minutes on 2 CPU cores), so the printed numbers do not depend on the
machine's speed or load. A few hundred steps of a 1.7 M-parameter model are far from a full
all-in-one training of the 40 M model (PromptIR's took about 3.5 days on 4 GPUs), so expect
modest numbers; they are printed as measured.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .images import atomic_write_bytes
from .evaluation import Evaluation, evaluate, format_table
from .train import TrainOptions, Trainer

DEFAULT_STEPS = 300
COMPARE_STEPS = 300      # per network in --compare (both networks get the same budget)
DEMO_BATCH = 4
DEMO_LR = 1e-3           # a short run of a small model: a higher rate than the paper-scale 2e-4
EVAL_SIZE = 128          # centre crops of the held-out photos (keeps evaluation quick on a CPU)
COMPARED = ("promptir", "sipl-promptir")   # --compare: the baseline, then SIPL


def _figure_bytes(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def save_image_grid(rows, title: str, path: Path) -> None:
    """rows: (task, clean image, [(label, image), ...]) each; one figure row per entry, its
    panels then the clean image, each panel's PSNR against the clean image in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import psnr

    columns = 1 + max(len(panels) for _, _, panels in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.3 * len(rows)), squeeze=False)
    for r, (task, clean, panels) in enumerate(rows):
        for c, (label, image) in enumerate(panels + [("clean", clean)]):
            axis = axes[r][c]
            axis.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            title_line = label if label == "clean" else f"{label}\n{float(psnr(image[None], clean[None])):.2f} dB"
            axis.set_title(title_line, fontsize=8)
            if c == 0:
                axis.set_ylabel(task, fontsize=9)
    figure.suptitle(title, fontsize=10)
    atomic_write_bytes(path, _figure_bytes(figure))
    plt.close(figure)


def save_grid(evaluation: Evaluation, samples, path: Path, image_name: str, arch: str = "sipl-promptir") -> None:
    """One row per task: degraded | plain pass | step 1 | ... | clean, PSNR in the titles."""
    rows = []
    for sample in (s for s in samples if s.name == image_name):
        outputs = evaluation.outputs[(sample.task, sample.name)]
        panels = [("degraded", sample.lq)] + [("plain pass" if t == 0 else f"step {t}", out)
                                               for t, out in enumerate(outputs)]
        rows.append((sample.task, sample.gt, panels))
    save_image_grid(rows, f"{ARCH_LABELS[arch]} tiny, held-out photo '{image_name}'", path)


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
        line = f"{s.task:>8}: plain pass {s.psnr[0] - s.input_psnr:+.2f} dB over the input"
        if len(s.psnr) > 1:
            best = max(range(len(s.psnr)), key=lambda t: s.psnr[t])
            change = ", ".join(f"step {t}: {s.psnr[t] - s.psnr[t - 1]:+.2f}" for t in range(1, len(s.psnr)))
            line += f"; refinement {change} dB; best at step {best}"
        lines.append(line)
    return lines


ARCH_LABELS = {"sipl-promptir": "SIPL-PromptIR", "sipl-adair": "SIPL-AdaIR", "promptir": "PromptIR"}


def _note_busy_cpu(log) -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:   # other processes compete for the cores: say so, the timings will show it
        log(f"note: the CPU is busy (load average {load:.1f} on {cores} cores); expect slower timings")


def train_tiny(arch: str, steps: int, out: Path, seed: int, lr: float, eval_size: int, progress: bool,
               log) -> Trainer:
    """The demo's training run: the tiny preset of ``arch``, the demo's fixed budget, checkpoint in ``out``."""
    options = TrainOptions(arch=arch, data="skimage", tasks="3task", preset="tiny", iters=steps, batch=DEMO_BATCH,
                           lr=lr, seed=seed, out=str(out), overwrite=True, save_every=0,
                           log_every=max(1, steps // 5), val_size=eval_size, progress=progress)
    trainer = Trainer(options, log=log)
    trainer.run()
    return trainer


def refinement_steps(trainer: Trainer) -> int:
    """The steps the demo evaluates: 2 with Proxy Fusion, the plain pass only without."""
    return 2 if trainer.model.proxy_fusion else 0


def run_demo(steps: int = DEFAULT_STEPS, out: str | Path = "demo_out", seed: int = 0, lr: float = DEMO_LR,
             eval_size: int = EVAL_SIZE, progress: bool = True, log=print, arch: str = "sipl-promptir") -> dict:
    """Train, evaluate, write the figures; returns the results dictionary (also results.json)."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _note_busy_cpu(log)
    trainer = train_tiny(arch, steps, out, seed, lr, eval_size, progress, log)
    train_seconds = time.perf_counter() - start

    samples = trainer.validation_samples()
    evaluation = evaluate(trainer.eval_model(), samples, steps=refinement_steps(trainer), keep_outputs=True,
                          progress=progress)
    table = format_table(evaluation)
    log("")
    log(f"PSNR (dB) / SSIM on held-out photos ({', '.join(sorted({s.name for s in samples}))}, "
        f"{eval_size}x{eval_size} centre crops), after {trainer.step} training steps:")
    log(table)
    for line in summary_lines(evaluation):
        log(line)

    save_grid(evaluation, samples, out / "grid.png", samples[0].name, arch)
    save_psnr_plot(evaluation, out / "psnr_vs_step.png")
    elapsed = time.perf_counter() - start
    results = {
        "arch": arch, "steps": trainer.step, "steps_requested": steps, "seed": seed, "batch": DEMO_BATCH, "lr": lr,
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


# --------------------------------------------------------------------------- --compare
def compare_table(baseline: Evaluation, sipl: Evaluation) -> str:
    """PSNR (dB) / SSIM per task: the input, PromptIR, SIPL-PromptIR step 0 and step 2, and SIPL
    step 2's PSNR gain over PromptIR."""
    headers = ["task", "images", "input", "PromptIR", "SIPL step 0", "SIPL step 2", "SIPL 2 - PromptIR"]
    rows = []
    for base, ours in zip(baseline.scores + [baseline.average()], sipl.scores + [sipl.average()]):
        cells = [f"{p:6.2f} / {q:.4f}" for p, q in ((ours.input_psnr, ours.input_ssim), (base.psnr[0], base.ssim[0]),
                                                    (ours.psnr[0], ours.ssim[0]), (ours.psnr[-1], ours.ssim[-1]))]
        rows.append([ours.task, str(ours.images)] + cells + [f"{ours.psnr[-1] - base.psnr[0]:+.2f} dB"])
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def save_compare_grid(baseline: Evaluation, sipl: Evaluation, samples, path: Path, image_name: str) -> None:
    """One row per task: degraded | PromptIR | SIPL step 0 | SIPL step 2 | clean, PSNR in the titles."""
    rows = []
    for sample in (s for s in samples if s.name == image_name):
        ours = sipl.outputs[(sample.task, sample.name)]
        panels = [("degraded", sample.lq), ("PromptIR", baseline.outputs[(sample.task, sample.name)][0]),
                  ("SIPL step 0", ours[0]), (f"SIPL step {len(ours) - 1}", ours[-1])]
        rows.append((sample.task, sample.gt, panels))
    save_image_grid(rows, f"PromptIR vs SIPL-PromptIR (tiny, same training), held-out photo '{image_name}'", path)


def run_compare(steps: int = COMPARE_STEPS, out: str | Path = "demo_out", seed: int = 0, lr: float = DEMO_LR,
                eval_size: int = EVAL_SIZE, progress: bool = True, log=print) -> dict:
    """Train the tiny PromptIR and SIPL-PromptIR alike, evaluate both on the same samples, print
    the side-by-side table, write compare_grid.png and compare.json; returns compare.json's content."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _note_busy_cpu(log)
    trainers, seconds = {}, {}
    for arch in COMPARED:
        tick = time.perf_counter()
        trainers[arch] = train_tiny(arch, steps, out / arch, seed, lr, eval_size, progress, log)
        seconds[arch] = round(time.perf_counter() - tick, 1)
    samples = trainers["sipl-promptir"].validation_samples()   # one sample set for both
    evaluations = {arch: evaluate(trainer.eval_model(), samples, steps=refinement_steps(trainer), keep_outputs=True,
                                  progress=progress)
                   for arch, trainer in trainers.items()}
    baseline, sipl = evaluations["promptir"], evaluations["sipl-promptir"]
    log("")
    log(f"PSNR (dB) / SSIM on held-out photos ({', '.join(sorted({s.name for s in samples}))}, "
        f"{eval_size}x{eval_size} centre crops), both networks after {steps} training steps "
        f"(batch {DEMO_BATCH}, seed {seed}):")
    log(compare_table(baseline, sipl))
    save_compare_grid(baseline, sipl, samples, out / "compare_grid.png", samples[0].name)
    elapsed = time.perf_counter() - start
    results = {
        "steps": steps, "seed": seed, "batch": DEMO_BATCH, "lr": lr, "eval_size": eval_size,
        "threads": torch.get_num_threads(), "train_seconds": seconds, "total_seconds": round(elapsed, 1),
        "parameters": {arch: sum(p.numel() for p in t.model.parameters()) for arch, t in trainers.items()},
        **{arch: evaluation.to_dict() for arch, evaluation in evaluations.items()},
    }
    atomic_write_bytes(out / "compare.json", json.dumps(results, indent=2).encode())
    log(f"wrote {out / 'compare_grid.png'}, {out / 'compare.json'} and the checkpoints in "
        f"{', '.join(str(out / arch) for arch in COMPARED)}")
    log(f"elapsed: {elapsed:.1f} s on {torch.get_num_threads()} CPU thread(s)")
    return results
