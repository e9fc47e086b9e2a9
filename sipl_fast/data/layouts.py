"""Dataset folder layouts: recursive image listing, pair rules, and the PromptIR and CDD-11 trees.

This module turns folders into lists of files and labelled ``Item``s; reading the images is
``sipl_fast.data.datasets``'s work. The ``--data`` forms and the pair rules are described in
that module's docstring.

Listing is recursive: images in subfolders count, hidden files and folders (names starting
with ".") and files whose suffix is not one of ``IMAGE_SUFFIXES`` are ignored, symbolic links
are followed, and files are sorted by their path relative to the listed folder.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """A problem with the training or evaluation data; the message names the file or folder."""


class DataWarning(UserWarning):
    """Bad files that were skipped (``skip_bad=True``); the message counts and names them."""


# --------------------------------------------------------------------------- bad files
class Problems:
    """The bad files found in one pass over a source.

    Without ``skip_bad`` the first problem raises DataError with its message. With it, problems
    are collected (one per file) and, when the ``with`` block ends, reported in a single
    DataWarning that names the source, counts the files and quotes the first few messages.
    """

    SHOWN = 3

    def __init__(self, label: str, skip_bad: bool):
        self.label, self.skip_bad = label, skip_bad
        self.messages: dict[Path, str] = {}

    def add(self, path: Path, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.messages.setdefault(path, message)

    def __enter__(self) -> "Problems":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None and self.messages:
            messages = list(self.messages.values())
            more = f"; and {len(messages) - self.SHOWN} more" if len(messages) > self.SHOWN else ""
            warnings.warn(f"{self.label}: skipped {len(messages)} bad file{'s' if len(messages) > 1 else ''}: "
                          f"{'; '.join(messages[:self.SHOWN])}{more}", DataWarning, stacklevel=3)


# --------------------------------------------------------------------------- listing
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files in ``folder`` and its subfolders (see the module docstring); DataError if
    ``folder`` is not a folder or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files, visited = [], set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:   # a link back up the tree: list each folder once
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            path = Path(directory, name)
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append(path)
    if not files:
        raise DataError(f"{folder}: no images in it or its subfolders (looked for {', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda path: path.relative_to(folder).parts)


def subfolders(folder: Path) -> list[Path]:
    """The folders directly inside ``folder`` whose names do not start with ".", sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def relative_name(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, with "/" separators (sample names)."""
    return path.relative_to(folder).as_posix()


# --------------------------------------------------------------------------- pair rules
PAIR_RULES = {
    "stem": "the key is the file stem on both sides (input/12.png <-> target/12.jpg)",
    "rain": "a leading 'rain-' is stripped from degraded stems and 'norain-' from clean stems "
            "(Rain100L/Rain13K: rain-12.png <-> norain-12.png)",
    "reside": "the degraded key is the stem up to its first '_', the clean key the whole stem; several degraded "
              "files share one clean file (RESIDE: 0001_0.8_0.2.jpg -> 0001.jpg)",
    "key:REGEX": "the first group of REGEX, searched in each stem, is the key on both sides, e.g. key:(\\d+); "
                 "several degraded files may share one clean file",
}


@dataclass(frozen=True)
class PairRule:
    """How a pair rule turns file stems into keys (None: the stem has no key)."""

    name: str
    degraded_key: Callable[[str], str | None]
    clean_key: Callable[[str], str | None]
    many_to_one: bool   # several degraded files may share one clean file


def _whole(stem: str) -> str:
    return stem


def _strip_prefix(prefix: str, stem: str) -> str:
    return stem[len(prefix):] if stem.startswith(prefix) else stem


def _reside_key(stem: str) -> str:
    return stem.split("_", 1)[0]


def _first_group(pattern: re.Pattern, stem: str) -> str | None:
    match = pattern.search(stem)
    return match.group(1) if match else None


def parse_pair_rule(spec: str) -> PairRule:
    """The rule named by ``spec`` (a key of ``PAIR_RULES``, or ``key:REGEX``); DataError otherwise."""
    if spec == "stem":
        return PairRule("stem", _whole, _whole, many_to_one=False)
    if spec == "rain":
        return PairRule("rain", partial(_strip_prefix, "rain-"), partial(_strip_prefix, "norain-"), many_to_one=False)
    if spec == "reside":
        return PairRule("reside", _reside_key, _whole, many_to_one=True)
    if spec.startswith("key:"):
        try:
            pattern = re.compile(spec[len("key:"):])
        except re.error as exc:
            raise DataError(f"pair rule {spec!r}: not a regular expression ({exc})") from None
        if pattern.groups < 1:
            raise DataError(f"pair rule {spec!r}: the expression needs a group in parentheses (the key), "
                            r"e.g. key:(\d+)")
        key = partial(_first_group, pattern)
        return PairRule(spec, key, key, many_to_one=True)
    raise DataError(f"pair rule {spec!r}: unknown; use one of {', '.join(PAIR_RULES)}")


def pair_files(degraded_dir: Path, clean_dir: Path, rule: PairRule, problems: Problems,
               clean_files: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(degraded, clean) pairs of two folders matched by ``rule``'s keys, in the degraded files' order.

    Two clean files with one key, or (for one-to-one rules) two degraded files with one key,
    raise DataError naming both. A file without a key or a partner is a problem (``problems``).
    ``clean_files``: the listing of ``clean_dir`` when the caller already has it.
    """
    by_key: dict[str, Path] = {}
    for path in clean_files if clean_files is not None else list_images(clean_dir):
        key = rule.clean_key(path.stem)
        if key is None:
            problems.add(path, f"{path}: the pair rule {rule.name} finds no key in its name")
        elif key in by_key:
            raise DataError(f"{by_key[key]} and {path}: two clean files with the key {key!r} (pair rule {rule.name})")
        else:
            by_key[key] = path
    pairs, used, degraded_by_key = [], set(), {}
    for path in list_images(degraded_dir):
        key = rule.degraded_key(path.stem)
        if key is None:
            problems.add(path, f"{path}: the pair rule {rule.name} finds no key in its name")
            continue
        if not rule.many_to_one:
            if key in degraded_by_key:
                raise DataError(f"{degraded_by_key[key]} and {path}: two degraded files with the key {key!r} "
                                f"(pair rule {rule.name})")
            degraded_by_key[key] = path
        partner = by_key.get(key)
        if partner is None:
            problems.add(path, f"{path}: no clean partner with the key {key!r} in {clean_dir} (pair rule {rule.name})")
            continue
        used.add(key)
        pairs.append((path, partner))
    for key, path in by_key.items():
        if key not in used:
            problems.add(path, f"{path}: no degraded partner with the key {key!r} in {degraded_dir} "
                               f"(pair rule {rule.name})")
    return pairs


# --------------------------------------------------------------------------- labelled items
@dataclass(frozen=True)
class Item:
    """One training/evaluation image with a fixed task.

    ``lq`` is the degraded file of a pair; when it is None the degraded image is made by
    applying ``task`` (a synthetic degradation such as noise25) to ``gt``.
    """

    task: str
    name: str            # unique within the task: the path relative to the item's folder
    gt: Path
    lq: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.gt,) if self.lq is None else (self.lq, self.gt)


