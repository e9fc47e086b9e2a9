"""PSNR/SSIM per image, task and refinement step, by the published protocols, one image at a time.

``evaluate(model, samples, steps)`` scores the degraded input, the plain pass (step 0) and
refinement steps 1..steps of every sample. Step t is the output of t iterations of the
authors' loop (what ``model.refine(x, steps=t, pad_to=pad_to)`` returns): the input is padded
(reflect, bottom and right) once to multiples of ``pad_to`` (8 by default, the network's need),
steps iterate on the padded image, every output is cropped back before it is scored. ``dtype``
(bfloat16, float16 on CUDA, float32) runs the plain pass and the steps in that precision;
outputs are float32.

Protocols (``protocol=``), so that numbers compare with papers:

``"promptir"`` (default): the official PromptIR test code (test.py, utils/val_utils.py
``compute_psnr_ssim``, utils/image_utils.py ``crop_img``).

- The degraded and the clean image are centre-cropped to multiples of 16 (``crop_img(base=16)``:
  of H rows, rows ``(H % 16) // 2`` to ``(H % 16) // 2 + H - H % 16`` are kept; columns
  likewise); the network restores the cropped degraded image (no padding is needed).
- PromptIR's denoising test adds noise to the cropped clean image; here samples arrive
  degraded and both images are cropped, the same for the scores (the same noise distribution).
- The output is clipped to [0, 1] in float (float32, not quantised to 8 bits); the clean image
  is clipped too.
- PSNR: ``skimage.metrics.peak_signal_noise_ratio(gt, out, data_range=1)``, i.e.
  10 log10(1 / MSE) over all pixels and the three channels.
- SSIM: ``skimage.metrics.structural_similarity(gt, out, data_range=1, channel_axis=-1)`` with
  scikit-image's defaults: per channel, a 7 x 7 uniform window, sample covariances (N - 1),
  K1 = 0.01, K2 = 0.03, the mean of the map without its 3-pixel border; then the mean over the
  channels. (PromptIR writes ``multichannel=True``, the older name of ``channel_axis=-1``.)
- Both on (H, W, 3) float64 arrays. PromptIR passes float32 arrays, which scikit-image keeps
  in float32; the difference is at float32 rounding (below 1e-6 dB and 1e-6 SSIM).

``"basicsr"``: BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (basicsr/metrics/psnr_ssim.py),
as in every model built on BasicSR, SIPL's released code among them.

- Whole images: the network input is padded (reflect) at the bottom and right to multiples of
  ``pad_to`` and the output cropped back. SIPL's released ``SIPLModel.test`` pads to multiples
  of 16: ``pad_to=16`` reproduces it.
- The output and the clean image are quantised to 8 bits as BasicSR's ``tensor2img``: clamped
  to [0, 1], times 255, rounded.
- ``crop_border`` pixels are removed from each side.
- ``y_channel=True``: scored on Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1],
  Y on the 0-255 scale; BasicSR's ``to_y_channel``, MATLAB's ``rgb2ycbcr``). BasicSR rounds Y to
  float32; it is float64 here (differences below 1e-5 dB).
- PSNR: 10 log10(255^2 / MSE) over all pixels and channels (+inf for identical images).
- SSIM: per channel, an 11 x 11 Gaussian window of sigma 1.5 (the outer product of
  ``cv2.getGaussianKernel(11, 1.5)``), only where the window fits (``cv2.filter2D`` then
  ``[5:-5, 5:-5]``), population variances, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, the mean of
  the map; then the mean over the channels. Computed in float64 (``sipl_fast.metrics``).

The degraded input is scored by the same protocol (cropped, clipped or quantised alike).
``TaskScores`` holds a task's means over its images; ``Evaluation.average()`` the mean over
tasks (each task weighs the same, as the papers' "average" columns). ``Evaluation.images``
holds every image's scores; ``write_csv`` writes them, one row per image.

``save_images=DIR`` writes every step as an 8-bit PNG, ``DIR/<task>/<name without suffix>_step<t>.png``
(subfolders of the sample's name kept), of the image that was scored: under ``"basicsr"`` the
PNG holds exactly the quantised image that was scored, so its scores recomputed from the file
are the reported ones; under ``"promptir"`` (float scores) they differ by the 8-bit rounding
only (at most 1/510 per value). Every target is checked before any work: an existing file is
replaced only with ``overwrite=True``.

Memory: one sample is indexed, restored and scored at a time, and nothing of it is kept after
its scores, unless ``keep_outputs=True`` (then the clipped float outputs of every step are kept
on the CPU: under ``"promptir"`` they cover the centre crop, ``protocol_crop(sample.gt)``).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data.datasets import EvalSample
from .images import atomic_write_bytes, write_image
from .metrics import basicsr_scores, promptir_scores
from .refine import REFINE_DTYPES, Refiner, pad_to_multiple

PROTOCOLS = ("promptir", "basicsr")
# PromptIR's test datasets cut both images with crop_img(base=16).
PROMPTIR_BASE = 16
# The network's need (three 2x downsamplings): the default padding multiple.
PAD_TO = 8
# The smallest side each protocol can score: 16 after PromptIR's crop; BasicSR's 11-pixel SSIM
# window after crop_border.
BASICSR_WINDOW = 11
CSV_COLUMNS = ("task", "image", "height", "width", "input_psnr", "input_ssim")


class EvaluationError(ValueError):
    """An evaluation option, sample or output path that cannot be used (one line, naming it)."""


class OutputExistsError(EvaluationError, FileExistsError):
    """An output file of the evaluation exists and ``overwrite`` was not given."""


@dataclass
class ImageScores:
    """One image's scores: the degraded input and each refinement step (0 = plain pass).
    ``height`` and ``width`` are those of the image restored and scored (under ``"promptir"``
    the centre crop to multiples of 16; under ``"basicsr"`` the whole image, before
    ``crop_border``)."""

    task: str
    name: str
    height: int
    width: int
    input_psnr: float
    input_ssim: float
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)


@dataclass
class TaskScores:
    """Mean PSNR/SSIM of one task: the degraded input and each refinement step (0 = plain pass)."""

    task: str
    images: int
    input_psnr: float
    input_ssim: float
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)


@dataclass
class Evaluation:
    """What ``evaluate`` measured: the task means, each image's scores, the outputs kept
    (``keep_outputs``) and the protocol with its options."""

    scores: list[TaskScores]
    outputs: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=dict)  # (task, name) -> steps
    images: list[ImageScores] = field(default_factory=list)
    protocol: str = "promptir"
    crop_border: int = 0
    y_channel: bool = False
    pad_to: int = PAD_TO

    def average(self) -> TaskScores:
        """The mean over tasks (each task weighs the same); ``images`` counts every image."""
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        steps = len(self.scores[0].psnr)
        return TaskScores("average", sum(s.images for s in self.scores),
                          mean([s.input_psnr for s in self.scores]), mean([s.input_ssim for s in self.scores]),
                          [mean([s.psnr[t] for s in self.scores]) for t in range(steps)],
                          [mean([s.ssim[t] for s in self.scores]) for t in range(steps)])

    def to_dict(self) -> dict:
        """The protocol, the task means, their average and every image's scores (JSON-ready)."""
        protocol = {"name": self.protocol, "crop_border": self.crop_border, "y_channel": self.y_channel,
                    "pad_to": self.pad_to}
        return {"protocol": protocol,
                "tasks": [asdict(s) for s in self.scores], "average": asdict(self.average()),
                "images": [asdict(r) for r in self.images]}


