"""Restoring collections of images: which files, where each output goes, in which format.

``sipl-fast restore`` takes files, folders (``--recursive`` descends into subfolders) and glob
patterns. Every input is decoded once and every output path checked before the first file is
written (docs/reliability.md). Output names never collide: each output keeps its input's path
relative to the deepest folder that holds every input, so ``a/x.png`` and ``b/x.png`` become
``OUT/a/x.png`` and ``OUT/b/x.png``; two inputs that differ only by suffix (``x.png``, ``x.jpg``)
keep their suffix in the name (``x_png.png``, ``x_jpg.png``).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data.datasets import IMAGE_SUFFIXES

FORMATS = ("png", "tiff", "same")
# The formats restore writes, by suffix; "same" keeps an input's format where it is one of them
# and writes PNG otherwise.
WRITTEN_FORMATS = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg"}
SUFFIX_OF_FORMAT = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}


class RestoreError(ValueError):
    """An input, an output path or an option restore cannot use (one line, naming it)."""


@dataclass
class Job:
    """One input image and the files restore writes for it."""

    source: Path
    target: Path                      # the final refinement step's image
    format: str                       # png, tiff or jpeg
    step_targets: list[Path] = field(default_factory=list)  # --save-steps: step 0 .. T

    def outputs(self) -> list[Path]:
        return [self.target, *self.step_targets]


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def collect_inputs(specs: list[str], recursive: bool = False) -> list[Path]:
    """The image files named by ``specs`` (files, folders, glob patterns), each once, in order.

    A file named explicitly is taken whatever its suffix (decoding checks it); folders and
    patterns contribute files with an image suffix. A spec that names nothing is an error."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            images = _images_in(path, recursive)
            if not images:
                where = "it or its subfolders" if recursive else "it (--recursive looks into subfolders)"
                raise RestoreError(f"{spec}: no images in {where}; looked for {', '.join(IMAGE_SUFFIXES)}")
            found += images
        elif path.exists():
            found.append(path)
        elif glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            images = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise RestoreError(f"{spec}: the pattern matches no image file")
            found += images
        else:
            raise RestoreError(f"{spec}: no such file or folder")
    unique, seen = [], set()
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _written_format(source: Path, format: str) -> str:
    if format not in FORMATS:
        raise RestoreError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "same":
        return WRITTEN_FORMATS.get(source.suffix.lower(), "png")
    return format


def plan(inputs: list[Path], out: Path, format: str = "png", save_steps: int | None = None) -> list[Job]:
    """A Job per input: its output path under ``out`` (see the module docstring) and, with
    ``save_steps`` = T, the paths of steps 0..T (``NAME_step0.png`` ...). Refuses an output that
    would replace an input."""
    absolute = [Path(os.path.abspath(p)) for p in inputs]
    root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path(".")
    stems: dict[Path, int] = {}
    for path in absolute:
        stem = path.relative_to(root).with_suffix("")
        stems[stem] = stems.get(stem, 0) + 1
    jobs = []
    for source, path in zip(inputs, absolute):
        written = _written_format(source, format)
        keeps_suffix = format == "same" and source.suffix.lower() in WRITTEN_FORMATS
        suffix = source.suffix if keeps_suffix else SUFFIX_OF_FORMAT[written]
        relative = path.relative_to(root)
        stem = relative.with_suffix("")
        if stems[stem] > 1:  # x.png and x.jpg side by side: keep the suffix in the name
            stem = stem.with_name(f"{stem.name}_{source.suffix.lower().lstrip('.')}")
        target = out / stem.with_suffix(suffix)
        step_targets = [out / stem.with_name(f"{stem.name}_step{t}").with_suffix(suffix)
                        for t in range(save_steps + 1)] if save_steps is not None else []
        jobs.append(Job(source, target, written, step_targets))
    every_output = [output for job in jobs for output in job.outputs()]
    if len(set(every_output)) != len(every_output):
        twice = next(o for o in every_output if every_output.count(o) > 1)
        raise RestoreError(f"two inputs would both be written to {twice}; restore them separately")
    inputs_on_disk = [p for p in absolute if p.exists()]
    for job in jobs:
        for output in job.outputs():
            if output.exists() and any(os.path.samefile(output, p) for p in inputs_on_disk):
                raise RestoreError(f"{job.source}: its output {output} would overwrite an input; "
                                   "choose another --out")
    return jobs


