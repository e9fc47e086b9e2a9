"""Training and evaluation data: clean images + on-the-fly degradations, or paired folders.

Sources (the ``--data`` argument of the command line, parsed by ``open_source``):

- ``skimage``: photographs bundled with scikit-image. ``SKIMAGE_TRAIN`` are used for
  training, ``SKIMAGE_HELD_OUT`` only for evaluation (grayscale photos are replicated to RGB).
- ``DIR``: a folder of clean images (PNG, JPEG, ...), degraded on the fly by the tasks.
- ``paired:DEG_DIR,CLEAN_DIR``: degraded and clean images with matching file names (the
  layout of the public all-in-one benchmarks, e.g. Rain100L ``input/`` and ``target/``).

Training samples are random ``patch`` x ``patch`` crops with a random flip and rotation
(the 8 symmetries of the square). Every random choice of sample ``i`` in epoch ``e`` comes
from a generator seeded with (seed, e, i), so a sample does not depend on the worker that
loads it or on what was loaded before it: restarts and any number of DataLoader workers or
DDP ranks see the same data.

Problems with the data (an empty folder, an unreadable file, a missing partner, partners of
different sizes, an image smaller than the patch) raise ``DataError`` naming the file. Sizes
are checked from the file headers when a dataset is built; ``check()`` reads every file once
(training runs it before the first step), so a corrupt file cannot stop a run hours in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..images import ImageReadError, image_size, read_image, tensor_from_uint8
from .degradations import degrade, resolve_tasks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# scikit-image's bundled photographs (no download needed). Held-out photos never appear in training.
SKIMAGE_TRAIN = ("astronaut", "coffee", "rocket", "motorcycle_left", "immunohistochemistry",
                 "camera", "brick", "grass", "gravel")
SKIMAGE_HELD_OUT = ("chelsea", "coins")


class DataError(ValueError):
    """A problem with the training or evaluation data; the message names the file or folder."""


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *keys), decorrelated by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------- image sources
def skimage_photo(name: str) -> torch.Tensor:
    """One bundled scikit-image photo as a (3, H, W) float tensor in [0, 1]."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return tensor_from_uint8(left if name == "motorcycle_left" else right)
    return tensor_from_uint8(getattr(skimage.data, name)())


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; DataError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _load(path: Path) -> torch.Tensor:
    try:
        return read_image(path).rgb
    except ImageReadError as exc:
        raise DataError(str(exc)) from None


def _header_size(path: Path) -> tuple[int, int]:
    try:
        return image_size(path)
    except ImageReadError as exc:
        raise DataError(str(exc)) from None


def _check_size(path: Path, patch: int) -> tuple[int, int]:
    height, width = _header_size(path)
    if min(height, width) < patch:
        raise DataError(f"{path}: {height}x{width} is smaller than the training patch {patch}")
    return height, width


def _check_partners(degraded: Path, clean: Path, degraded_size: tuple[int, int],
                    clean_size: tuple[int, int]) -> None:
    if degraded_size != clean_size:
        raise DataError(f"{degraded}: size {degraded_size[0]}x{degraded_size[1]} differs from its partner "
                        f"{clean} ({clean_size[0]}x{clean_size[1]})")


def read_every_file(paths: Sequence[Path], progress: bool = False) -> None:
    """Decode every file once (DataError naming the first that fails), with a progress bar."""
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="check data", disable=not progress or not paths, leave=False):
        _load(path)


