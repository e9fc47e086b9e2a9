"""Training and evaluation data: clean images + on-the-fly degradations, paired folders, and the
PromptIR and CDD-11 dataset trees.

Sources (the ``--data`` argument of the command line, parsed by ``open_source``):

- ``skimage``: photographs bundled with scikit-image. ``SKIMAGE_TRAIN`` are used for
  training, ``SKIMAGE_HELD_OUT`` only for evaluation (grayscale photos are replicated to RGB).
  The run's tasks (``--tasks``) degrade them on the fly.
- ``DIR``: a folder of clean images (PNG, JPEG, ...), degraded on the fly by the run's tasks.
- ``paired:LQ_DIR,GT_DIR``: degraded (LQ) and clean (GT) images matched by a key that the pair
  rule (``--pair-rule``, see below) derives from each file's stem; task label "paired". The
  layout of the public benchmarks, e.g. Rain100L ``input/`` and ``target/``.
- ``promptir:ROOT``: the official PromptIR training tree (ROOT holds ``Train/``, or is it):
  ``Train/Denoise/`` clean images, each used once per noise task ``noise15``, ``noise25`` and
  ``noise50`` with synthetic Gaussian noise (``sipl_fast.data.degradations``);
  ``Train/Derain/rainy`` + ``Train/Derain/gt`` paired by the ``rain`` rule (task "derain");
  ``Train/Dehaze/synthetic`` + ``Train/Dehaze/original`` paired by the ``reside`` rule (task
  "dehaze"; hazy files may sit in subfolders such as ``synthetic/part1/``). At least one of the
  three parts must exist; a warning names the absent ones. (The released PromptIR code also
  repeats Rain100L 120 times per epoch; here every item counts once: give more weight to rain
  by passing its folders as a second ``paired:`` source with ``--data-weights``.)
- ``cdd11:ROOT``: one CDD-11 split (``CDD-11/train`` or ``CDD-11/test``): ``ROOT/clear`` plus
  one folder per composite degradation (``low``, ``haze``, ``rain``, ``snow``, ``low_haze``,
  ``low_rain``, ``low_snow``, ``haze_rain``, ``haze_snow``, ``low_haze_rain``,
  ``low_haze_snow``, or any other name), holding the same file names (``stem`` rule) as
  ``clear/``. Every degradation folder is a task named after the folder. A ROOT holding
  ``train/`` and ``test/`` is refused: point at one of them.

Only clean sources (``skimage``, ``DIR``) use the run's tasks; the others label their images
with the tasks above whatever ``--tasks`` says.

Pair rules (``PAIR_RULES``; they apply to ``paired:`` sources):

- ``stem``: the key is the file stem on both sides (``input/12.png`` <-> ``target/12.jpg``).
- ``rain``: a leading ``rain-`` is stripped from LQ stems and ``norain-`` from GT stems
  (Rain100L/Rain13K ``rain-12.png`` <-> ``norain-12.png``); stems without the prefix are kept.
- ``reside``: the LQ key is the stem up to its first ``_``, the GT key the whole stem (RESIDE
  ``0001_0.8_0.2.jpg`` -> ``0001.jpg``); several LQ files share one GT file.
- ``key:REGEX``: the first group of REGEX, ``re.search``'ed in each stem, is the key on both
  sides, e.g. ``key:(\\d+)`` (keys compare as text: ``01`` and ``1`` differ); several LQ files
  may share one GT file.

Folders are listed recursively (images in subfolders count; pairing is by key, not by relative
path); hidden files and folders and files with other suffixes are ignored. Two GT files with
one key are an error naming both; so are two LQ files with one key under the one-to-one rules
(``stem``, ``rain``).

Training samples are random ``patch`` x ``patch`` crops with a random flip and rotation
(the 8 symmetries of the square). Every random choice of sample ``i`` in epoch ``e`` comes
from a generator seeded with (seed, e, i), so a sample does not depend on the worker that
loads it or on what was loaded before it: restarts and any number of DataLoader workers or
DDP ranks see the same data. ``mixed_training_set`` mixes several sources: by default it
concatenates their items; with ``weights`` each sample draws its source with those
probabilities from the same (seed, e, i) generator.

Evaluation sets (``DataSource.eval_set``) read each sample from disk only when it is indexed
(whole images as float32 (3, H, W) in [0, 1], or centre crops of at most ``size`` x ``size``).
Clean images give one sample per (task, image), degraded by a generator seeded with (seed,
task index, image index); ``uint8_noise=True`` makes the noise tasks follow the PromptIR test
code instead (uint8 clean image, Gaussian noise added and truncated to uint8). Sample names
are unique within a task: the photo names for ``skimage``, else the path of the (degraded)
file relative to its folder, e.g. ``part1/0001_0.8_0.2.jpg``.

Problems with the data raise ``DataError`` naming the file: an empty folder, an unreadable
file, a file without a partner, partners of different sizes, an image smaller than the patch.
``open_source`` lists the files, pairs them and reads every file header; ``training_set``
checks the sizes against the patch; ``check()`` decodes every file once (training runs it
before the first step), so a corrupt file cannot stop a run hours in. With ``skip_bad=True``
such files (and the pairs or items that use them) are dropped instead, and each of these
passes gives one ``DataWarning`` saying how many files it dropped and naming the first few;
a source left empty is still an error.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..images import ImageReadError, image_size, read_image, tensor_from_uint8
from .degradations import DEGRADATIONS, degrade, resolve_tasks, task_parts
from .layouts import (IMAGE_SUFFIXES, PAIR_RULES, DataError, DataWarning, Item, Problems, cdd11_items, list_images,
                      paired_items, parse_pair_rule, promptir_items, relative_name, unique)

__all__ = ["IMAGE_SUFFIXES", "PAIR_RULES", "SKIMAGE_TRAIN", "SKIMAGE_HELD_OUT", "DataError", "DataWarning", "Item",
           "DataSource", "DegradedCrops", "LabelledCrops", "MixedCrops", "EvalSample", "EvalSet", "open_source",
           "mixed_training_set", "sample_generator", "skimage_photo", "synthetic_eval_set", "list_images",
           "uint8_gaussian_noise"]

# scikit-image's bundled photographs (no download needed). Held-out photos never appear in training.
SKIMAGE_TRAIN = ("astronaut", "coffee", "rocket", "motorcycle_left", "immunohistochemistry",
                 "camera", "brick", "grass", "gravel")
SKIMAGE_HELD_OUT = ("chelsea", "coins")


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *keys), decorrelated by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------- reading files
def skimage_photo(name: str) -> torch.Tensor:
    """One bundled scikit-image photo as a (3, H, W) float tensor in [0, 1]."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return tensor_from_uint8(left if name == "motorcycle_left" else right)
    return tensor_from_uint8(getattr(skimage.data, name)())