# --------------------------------------------------------------------------- protocol pieces
def crop_to_multiple(image: torch.Tensor, base: int = PROMPTIR_BASE) -> torch.Tensor:
    """PromptIR's ``crop_img``: the centre crop of an (..., H, W) image to multiples of ``base``
    (of H rows, rows (H % base) // 2 to (H % base) // 2 + H - H % base are kept)."""
    height, width = image.shape[-2:]
    top, left = (height % base) // 2, (width % base) // 2
    return image[..., top:top + height - height % base, left:left + width - width % base]


def protocol_crop(image: torch.Tensor, protocol: str = "promptir") -> torch.Tensor:
    """The part of an (..., H, W) image that ``protocol`` restores and scores."""
    return crop_to_multiple(image) if protocol == "promptir" else image


def _score(image: torch.Tensor, gt: torch.Tensor, protocol: str, crop_border: int,
           y_channel: bool) -> tuple[float, float]:
    if protocol == "promptir":
        psnr, ssim = promptir_scores(image, gt)
    else:
        psnr, ssim = basicsr_scores(image, gt, crop_border=crop_border, y_channel=y_channel)
    return float(psnr[0]), float(ssim[0])


def _label(index: int, sample: EvalSample) -> str:
    return f"sample {index} ({sample.task}: {sample.name})"