def check_targets(jobs: list[Job], overwrite: bool, skip_existing: bool) -> list[Job]:
    """The jobs to run: refuses an output that is a folder, and an existing output unless
    ``overwrite``; with ``skip_existing`` a job whose outputs all exist is dropped instead."""
    if overwrite and skip_existing:
        raise RestoreError("--overwrite and --skip-existing contradict each other; pass one")
    todo = []
    for job in jobs:
        outputs = job.outputs()
        for output in outputs:
            if output.is_dir():
                raise RestoreError(f"{output}: the output of {job.source} would replace a folder; "
                                   "choose another --out")
        existing = [o for o in outputs if o.exists() or o.is_symlink()]
        if skip_existing and len(existing) == len(outputs):
            continue
        if existing and not overwrite:
            hint = "pass --overwrite to replace it or --skip-existing to skip its input"
            raise RestoreError(f"{existing[0]} exists; {hint}, or choose another --out")
        todo.append(job)
    return todo


@dataclass
class Summary:
    images: int
    skipped: int
    seconds: float
    peak_memory_bytes: int | None

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        memory = (f", peak memory {self.peak_memory_bytes / 2**20:.0f} MiB"
                  if self.peak_memory_bytes is not None else "")
        skipped = f" ({self.skipped} skipped: outputs exist)" if self.skipped else ""
        return f"restored {self.images} images{skipped} in {self.seconds:.1f} s, {rate:.2f} images/s{memory}"


def _peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def step_images(make_refiner, x, steps: int, tiled: bool) -> list:
    """The images of refinement steps 0..steps of x (step 0: the plain pass), each as the
    refinement with that many steps returns it. Untiled, the steps chain on the image padded
    once to a multiple of 8 (what the refinement itself iterates on), so the cost is that of
    one refinement plus one plain pass; tiled, each step count is refined on its own (tiles
    blend after the last step only)."""
    from .refine import pad_to_multiple

    h, w = x.shape[-2:]
    if tiled:
        return [make_refiner(t)(x) for t in range(steps + 1)]
    current = pad_to_multiple(x, 8)
    images = [make_refiner(0)(current)[..., :h, :w]]
    one_step = make_refiner(1)
    for _ in range(steps):
        current = one_step(current)
        images.append(current[..., :h, :w])
    return images


def _write(target: Path, restored, image, format: str) -> None:
    from .images import write_image

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, restored[0].float().cpu(), image.alpha, image.grayscale,
                    8 if format == "jpeg" else image.bit_depth, image.exif, image.icc_profile, format)
    except OSError as exc:
        raise RestoreError(f"{target}: cannot write ({exc.strerror or exc})") from None


def run(jobs: list[Job], make_refiner, device, steps: int, *, save_steps: bool = False, tiled: bool = False,
        progress: bool = True, skipped: int = 0) -> Summary:
    """Restore every job's input with ``make_refiner(steps)`` (a Refiner factory; it should keep
    one Refiner per step count, so that states and captured graphs serve every image) and write
    its outputs; with ``save_steps`` also each step's image (step 0: the plain pass). Prints one
    line per image and returns the closing summary."""
    import time

    import torch
    from tqdm.auto import tqdm

    from .images import read_image

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for job in tqdm(jobs, desc="restore", unit="image", disable=not progress or len(jobs) < 2):
        image = read_image(job.source)
        x = image.rgb[None].to(device)
        if save_steps:
            images = step_images(make_refiner, x, steps, tiled)
            outputs = list(zip(job.step_targets, images)) + [(job.target, images[-1])]
        else:
            outputs = [(job.target, make_refiner(steps)(x))]
        for target, restored in outputs:
            _write(target, restored, image, job.format)
        height, width = image.size
        notes = [f"{width}x{height}", f"{8 if job.format == 'jpeg' else image.bit_depth}-bit {job.format}"]
        notes += ["grayscale"] * image.grayscale
        notes += ["alpha kept"] * (image.alpha is not None and job.format != "jpeg")
        notes += [f"{len(job.step_targets)} step images"] * bool(job.step_targets)
        print(f"{job.source} -> {job.target} ({', '.join(notes)})")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Summary(len(jobs), skipped, time.perf_counter() - start, _peak_memory(device))