def _load(path: Path) -> torch.Tensor:
    try:
        return read_image(path).rgb
    except ImageReadError as exc:
        raise DataError(str(exc)) from None


def _header_sizes(paths: Sequence[Path], known: Mapping[Path, tuple[int, int]] | None,
                  problems: Problems) -> dict[Path, tuple[int, int]]:
    """(height, width) of every readable file of ``paths`` (``known`` sizes are not read again)."""
    sizes = {}
    for path in unique(paths):
        if known is not None and path in known:
            sizes[path] = known[path]
            continue
        try:
            sizes[path] = image_size(path)
        except ImageReadError as exc:
            problems.add(path, str(exc))
    return sizes


def _partner_message(degraded: Path, clean: Path, degraded_size: Sequence[int], clean_size: Sequence[int]) -> str:
    return (f"{degraded}: size {degraded_size[0]}x{degraded_size[1]} differs from its partner {clean} "
            f"({clean_size[0]}x{clean_size[1]})")


def _usable_items(items: Sequence[Item], sizes: Mapping[Path, tuple[int, int]], problems: Problems) -> list[Item]:
    """The items whose files all have sizes (readable headers) and whose partners are the same size."""
    usable = []
    for item in items:
        if not all(path in sizes for path in item.files):
            continue
        if item.lq is not None and sizes[item.lq] != sizes[item.gt]:
            problems.add(item.lq, _partner_message(item.lq, item.gt, sizes[item.lq], sizes[item.gt]))
            continue
        usable.append(item)
    return usable