def _scored_size(index: int, sample: EvalSample, protocol: str, crop_border: int) -> tuple[int, int]:
    """(height, width) of the image ``protocol`` restores; EvaluationError naming the sample."""
    lq, gt = sample.lq, sample.gt
    for image, which in ((lq, "degraded"), (gt, "clean")):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 \
                or not image.is_floating_point():
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise EvaluationError(f"{_label(index, sample)}: the {which} image must be a float (3, H, W) tensor, "
                                  f"got {shape}")
    if lq.shape != gt.shape:
        raise EvaluationError(f"{_label(index, sample)}: the degraded image is {tuple(lq.shape[1:])}, the clean one "
                              f"{tuple(gt.shape[1:])}; evaluation needs equal sizes")
    height, width = lq.shape[1:]
    if protocol == "promptir":
        if min(height, width) < PROMPTIR_BASE:
            raise EvaluationError(f"{_label(index, sample)}: an image of {height}x{width} has no "
                                  f"{PROMPTIR_BASE}x{PROMPTIR_BASE} centre crop to score (protocol promptir)")
        return height - height % PROMPTIR_BASE, width - width % PROMPTIR_BASE
    if min(height, width) - 2 * crop_border < BASICSR_WINDOW:
        raise EvaluationError(f"{_label(index, sample)}: an image of {height}x{width} without a border of "
                              f"{crop_border} is smaller than the {BASICSR_WINDOW}-pixel SSIM window "
                              "(protocol basicsr)")
    return height, width


def image_path(folder: str | os.PathLike, task: str, name: str, step: int) -> Path:
    """Where ``save_images`` writes step ``step`` of a sample: FOLDER/<task>/<name without suffix>_step<t>.png."""
    relative = PurePath(name)
    return Path(folder) / task / relative.parent / f"{relative.stem}_step{step}.png"


def _check_name(index: int, sample: EvalSample) -> None:
    task, name = PurePath(sample.task), PurePath(sample.name)
    if len(task.parts) != 1 or sample.task in (".", ".."):
        raise EvaluationError(f"{_label(index, sample)}: the task name must be one folder name to save images under")
    if not name.parts or name.is_absolute() or ".." in name.parts or not name.stem:
        raise EvaluationError(f"{_label(index, sample)}: the image name must be a relative path without '..' "
                              "to save images under")