def paired_items(task: str, degraded_dir: Path, clean_dir: Path, rule: PairRule, problems: Problems,
                 clean_files: list[Path] | None = None) -> list[Item]:
    """The pairs of two folders as items of ``task``, named by the degraded file's relative path."""
    return [Item(task, relative_name(lq, degraded_dir), gt, lq)
            for lq, gt in pair_files(degraded_dir, clean_dir, rule, problems, clean_files)]


PROMPTIR_NOISE_TASKS = ("noise15", "noise25", "noise50")
PROMPTIR_PARTS = ("Denoise", "Derain", "Dehaze")


def _required_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise DataError(f"{folder}: missing (needed by the {folder.parent.name} part of the PromptIR tree)")
    return folder


def promptir_items(root: Path, problems: Problems) -> list[Item]:
    """The items of the official PromptIR training tree at ``root`` (which holds Train/, or is it)."""
    train = root / "Train" if (root / "Train").is_dir() else root
    present = [part for part in PROMPTIR_PARTS if (train / part).is_dir()]
    if not present:
        raise DataError(f"{train}: none of the PromptIR parts {', '.join(p + '/' for p in PROMPTIR_PARTS)} "
                        f"(expected ROOT/Train/{{Denoise,Derain,Dehaze}})")
    missing = [part for part in PROMPTIR_PARTS if part not in present]
    if missing:
        warnings.warn(f"promptir:{root}: no {', '.join(str(train / part) for part in missing)}; training without "
                      f"the {', '.join(missing)} part{'s' if len(missing) > 1 else ''}", DataWarning, stacklevel=3)
    items: list[Item] = []
    if "Denoise" in present:
        folder = train / "Denoise"
        clean = list_images(folder)
        items += [Item(task, relative_name(path, folder), path) for task in PROMPTIR_NOISE_TASKS for path in clean]
    if "Derain" in present:
        items += paired_items("derain", _required_folder(train / "Derain" / "rainy"),
                              _required_folder(train / "Derain" / "gt"), parse_pair_rule("rain"), problems)
    if "Dehaze" in present:
        items += paired_items("dehaze", _required_folder(train / "Dehaze" / "synthetic"),
                              _required_folder(train / "Dehaze" / "original"), parse_pair_rule("reside"), problems)
    return items


CDD11_FOLDERS = ("low", "haze", "rain", "snow", "low_haze", "low_rain", "low_snow", "haze_rain", "haze_snow",
                 "low_haze_rain", "low_haze_snow")


def cdd11_items(root: Path, problems: Problems) -> list[Item]:
    """The items of a CDD-11 split at ``root``: clear/ plus one folder per degradation (a task each)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    clear = root / "clear"
    if not clear.is_dir():
        if (root / "train").is_dir() or (root / "test").is_dir():
            raise DataError(f"{root}: a CDD-11 root with train/ and test/; point --data at cdd11:{root / 'train'} "
                            f"or cdd11:{root / 'test'}")
        raise DataError(f"{clear}: missing (a CDD-11 split holds clear/ and one folder per degradation)")
    known = {name: i for i, name in enumerate(CDD11_FOLDERS)}
    folders = sorted((p for p in subfolders(root) if p.name != "clear"),
                     key=lambda p: (known.get(p.name, len(known)), p.name))
    if not folders:
        raise DataError(f"{root}: no degradation folders next to clear/ (CDD-11 names: {', '.join(CDD11_FOLDERS)})")
    clean, stem = list_images(clear), parse_pair_rule("stem")
    items: list[Item] = []
    for folder in folders:
        items += paired_items(folder.name, folder, clear, stem, problems, clean)
    return items


def unique(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without repeats, in first-seen order."""
    return list(dict.fromkeys(paths))