def _fits(path: Path, size: tuple[int, int], patch: int, problems: Problems) -> bool:
    if min(size) < patch:
        problems.add(path, f"{path}: {size[0]}x{size[1]} is smaller than the training patch {patch}")
        return False
    return True


def read_every_file(paths: Sequence[Path], progress: bool = False, problems: Problems | None = None) -> None:
    """Decode every file once, with a progress bar. A file that fails raises DataError naming it,
    or goes to ``problems`` when given."""
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="check data", disable=not progress or not paths, leave=False):
        try:
            _load(path)
        except DataError as exc:
            if problems is None:
                raise
            problems.add(path, str(exc))


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


def _random_crops(patch: int, g: torch.Generator, *images: torch.Tensor) -> list[torch.Tensor]:
    """One random ``patch`` x ``patch`` box and symmetry applied to every image (same sizes)."""
    top, left = random_crop_box(images[0].shape[1], images[0].shape[2], patch, g)
    return random_symmetry([image[:, top:top + patch, left:left + patch] for image in images], g)


# --------------------------------------------------------------------------- training sets
class _Crops(Dataset):
    """``length`` samples per epoch (default: the item count, at least 1024); sample ``i`` of
    epoch ``e`` is ``sample(i mod count, generator(seed, e, i))``."""

    def __init__(self, patch: int, seed: int, length: int | None, label: str, skip_bad: bool):
        self.patch, self.seed, self.requested_length = patch, seed, length
        self.label, self.skip_bad = label, skip_bad
        self.epoch = 0

    @property
    def count(self) -> int:
        raise NotImplementedError

    @property
    def length(self) -> int:
        return self.requested_length if self.requested_length is not None else max(self.count, 1024)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.sample(index % self.count, sample_generator(self.seed, self.epoch, index))

    def sample(self, item: int, g: torch.Generator) -> dict:
        """The training sample of item ``item`` drawn with ``g``."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        raise NotImplementedError

    def _drop(self, bad: set[Path]) -> None:
        raise NotImplementedError

    def check(self, progress: bool = False) -> None:
        """Read every file once: DataError naming the first unreadable one, or with ``skip_bad``
        drop what uses the unreadable ones (one warning)."""
        with Problems(self.label, self.skip_bad) as problems:
            read_every_file(self.files(), progress, problems)
        if problems.messages:
            self._drop(set(problems.messages))
            if not self.count:
                raise DataError(f"{self.label}: no readable training images left")


class DegradedCrops(_Crops):
    """Random crops of clean images, each degraded by a random task of ``tasks``.

    ``images``: (3, H, W) tensors held in memory, or paths read on each access.
    ``length`` is the number of samples per epoch (a "virtual" epoch: sample i uses image
    i mod len(images)), so a handful of photos still fills large batches. ``sizes``: known
    (height, width) of paths (others are read from the headers); ``skip_bad`` drops unreadable
    or too small files with one warning naming ``label``.
    Items: {"lq": degraded (3, P, P), "gt": clean (3, P, P), "task": index into ``tasks``}.
    """

    def __init__(self, images: Sequence[torch.Tensor | Path], tasks: Sequence[str], patch: int,
                 seed: int = 0, length: int | None = None, *, sizes: Mapping[Path, tuple[int, int]] | None = None,
                 skip_bad: bool = False, label: str = "training data"):
        super().__init__(patch, seed, length, label, skip_bad)
        if not images:
            raise DataError(f"{label}: no training images")
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise DataError(f"{label}: clean images need at least one task to degrade them with")
        for task in self.tasks:
            resolve_tasks(task)
        with Problems(label, skip_bad) as problems:
            known = _header_sizes([image for image in images if isinstance(image, Path)], sizes, problems)
            self.images = []
            for image in images:
                if not isinstance(image, Path):
                    if min(image.shape[-2:]) < patch:
                        raise DataError(f"an image of {tuple(image.shape[-2:])} is smaller than the training "
                                        f"patch {patch}")
                    self.images.append(image)
                elif image in known and _fits(image, known[image], patch, problems):
                    self.images.append(image)
        if not self.images:
            raise DataError(f"{label}: no usable training images left")

    @property
    def count(self) -> int:
        return len(self.images)

    def files(self) -> list[Path]:
        return [image for image in self.images if isinstance(image, Path)]

    def _drop(self, bad: set[Path]) -> None:
        self.images = [image for image in self.images if not (isinstance(image, Path) and image in bad)]

    def sample(self, item: int, g: torch.Generator) -> dict:
        source = self.images[item]
        image = _load(source) if isinstance(source, Path) else source
        (clean,) = _random_crops(self.patch, g, image)
        task = int(torch.randint(0, len(self.tasks), (1,), generator=g))
        degraded = degrade(clean[None], self.tasks[task], g)[0]
        return {"lq": degraded, "gt": clean, "task": task}


class LabelledCrops(_Crops):
    """Random crops of labelled items: aligned crops of (degraded, clean) file pairs, or crops of
    clean files degraded by the item's own task (``Item.lq`` None).

    ``tasks`` are the items' task names in order of first appearance; ``sizes``, ``skip_bad``
    and ``label`` as for ``DegradedCrops`` (also for partners of different sizes).
    Items: {"lq": (3, P, P), "gt": (3, P, P), "task": index into ``tasks``}.
    """

    def __init__(self, items: Sequence[Item], patch: int, seed: int = 0, length: int | None = None, *,
                 sizes: Mapping[Path, tuple[int, int]] | None = None, skip_bad: bool = False,
                 label: str = "training data"):
        super().__init__(patch, seed, length, label, skip_bad)
        if not items:
            raise DataError(f"{label}: no training images")
        self.tasks = tuple(dict.fromkeys(item.task for item in items))
        self.task_index = {task: index for index, task in enumerate(self.tasks)}
        with Problems(label, skip_bad) as problems:
            known = _header_sizes([path for item in items for path in item.files], sizes, problems)
            self.items = [item for item in _usable_items(items, known, problems)
                          if _fits(item.lq if item.lq is not None else item.gt, known[item.gt], patch, problems)]
        if not self.items:
            raise DataError(f"{label}: no usable training images left")

    @property
    def count(self) -> int:
        return len(self.items)

    def files(self) -> list[Path]:
        return unique(path for item in self.items for path in item.files)

    def _drop(self, bad: set[Path]) -> None:
        self.items = [item for item in self.items if not any(path in bad for path in item.files)]

    def sample(self, item: int, g: torch.Generator) -> dict:
        entry = self.items[item]
        task = self.task_index[entry.task]
        if entry.lq is None:
            (clean,) = _random_crops(self.patch, g, _load(entry.gt))
            return {"lq": degrade(clean[None], entry.task, g)[0], "gt": clean, "task": task}
        degraded, clean = _load(entry.lq), _load(entry.gt)
        if degraded.shape != clean.shape:
            raise DataError(_partner_message(entry.lq, entry.gt, degraded.shape[1:], clean.shape[1:]))
        degraded, clean = _random_crops(self.patch, g, degraded, clean)
        return {"lq": degraded, "gt": clean, "task": task}


class MixedCrops(Dataset):
    """Samples of several training sets (``DegradedCrops`` / ``LabelledCrops``) in one dataset.

    Without ``weights`` the sets' items are concatenated: sample i of an epoch is item i mod
    (total items), so each set is drawn in proportion to its item count. With ``weights`` (one
    positive number per set) each sample draws its set with probabilities proportional to the
    weights, then one of its items, from the (seed, epoch, index) generator. ``tasks`` is the
    union of the sets' task names in order of first appearance; "task" indexes it.
    """

    def __init__(self, parts: Sequence[_Crops], seed: int, weights: Sequence[float] | None = None,
                 length: int | None = None):
        self.parts, self.seed, self.requested_length, self.epoch = list(parts), seed, length, 0
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.tasks = tuple(dict.fromkeys(task for part in self.parts for task in part.tasks))
        self.task_maps = [[self.tasks.index(task) for task in part.tasks] for part in self.parts]

    @property
    def count(self) -> int:
        return sum(part.count for part in self.parts)

    @property
    def length(self) -> int:
        return self.requested_length if self.requested_length is not None else max(self.count, 1024)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check(self, progress: bool = False) -> None:
        """Read every file of every set once (see ``DegradedCrops.check``)."""
        for part in self.parts:
            part.check(progress)

    def __getitem__(self, index: int) -> dict:
        g = sample_generator(self.seed, self.epoch, index)
        if self.weights is None:
            item, part = index % self.count, 0
            while item >= self.parts[part].count:
                item -= self.parts[part].count
                part += 1
        else:
            part = int(torch.multinomial(self.weights, 1, generator=g))
            item = int(torch.randint(0, self.parts[part].count, (1,), generator=g))
        sample = self.parts[part].sample(item, g)
        sample["task"] = self.task_maps[part][sample["task"]]
        return sample


# --------------------------------------------------------------------------- evaluation sets
@dataclass
class EvalSample:
    task: str
    name: str            # unique within the task
    lq: torch.Tensor     # (3, H, W) float32 in [0, 1]
    gt: torch.Tensor     # the same size


@dataclass
class _EvalEntry:
    """How to make one evaluation sample: a pair of files, or a clean image and its task."""

    task: str
    name: str
    gt: Path | torch.Tensor
    lq: Path | None           # None: ``task`` degrades gt, seeded by (seed, *key)
    key: tuple[int, int]      # (task index, image index)


def _centre_crop(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """The centre ``size`` x ``size`` crop (each side at most ``size``; None: the whole image)."""
    if size is None:
        return image
    height, width = min(image.shape[1], size), min(image.shape[2], size)
    top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
    return image[:, top:top + height, left:left + width].contiguous()


_NOISE_TASK = re.compile(r"noise(\d+)")


def _noise_sigma(task: str) -> int | None:
    """The sigma (0-255 units) of a plain Gaussian noise task (noise15, ...), else None."""
    match = _NOISE_TASK.fullmatch(task)
    return int(match.group(1)) if match and task in DEGRADATIONS else None


def uint8_gaussian_noise(clean: torch.Tensor, sigma: float,
                         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean) as the PromptIR test code makes them, as (3, H, W) float32 in [0, 1]:
    clean_u8 = round(clean * 255); noisy = uint8(clip(clean_u8 + N(0, 1) * sigma, 0, 255)),
    the conversion truncating, the normal draws in (H, W, 3) order."""
    pixels = np.round(clean.permute(1, 2, 0).numpy().astype(np.float64) * 255).astype(np.uint8)
    noisy = np.clip(pixels + rng.standard_normal(pixels.shape) * sigma, 0, 255).astype(np.uint8)
    return tensor_from_uint8(noisy), tensor_from_uint8(pixels)