def _check_folder_writable(folder: Path, what: str) -> None:
    """EvaluationError unless ``folder`` is, or can be created as, a writable folder (creates nothing)."""
    existing = folder
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise EvaluationError(f"{what}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationError(f"{what}: the folder {existing} is not writable")


def _check_image_targets(samples: Sequence[EvalSample], folder: Path, steps: int, protocol: str,
                         crop_border: int, overwrite: bool) -> None:
    """Every sample scoreable and every file ``save_images`` would write free (or ``overwrite``),
    one sample indexed at a time; nothing is created."""
    if folder.exists() and not folder.is_dir():
        raise EvaluationError(f"save_images {folder}: exists and is not a folder")
    owners: dict[Path, str] = {}
    for index in range(len(samples)):
        sample = samples[index]
        _scored_size(index, sample, protocol, crop_border)
        _check_name(index, sample)
        label = _label(index, sample)
        for step in range(steps + 1):
            path = image_path(folder, sample.task, sample.name, step)
            if path in owners:
                raise EvaluationError(f"{owners[path]} and {label} would both be saved as {path}")
            owners[path] = label
            if path.is_dir():
                raise EvaluationError(f"{path}: the image of {label} would replace a folder")
            if (path.exists() or path.is_symlink()) and not overwrite:
                raise OutputExistsError(f"{path} exists; evaluation replaces files only when told to overwrite")
        _check_folder_writable(path.parent, f"save_images {folder}")
        del sample


# --------------------------------------------------------------------------- evaluation
def evaluate(model, samples: Sequence[EvalSample], steps: int = 2, *, protocol: str = "promptir",
             crop_border: int = 0, y_channel: bool = False, dtype: torch.dtype | None = None,
             keep_outputs: bool = False, progress: bool = False, cuda_graph: bool = False,
             save_images: str | os.PathLike | None = None, overwrite: bool = False,
             pad_to: int = PAD_TO) -> Evaluation:
    """PSNR/SSIM of every sample at refinement steps 0..steps, by ``protocol`` (module docstring).

    Step 0 is the plain pass; step t applies the authors' loop t times (x_t = y_t). A network
    without Proxy Fusion (PromptIR) has step 0 only: steps > 0 raise ValueError. ``dtype``: the
    precision of the network (None: the model's own). ``pad_to``: the multiple the network input
    is padded to (a multiple of 8; 16 as SIPL's released test). ``cuda_graph``: one captured step
    replayed for every sample of a size (CUDA). ``keep_outputs``: keep each step's clipped
    output (``Evaluation.outputs``). ``save_images``: a folder to write every step's 8-bit PNG
    into; with it every sample and target is checked before any work. Without it a sample
    that cannot be scored stops the evaluation when it is reached. EvaluationError names what
    is wrong; OutputExistsError an existing target when ``overwrite`` is not given.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise EvaluationError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise EvaluationError(f"crop_border must be a non-negative int, got {crop_border!r}")
    if protocol == "promptir" and (crop_border or y_channel):
        raise EvaluationError(f"crop_border and y_channel are options of the basicsr protocol; the promptir protocol "
                              f"scores the RGB channels of the whole crop (got crop_border={crop_border}, "
                              f"y_channel={y_channel})")
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < PAD_TO or pad_to % PAD_TO:
        raise EvaluationError(f"pad_to must be a positive multiple of {PAD_TO}, got {pad_to!r}")
    if dtype not in REFINE_DTYPES:
        raise EvaluationError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16 or None, "
                              f"got {dtype!r}")
    device = next(model.parameters()).device
    if dtype == torch.float16 and device.type != "cuda":
        raise EvaluationError(f"float16 evaluation needs CUDA (the model is on {device}); use torch.bfloat16")
    model.require_proxy_fusion(steps)
    if len(samples) == 0:
        raise EvaluationError("no samples to evaluate")
    folder = Path(save_images) if save_images is not None else None
    if folder is not None:
        _check_image_targets(samples, folder, steps, protocol, crop_border, overwrite)

    # The image is padded once, before step 0: the Refiners' own padding then changes nothing.
    plain_pass = Refiner(model, steps=0, dtype=dtype, pad_to=pad_to)
    refine_step = Refiner(model, steps=1, dtype=dtype, cuda_graph=cuda_graph, pad_to=pad_to)
    records: list[ImageScores] = []
    outputs: dict[tuple[str, str], list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        # One cache scope for the whole evaluation: the weights stay as they are, so every step of
        # every sample reuses the dictionary-side values.
        with model.dictionary_cache.scope(), torch.inference_mode():
            for index in tqdm(range(len(samples)), desc="eval", disable=not progress, leave=False):
                sample = samples[index]
                height, width = _scored_size(index, sample, protocol, crop_border)
                task, name = sample.task, sample.name
                lq = protocol_crop(sample.lq, protocol)[None].to(device)
                gt = protocol_crop(sample.gt, protocol)[None].to(device)
                del sample   # only this image's tensors stay alive
                record = ImageScores(task, name, height, width, *_score(lq, gt, protocol, crop_border, y_channel))
                current = pad_to_multiple(lq, pad_to)
                kept = []
                for step in range(steps + 1):
                    if step == 0:
                        output = plain_pass(current)
                    else:
                        output = current = refine_step(current)
                    restored = output[..., :height, :width].float().clamp(0, 1)
                    step_psnr, step_ssim = _score(restored, gt, protocol, crop_border, y_channel)
                    record.psnr.append(step_psnr)
                    record.ssim.append(step_ssim)
                    if folder is not None:
                        path = image_path(folder, task, name, step)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        write_image(path, restored[0])
                    if keep_outputs:
                        kept.append(restored[0].cpu())
                    del output, restored
                records.append(record)
                if keep_outputs:
                    outputs[(task, name)] = kept
                del lq, gt, current
    finally:
        model.train(was_training)
    return Evaluation(_task_means(records), outputs, records, protocol, crop_border, y_channel, pad_to)


def _task_means(records: list[ImageScores]) -> list[TaskScores]:
    """Each task's means over its images, tasks in the order they first appear."""
    by_task: dict[str, list[ImageScores]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    scores = []
    for task, runs in by_task.items():
        n, steps = len(runs), len(runs[0].psnr)
        scores.append(TaskScores(task, n, sum(r.input_psnr for r in runs) / n, sum(r.input_ssim for r in runs) / n,
                                 [sum(r.psnr[t] for r in runs) / n for t in range(steps)],
                                 [sum(r.ssim[t] for r in runs) / n for t in range(steps)]))
    return scores


# --------------------------------------------------------------------------- reports
def check_report_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A report file to write (CSV, JSON), as a Path: its folder exists and is writable, it is
    no folder, and it does not exist unless ``overwrite`` (whoever wrote an existing file, it is
    replaced only when told to). Call it before evaluating to fail early; ``write_csv`` calls it too."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"{path}: is a folder; name the file to write")
    if not path.parent.is_dir():
        raise EvaluationError(f"{path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise EvaluationError(f"{path}: the folder {path.parent} is not writable")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{path} exists; evaluation replaces files only when told to overwrite")
    return path


def csv_columns(steps: int) -> list[str]:
    """The CSV header: task, image, height, width, input_psnr, input_ssim, step0_psnr, step0_ssim, ..."""
    return list(CSV_COLUMNS) + [f"step{t}_{metric}" for t in range(steps + 1) for metric in ("psnr", "ssim")]


def write_csv(evaluation: Evaluation, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """One row per image (``csv_columns``), written atomically; values at full precision
    (``repr`` of the float; ``inf`` for identical images). Refuses an existing file unless
    ``overwrite`` (``check_report_path``)."""
    path = check_report_path(path, overwrite)
    steps = len(evaluation.images[0].psnr) - 1 if evaluation.images else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_columns(steps))
    for r in evaluation.images:
        per_step = [repr(v) for pair in zip(r.psnr, r.ssim) for v in pair]
        writer.writerow([r.task, r.name, r.height, r.width, repr(r.input_psnr), repr(r.input_ssim)] + per_step)
    atomic_write_bytes(path, buffer.getvalue().encode())


def format_table(evaluation: Evaluation) -> str:
    """PSNR (dB) / SSIM per task: the degraded input, then step 0 (plain pass), 1, 2, ..."""
    steps = len(evaluation.scores[0].psnr)
    headers = ["task", "images", "input"] + ["step 0 (plain)"] + [f"step {t}" for t in range(1, steps)]
    rows = []
    for s in evaluation.scores + [evaluation.average()]:
        cells = [f"{s.input_psnr:6.2f} / {s.input_ssim:.4f}"]
        cells += [f"{p:6.2f} / {q:.4f}" for p, q in zip(s.psnr, s.ssim)]
        rows.append([s.task, str(s.images)] + cells)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