def paired_files(degraded_dir: str | os.PathLike, clean_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(degraded, clean) pairs matched by file name (the stem: input.png may pair with target.jpg)."""
    degraded = list_images(degraded_dir)
    clean = {p.stem: p for p in list_images(clean_dir)}
    pairs = []
    for path in degraded:
        partner = clean.pop(path.stem, None)
        if partner is None:
            raise DataError(f"{path}: no clean partner named {path.stem}.* in {clean_dir}")
        pairs.append((path, partner))
    if clean:
        orphan = sorted(clean.values())[0]
        raise DataError(f"{orphan}: no degraded partner named {orphan.stem}.* in {degraded_dir}")
    return pairs


# --------------------------------------------------------------------------- augmentation
def random_crop_box(height: int, width: int, patch: int, g: torch.Generator) -> tuple[int, int]:
    top = int(torch.randint(0, height - patch + 1, (1,), generator=g))
    left = int(torch.randint(0, width - patch + 1, (1,), generator=g))
    return top, left


def random_symmetry(images: Sequence[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """The same random flip + 90-degree rotation applied to every image of ``images``."""
    flip, turns = int(torch.randint(0, 2, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))
    out = []
    for image in images:
        image = image.flip(-1) if flip else image
        out.append(torch.rot90(image, turns, dims=(-2, -1)).contiguous())
    return out


# --------------------------------------------------------------------------- datasets
class _VirtualEpochs(Dataset):
    """``length`` samples per epoch (default: the source count, at least 1024) and the epoch
    number that, with the seed and the index, seeds each sample."""

    def __init__(self, sources: int, length: int | None):
        self.length = length if length is not None else max(sources, 1024)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length


class DegradedCrops(_VirtualEpochs):
    """Random crops of clean images, each degraded by a random task of ``tasks``.

    ``images``: (3, H, W) tensors held in memory, or paths read on each access.
    ``length`` is the number of samples per epoch (a "virtual" epoch: sample i uses image
    i mod len(images)), so a handful of photos still fills large batches.
    Items: {"lq": degraded (3, P, P), "gt": clean (3, P, P), "task": index into ``tasks``}.
    """

    def __init__(self, images: Sequence[torch.Tensor | Path], tasks: Sequence[str], patch: int,
                 seed: int = 0, length: int | None = None):
        if not images:
            raise DataError("no training images")
        self.images, self.tasks, self.patch, self.seed = list(images), tuple(tasks), patch, seed
        for task in self.tasks:
            resolve_tasks(task)
        for image in self.images:
            if isinstance(image, Path):
                _check_size(image, patch)
            elif min(image.shape[-2:]) < patch:
                raise DataError(f"an image of {tuple(image.shape[-2:])} is smaller than the training patch {patch}")
        super().__init__(len(self.images), length)

    def check(self, progress: bool = False) -> None:
        """Read every image file once (in-memory images need nothing)."""
        read_every_file([image for image in self.images if isinstance(image, Path)], progress)

    def __getitem__(self, index: int) -> dict:
        g = sample_generator(self.seed, self.epoch, index)
        source = self.images[index % len(self.images)]
        image = _load(source) if isinstance(source, Path) else source
        top, left = random_crop_box(image.shape[1], image.shape[2], self.patch, g)
        (clean,) = random_symmetry([image[:, top:top + self.patch, left:left + self.patch]], g)
        task = int(torch.randint(0, len(self.tasks), (1,), generator=g))
        degraded = degrade(clean[None], self.tasks[task], g)[0]
        return {"lq": degraded, "gt": clean, "task": task}


class PairedCrops(_VirtualEpochs):
    """Aligned random crops of (degraded, clean) file pairs; the task is "paired"."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], patch: int, seed: int = 0, length: int | None = None):
        self.pairs, self.patch, self.seed = list(pairs), patch, seed
        for degraded, clean in self.pairs:
            _check_partners(degraded, clean, _check_size(degraded, patch), _check_size(clean, patch))
        self.tasks = ("paired",)
        super().__init__(len(self.pairs), length)

    def check(self, progress: bool = False) -> None:
        """Read every file of every pair once."""
        read_every_file([path for pair in self.pairs for path in pair], progress)

    def __getitem__(self, index: int) -> dict:
        g = sample_generator(self.seed, self.epoch, index)
        degraded_path, clean_path = self.pairs[index % len(self.pairs)]
        degraded, clean = _load(degraded_path), _load(clean_path)
        if degraded.shape != clean.shape:
            raise DataError(f"{degraded_path}: size {tuple(degraded.shape[1:])} differs from its partner "
                            f"{clean_path} {tuple(clean.shape[1:])}")
        top, left = random_crop_box(clean.shape[1], clean.shape[2], self.patch, g)
        box = (slice(None), slice(top, top + self.patch), slice(left, left + self.patch))
        degraded, clean = random_symmetry([degraded[box], clean[box]], g)
        return {"lq": degraded, "gt": clean, "task": 0}


# --------------------------------------------------------------------------- evaluation sets
@dataclass
class EvalSample:
    task: str
    name: str
    lq: torch.Tensor   # (3, H, W), H and W multiples of 8
    gt: torch.Tensor


def _crop_for_eval(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre crop to size x size (or the whole image) with sides cut down to multiples of 8.

    Multiples of 8 let step 0 (the plain pass) run without padding, exactly as in training.
    """
    height, width = image.shape[1:]
    if size is not None:
        height, width = min(height, size), min(width, size)
    height, width = height - height % 8, width - width % 8
    if height == 0 or width == 0:
        raise DataError(f"an evaluation image of {tuple(image.shape[1:])} is smaller than 8x8")
    top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
    return image[:, top:top + height, left:left + width].contiguous()


def synthetic_eval_set(images: Sequence[tuple[str, torch.Tensor]], tasks: Sequence[str], size: int | None,
                       seed: int = 1234) -> list[EvalSample]:
    """Every (task, image) pair, degraded with a generator fixed by (seed, task, image)."""
    samples = []
    for t, task in enumerate(tasks):
        for i, (name, image) in enumerate(images):
            clean = _crop_for_eval(image, size)
            degraded = degrade(clean[None], task, sample_generator(seed, t, i))[0]
            samples.append(EvalSample(task, name, degraded, clean))
    return samples


# --------------------------------------------------------------------------- the --data argument
@dataclass
class DataSource:
    """What ``--data`` names: where training crops and evaluation images come from."""

    kind: str                                          # "skimage", "folder" or "paired"
    train_images: list                                 # tensors or paths (skimage / folder)
    eval_images: list[tuple[str, torch.Tensor]] | None = None
    pairs: list[tuple[Path, Path]] | None = None       # paired

    def training_set(self, tasks: Sequence[str], patch: int, seed: int, length: int | None = None) -> Dataset:
        if self.kind == "paired":
            return PairedCrops(self.pairs, patch, seed, length)
        return DegradedCrops(self.train_images, tasks, patch, seed, length)

    def eval_set(self, tasks: Sequence[str], size: int | None, seed: int = 1234) -> list[EvalSample]:
        """Held-out samples: synthetic degradations of held-out photos, or the pairs themselves."""
        if self.kind == "paired":
            for d, c in self.pairs:   # every pair before the first is read
                _check_partners(d, c, _header_size(d), _header_size(c))
            return [EvalSample("paired", d.name, _crop_for_eval(_load(d), size), _crop_for_eval(_load(c), size))
                    for d, c in self.pairs]
        images = self.eval_images
        if images is None:   # a clean folder: evaluate on its own images (no held-out split given)
            images = [(p.name, _load(p)) for p in self.train_images]
        return synthetic_eval_set(images, tasks, size, seed)


def open_source(spec: str) -> DataSource:
    """Parse ``skimage``, ``DIR`` or ``paired:DEG_DIR,CLEAN_DIR``."""
    if spec == "skimage":
        return DataSource("skimage", [skimage_photo(n) for n in SKIMAGE_TRAIN],
                          eval_images=[(n, skimage_photo(n)) for n in SKIMAGE_HELD_OUT])
    if spec.startswith("paired:"):
        dirs = spec[len("paired:"):].split(",")
        if len(dirs) != 2 or not all(dirs):
            raise DataError(f"--data {spec!r}: expected paired:DEGRADED_DIR,CLEAN_DIR")
        return DataSource("paired", [], pairs=paired_files(dirs[0], dirs[1]))
    return DataSource("folder", list_images(spec))