class EvalSet(Sequence):
    """Evaluation samples (``EvalSample``), each read and degraded only when indexed.

    ``tasks``: the task names, in the order of the samples (grouped by task). ``size``: centre
    crop of at most ``size`` x ``size`` (None: whole images). Synthetic degradations of clean
    images are seeded by (seed, task index, image index); with ``uint8_noise`` the noise tasks
    use ``uint8_gaussian_noise`` with ``numpy.random.default_rng([seed, task index, image
    index])``. Indexing with a slice gives an EvalSet of those samples. Building one reads no
    pixels: ``open_source`` has checked every file header and partner size.
    """

    def __init__(self, entries: Sequence[_EvalEntry], tasks: Sequence[str], size: int | None = None,
                 seed: int = 1234, uint8_noise: bool = False):
        self.entries, self.size, self.seed, self.uint8_noise = list(entries), size, seed, uint8_noise
        present = {entry.task for entry in self.entries}
        self.tasks = tuple(task for task in tasks if task in present)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return EvalSet(self.entries[index], self.tasks, self.size, self.seed, self.uint8_noise)
        return self._sample(self.entries[index])

    def __iter__(self):
        return (self._sample(entry) for entry in self.entries)

    def _sample(self, entry: _EvalEntry) -> EvalSample:
        if entry.lq is not None:
            degraded, clean = _load(entry.lq), _load(entry.gt)
            if degraded.shape != clean.shape:
                raise DataError(_partner_message(entry.lq, entry.gt, degraded.shape[1:], clean.shape[1:]))
            return EvalSample(entry.task, entry.name, _centre_crop(degraded, self.size), _centre_crop(clean, self.size))
        clean = _centre_crop(_load(entry.gt) if isinstance(entry.gt, Path) else entry.gt, self.size)
        sigma = _noise_sigma(entry.task)
        if self.uint8_noise and sigma is not None:
            degraded, clean = uint8_gaussian_noise(clean, sigma, np.random.default_rng([self.seed, *entry.key]))
        else:
            degraded = degrade(clean[None], entry.task, sample_generator(self.seed, *entry.key))[0]
        return EvalSample(entry.task, entry.name, degraded, clean)


