"""The 16-bit PNG reader against the hand-written decoder of earlier releases, in one process.

    python dev/compare_png16_reader.py [--runs 5] [--size 1920x1080] [--threads 1] [--commit COMMIT]

Earlier releases decoded 16-bit PNGs in sipl_fast/images.py itself (zlib, then the PNG row
filters undone with numpy one anti-diagonal at a time); ``read_image`` now hands them to
OpenCV. The script loads that older images.py from git history (``--commit``; by default the
newest commit whose images.py has the hand-written decoder) as a temporary module and writes
seeded 16-bit RGB PNGs into a temporary folder: a smooth random field (one
``synthetic_depth`` field per channel) written by OpenCV (libpng's adaptive row filters, as most
tools write PNGs) and by sipl_fast's own writer (rows unfiltered), and the same field with
Gaussian noise (sigma 1 % of the range) written by OpenCV. For each file it checks that both
readers return exactly the pixels written, then times both whole ``read_image`` calls (file to
float tensor), ``--runs`` times each, interleaved, after one warm-up call each that is not
counted, and prints a markdown table of the medians. torch runs on ``--threads`` threads (default
one: on a shared CPU the threads of the tensor conversion, the same in both readers, wait on
each other).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

from sipl_fast.data.degradations import synthetic_depth
from sipl_fast.images import encode_png16, read_image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = "sipl_fast/images.py"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def decodes_png16_itself(source: str) -> bool:
    """Whether an images.py decodes 16-bit PNGs by its own code (zlib + row filters), not OpenCV's."""
    return "def decode_png16" in source and "zlib.decompress" in source and "cv2" not in source


def hand_written_images_module(commit: str | None) -> tuple[str, types.ModuleType]:
    """(commit, the images.py of that commit as a module). Without ``commit``: the newest commit
    whose images.py decodes 16-bit PNGs itself."""
    candidates = [commit] if commit else git("log", "--format=%h", "--", IMAGES).split()
    for candidate in candidates:
        source = git("show", f"{candidate}:{IMAGES}")
        if decodes_png16_itself(source):
            name = f"_images_{candidate}"
            module = types.ModuleType(name)
            module.__file__ = f"{candidate}:{IMAGES}"
            sys.modules[name] = module   # dataclasses look their module up while the class is built
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            return candidate, module
    raise SystemExit(f"{commit}:{IMAGES} does not decode 16-bit PNGs itself" if commit else
                     f"no commit of {IMAGES} decodes 16-bit PNGs itself")


def test_images(height: int, width: int, folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """{description: (16-bit RGB PNG, its (H, W, 3) uint16 pixels)}; see the module docstring."""
    smooth = synthetic_depth(3, height, width, torch.Generator().manual_seed(0))[:, 0].permute(1, 2, 0).numpy()
    noisy = smooth + 0.01 * np.random.default_rng(0).standard_normal(smooth.shape)
    pixels = {name: np.round(np.clip(values, 0, 1) * 65535).astype(np.uint16)
              for name, values in (("smooth", smooth), ("noisy", noisy))}
    files = {}
    for description, texture, writer in (("smooth, libpng row filters (OpenCV)", "smooth", "opencv"),
                                         ("smooth, rows unfiltered (sipl_fast)", "smooth", "sipl_fast"),
                                         ("smooth + 1 % noise, libpng row filters (OpenCV)", "noisy", "opencv")):
        path = folder / f"{texture}_{writer}.png"
        if writer == "opencv":
            assert cv2.imwrite(str(path), pixels[texture][..., ::-1])   # OpenCV writes BGR
        else:
            path.write_bytes(encode_png16(pixels[texture]))
        files[description] = (path, pixels[texture])
    return files


def decoded_pixels(loaded) -> np.ndarray:
    """The uint16 levels of a read image's (3, H, W) float tensor."""
    return np.round(loaded.rgb.permute(1, 2, 0).numpy().astype(np.float64) * 65535).astype(np.uint16)


def time_interleaved(calls: dict, runs: int) -> dict[str, list[float]]:
    """Seconds of ``runs`` calls of each, one of each in turn, after one warm-up call each."""
    for call in calls.values():
        call()
    seconds = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per reader and file (median reported)")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the test images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tensor conversion)")
    parser.add_argument("--commit", help="a commit whose images.py has the hand-written decoder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    commit, old = hand_written_images_module(args.commit)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for description, (path, pixels) in test_images(height, width, Path(folder)).items():
            for reader in (old.read_image, read_image):
                if not np.array_equal(decoded_pixels(reader(path)), pixels):
                    raise SystemExit(f"{reader.__module__}.read_image does not return the pixels of {description}")
            seconds = time_interleaved({"old": lambda: old.read_image(path), "new": lambda: read_image(path)},
                                       args.runs)
            old_s, new_s = statistics.median(seconds["old"]), statistics.median(seconds["new"])
            rows.append(f"| {description} | {old_s:.3f} ({min(seconds['old']):.3f}-{max(seconds['old']):.3f}) | "
                        f"{new_s * 1e3:.1f} ({min(seconds['new']) * 1e3:.1f}-{max(seconds['new']) * 1e3:.1f}) | "
                        f"{old_s / new_s:.1f}x |")

    head = git("rev-parse", "--short", "HEAD").strip()
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no").strip() else ""
    print(f"CPU: {cpu_model()} (torch threads {torch.get_num_threads()}, OpenCV {cv2.__version__}); "
          f"date {datetime.now(timezone.utc):%Y-%m-%d}; commit {head}{dirty}; "
          f"command: python dev/compare_png16_reader.py --runs {args.runs} --size {args.size} "
          f"--threads {args.threads}")
    print(f"Both readers returned exactly the written pixels of every file. Median of {args.runs} interleaved "
          "calls each (min-max in brackets):\n")
    print(f"| {width}x{height} 16-bit RGB PNG | hand-written decoder ({commit}), s | read_image (OpenCV), ms | "
          "speed-up |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
