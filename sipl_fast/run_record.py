"""What a training run records in its output folder.

Checkpoints (written by ``sipl_fast.train``): ``checkpoint.safetensors`` (the latest weights),
``resume.pt`` (everything ``--resume`` needs), ``best.safetensors`` (the weights with the best
validation score, ``--val-data``), ``checkpoint_iterNNNNNNN.safetensors`` (the newest ``--keep``
periodic ones). Records:

- ``options.json``: every option of the run (``TrainOptions``, with the warm-up and patch it
  resolved), written when the run starts and rewritten when a resumed run changes one. A
  resumed run reads its options from here: ``sipl-fast train --out RUN --resume`` needs no
  other flag.
- ``train.log``: every log line, prefixed with its UTC time; a resumed run appends.
- ``metrics.csv``: one row per logged iteration (``kind=train``: mean loss since the previous
  row, learning rate, training images per second, peak memory in MiB: the CUDA allocator's
  peak since the previous row, or the process's peak resident memory on the CPU) and one per
  validation score (``kind=val``: task, refinement step, PSNR, SSIM; task ``average`` is the
  mean over tasks). A resumed run first drops the rows of iterations after its checkpoint
  (they are trained again).
- ``tensorboard/``: the same scalars as TensorBoard event files (``--tensorboard``; needs the
  ``tensorboard`` package: ``pip install sipl-fast[tensorboard]``).

Only the main process of a distributed run writes.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from .images import atomic_write_bytes

BEST_NAME = "best.safetensors"                            # the best validated weights
PERIODIC_NAME = "checkpoint_iter{iter:07d}.safetensors"   # periodic checkpoints kept with --keep
OPTIONS_NAME = "options.json"
LOG_NAME = "train.log"
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
METRICS_COLUMNS = ("iter", "kind", "loss", "lr", "images_per_s", "peak_memory_mib", "task", "refine_step", "psnr",
                   "ssim")


def read_options(path: Path) -> dict:
    """The options a run recorded (``options.json``); ValueError naming the file when unreadable."""
    try:
        options = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid options file ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: not a valid options file (expected a JSON object)")
    return options


class RunRecord:
    """The log, metrics and options files of one run folder (``write=False``: records nothing,
    for the processes of a distributed run other than the main one)."""

    def __init__(self, folder: Path, write: bool = True, tensorboard: bool = False):
        self.folder, self.write = Path(folder), write
        self._tensorboard = None
        self._wants_tensorboard = write and tensorboard
        self._pending: list[str] | None = []   # lines logged before start(), written by it

    @property
    def options_path(self) -> Path:
        return self.folder / OPTIONS_NAME

    def start(self, resumed_at: int | None) -> None:
        """Open the records: a fresh run starts new files, a resumed run (at iteration
        ``resumed_at``) keeps its log and the metrics rows up to that iteration."""
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = self.folder / METRICS_NAME
        if resumed_at is None and self.options_path.exists():
            # a run started over in a folder of ours: its earlier records and checkpoints go
            earlier = [self.folder / name for name in (LOG_NAME, METRICS_NAME, BEST_NAME)]
            earlier += [p for p in self.folder.glob(PERIODIC_NAME.replace("{iter:07d}", "[0-9]" * 7))]
            earlier += list((self.folder / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
            for path in earlier:
                path.unlink(missing_ok=True)
        elif metrics.exists():
            with metrics.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["iter"]) <= resumed_at]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, METRICS_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in METRICS_COLUMNS} for row in kept)
            atomic_write_bytes(metrics, buffer.getvalue().encode())
        pending, self._pending = self._pending, None
        for line in pending:
            self.log(line)
        if self._wants_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of iterations after the checkpoint a resumed run starts from
            self._tensorboard = SummaryWriter(str(self.folder / TENSORBOARD_DIR),
                                              purge_step=None if resumed_at is None else resumed_at + 1)

    def save_options(self, options: dict) -> None:
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.options_path, (json.dumps(options, indent=2, sort_keys=True) + "\n").encode())

    def log(self, line: str) -> None:
        if not self.write:
            return
        if self._pending is not None:
            self._pending.append(line)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with (self.folder / LOG_NAME).open("a") as handle:
            handle.write("".join(f"{stamp}  {part}\n" for part in line.splitlines() or [""]))

    def _append_metrics(self, rows: list[dict]) -> None:
        path = self.folder / METRICS_NAME
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, METRICS_COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())

    def training_row(self, iteration: int, loss: float, lr: float, images_per_s: float,
                     peak_memory_mib: float | None) -> None:
        if not self.write:
            return
        self._append_metrics([{"iter": iteration, "kind": "train", "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                               "images_per_s": f"{images_per_s:.4g}",
                               "peak_memory_mib": "" if peak_memory_mib is None else f"{peak_memory_mib:.1f}"}])
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("train/loss", loss, iteration)
            self._tensorboard.add_scalar("train/lr", lr, iteration)
            self._tensorboard.add_scalar("train/images_per_s", images_per_s, iteration)
            self._tensorboard.flush()

    def validation_rows(self, iteration: int, scores) -> None:
        """``scores``: TaskScores of every task and the average (psnr/ssim per refinement step)."""
        if not self.write:
            return
        rows = [{"iter": iteration, "kind": "val", "task": s.task, "refine_step": t, "psnr": f"{p:.4f}",
                 "ssim": f"{q:.5f}"} for s in scores for t, (p, q) in enumerate(zip(s.psnr, s.ssim))]
        self._append_metrics(rows)
        if self._tensorboard is not None:
            for s in scores:
                for t, (p, q) in enumerate(zip(s.psnr, s.ssim)):
                    self._tensorboard.add_scalar(f"val/{s.task}/psnr_step{t}", p, iteration)
                    self._tensorboard.add_scalar(f"val/{s.task}/ssim_step{t}", q, iteration)
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