def synthetic_eval_set(images: Sequence[tuple[str, torch.Tensor | Path]], tasks: Sequence[str],
                       size: int | None = None, seed: int = 1234, uint8_noise: bool = False) -> EvalSet:
    """Every (task, image) pair of named clean images (tensors or files), task-major, degraded
    with a generator fixed by (seed, task index, image index)."""
    if not tasks:
        raise DataError("clean evaluation images need at least one task to degrade them with")
    for task in tasks:
        task_parts(task)
    entries = [_EvalEntry(task, name, image, None, (t, i))
               for t, task in enumerate(tasks) for i, (name, image) in enumerate(images)]
    return EvalSet(entries, tasks, size, seed, uint8_noise)


def _items_eval_set(items: Sequence[Item], size: int | None, seed: int, uint8_noise: bool) -> EvalSet:
    tasks = tuple(dict.fromkeys(item.task for item in items))
    image_index: dict[Path, int] = {}   # of the clean files degraded synthetically
    entries = []
    for item in items:
        index = image_index.setdefault(item.gt, len(image_index)) if item.lq is None else 0
        entries.append(_EvalEntry(item.task, item.name, item.gt, item.lq, (tasks.index(item.task), index)))
    entries.sort(key=lambda entry: entry.key[0])   # stable: grouped by task, items in order
    return EvalSet(entries, tasks, size, seed, uint8_noise)


