"""Image files at 1920x1080: read_image of a 16-bit PNG, a 16-bit TIFF and an 8-bit PNG, and
write_image of the 16-bit PNG, with pytest-benchmark.

    pytest bench/test_image_io.py --benchmark-only        # timed, on the CPU
    pytest bench/test_image_io.py --benchmark-disable     # each case called once (the smoke run)

The image is a seeded smooth random RGB field (one ``sipl_fast.data.degradations.synthetic_depth``
field per channel), written into pytest's temporary folder by ``write_image`` (16-bit PNG rows
unfiltered and zlib-compressed, TIFF zlib-compressed, 8-bit PNG through Pillow). A read case is
the whole ``read_image`` call: file bytes to the (3, H, W) float32 tensor. The write case encodes
the tensor and replaces the file atomically. "ms" is the rounds' median (bench/measure.py).

The hand-written 16-bit PNG decoder of earlier releases is timed against ``read_image`` by
``python dev/compare_png16_reader.py`` (docs/performance.md, "Image reading").
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sipl_fast.data.degradations import synthetic_depth
from sipl_fast.images import read_image, write_image

from measure import record_op

HEIGHT, WIDTH = 1080, 1920
CPU = torch.device("cpu")
# kind -> (description, bit depth, write_image format, file name)
FILES = {"png16": ("16-bit PNG", 16, "png", "image16.png"),
         "tiff16": ("16-bit TIFF", 16, "tiff", "image16.tif"),
         "png8": ("8-bit PNG", 8, "png", "image8.png")}


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: a smooth random field per channel, spanning [0, 1]."""
    return synthetic_depth(3, height, width, torch.Generator().manual_seed(seed))[:, 0].contiguous()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return smooth_image(HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def files(image, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("image_io")
    paths = {}
    for kind, (_, bit_depth, format, name) in FILES.items():
        paths[kind] = folder / name
        write_image(paths[kind], image, bit_depth=bit_depth, format=format)
    return paths


def _info(kind: str, mode: str, impl: str) -> dict:
    description, bit_depth = FILES[kind][:2]
    return dict(table="image_io", case=f"{WIDTH}x{HEIGHT} {description}", dtype=f"uint{bit_depth}", mode=mode,
                impl=impl, baseline=impl)


@pytest.mark.parametrize("kind", list(FILES))
def test_read_image(benchmark, files, image, kind):
    benchmark.group = f"image io {WIDTH}x{HEIGHT}"
    loaded = record_op(benchmark, lambda: read_image(files[kind]), CPU, rounds=10, **_info(kind, "read", "read_image"))
    bit_depth = FILES[kind][1]
    assert loaded.bit_depth == bit_depth and loaded.alpha is None and not loaded.grayscale
    # every value is the source's nearest level of the file's bit depth (float32 products: 1 % slack)
    levels = 2 ** bit_depth - 1
    assert (loaded.rgb.double() - image.double()).abs().max() * levels <= 0.51


def test_write_image_png16(benchmark, image, tmp_path):
    import cv2

    benchmark.group = f"image io {WIDTH}x{HEIGHT}"
    path = tmp_path / "written16.png"
    record_op(benchmark, lambda: write_image(path, image, bit_depth=16), CPU, rounds=5,
              **_info("png16", "write", "write_image"))
    written = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]   # OpenCV decodes BGR
    source = image.permute(1, 2, 0).numpy().astype(np.float64) * 65535
    assert written.dtype == np.uint16 and np.abs(written - source).max() <= 0.51   # the nearest levels