# --------------------------------------------------------------------------- the --data argument
@dataclass
class DataSource:
    """What one ``--data`` spec names: where training crops and evaluation images come from.

    Clean sources (``skimage``, ``DIR``) hold ``train_images`` that the run's tasks degrade;
    the others hold labelled ``items`` (pairs, or clean files with a fixed synthetic task).
    """

    kind: str                                           # "skimage", "folder", "paired", "promptir" or "cdd11"
    spec: str                                           # the --data text, named in messages
    train_images: list = field(default_factory=list)    # tensors (skimage) or paths (folder)
    eval_images: list[tuple[str, torch.Tensor]] | None = None   # skimage's held-out photos
    items: list[Item] = field(default_factory=list)
    root: Path | None = None                            # a folder source's folder (sample names)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)   # (height, width) from the headers
    skip_bad: bool = False

    def training_set(self, tasks: Sequence[str], patch: int, seed: int, length: int | None = None) -> Dataset:
        """Random ``patch`` crops (see ``DegradedCrops`` and ``LabelledCrops``); ``tasks`` degrade
        the images of clean sources and are ignored by the others."""
        options = dict(sizes=self.sizes, skip_bad=self.skip_bad, label=self.spec)
        if self.items:
            return LabelledCrops(self.items, patch, seed, length, **options)
        return DegradedCrops(self.train_images, tasks, patch, seed, length, **options)

    def eval_set(self, tasks: Sequence[str], size: int | None = None, seed: int = 1234,
                 uint8_noise: bool = False) -> EvalSet:
        """Evaluation samples, read when indexed: clean images (skimage's held-out photos, a
        folder's images) degraded by every task of ``tasks``, or the labelled items (pairs, and
        PromptIR's Denoise images under noise15/25/50; ``tasks`` ignored). See ``EvalSet``."""
        if self.items:
            return _items_eval_set(self.items, size, seed, uint8_noise)
        images = self.eval_images
        if images is None:   # a clean folder: evaluate on its own images (no held-out split given)
            images = [(relative_name(path, self.root), path) for path in self.train_images]
        return synthetic_eval_set(images, tasks, size, seed, uint8_noise)


def _root(spec: str, prefix: str, form: str) -> Path:
    root = spec[len(prefix):]
    if not root:
        raise DataError(f"--data {spec!r}: expected {form}")
    return Path(root)


def open_source(spec: str, *, pair_rule: str = "stem", skip_bad: bool = False) -> DataSource:
    """Parse a ``--data`` spec (module docstring): list its files, pair them and read every file
    header. ``pair_rule`` (a key of ``PAIR_RULES`` or ``key:REGEX``) matches ``paired:``
    folders; it is checked for every spec. ``skip_bad``: drop bad files with one warning
    instead of raising DataError (an empty source still raises)."""
    spec = str(spec)
    rule = parse_pair_rule(pair_rule)
    if spec == "skimage":
        return DataSource("skimage", spec, [skimage_photo(n) for n in SKIMAGE_TRAIN],
                          eval_images=[(n, skimage_photo(n)) for n in SKIMAGE_HELD_OUT])
    images: list[Path] = []
    items: list[Item] = []
    root = None
    with Problems(spec, skip_bad) as problems:
        if spec.startswith("paired:"):
            kind, dirs = "paired", spec[len("paired:"):].split(",")
            if len(dirs) != 2 or not all(dirs):
                raise DataError(f"--data {spec!r}: expected paired:DEGRADED_DIR,CLEAN_DIR")
            items = paired_items("paired", Path(dirs[0]), Path(dirs[1]), rule, problems)
        elif spec.startswith("promptir:"):
            kind, items = "promptir", promptir_items(_root(spec, "promptir:", "promptir:ROOT"), problems)
        elif spec.startswith("cdd11:"):
            kind, items = "cdd11", cdd11_items(_root(spec, "cdd11:", "cdd11:ROOT"), problems)
        else:
            kind, root = "folder", Path(spec)
            images = list_images(root)
        sizes = _header_sizes(images + [path for item in items for path in item.files], None, problems)
        items = _usable_items(items, sizes, problems)
        images = [path for path in images if path in sizes]
    if not items and not images:
        raise DataError(f"{spec}: no usable images left after skipping bad files")
    return DataSource(kind, spec, images, items=items, root=root, sizes=sizes, skip_bad=skip_bad)


def mixed_training_set(sources: Sequence[DataSource], tasks: Sequence[str], patch: int, seed: int,
                       weights: Sequence[float] | None = None, length: int | None = None) -> Dataset:
    """One training set of several sources (``MixedCrops``): their items concatenated, or with
    ``weights`` (one positive number per source) each sample's source drawn with those
    probabilities. One source: exactly that source's ``training_set``."""
    if not sources:
        raise DataError("no data sources")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(sources) or not all(np.isfinite(w) and w > 0 for w in weights):
            raise DataError(f"--data-weights: expected {len(sources)} positive finite numbers (one per --data), "
                            f"got {weights}")
    parts = [source.training_set(tasks, patch, seed, length) for source in sources]
    if len(parts) == 1:
        return parts[0]
    return MixedCrops(parts, seed, weights, length)
