"""Image readers: the pixel limit before decoding, and formats kept or refused, never changed silently."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms

import sipl_fast.images as images
from sipl_fast.images import PNG_SIGNATURE, ImageReadError, encode_png16, image_size, read_image, write_png


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(images, "_warned", set(), raising=False)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16_claiming(width: int, height: int) -> bytes:
    """A small 16-bit RGB PNG whose header declares width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Every decoder raises: a reader that trips one decoded before checking the size."""
    import cv2

    def refuse(*args, **kwargs):
        raise AssertionError("decoded before the pixel limit was checked")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)


def test_a_16bit_png_declaring_400_million_pixels_is_refused_from_its_header(tmp_path, no_decoding):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png16_claiming(20000, 20000))
    for reader in (read_image, image_size):
        with pytest.raises(ImageReadError, match="above the pixel limit"):
            reader(path)


def _files(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    files = {name: tmp_path / name for name in ("eight.png", "photo.jpg", "deep.png", "deep.tif", "eight.tif")}
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(files["eight.png"])
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(files["photo.jpg"])
    files["deep.png"].write_bytes(encode_png16(rng.integers(0, 65536, (16, 20, 3), dtype=np.uint16)))
    tifffile.imwrite(files["deep.tif"], rng.integers(0, 65536, (16, 20, 3), dtype=np.uint16), photometric="rgb")
    tifffile.imwrite(files["eight.tif"], rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), photometric="rgb")
    return files


def test_every_reader_checks_the_pixel_limit_before_decoding(tmp_path, monkeypatch):
    files = _files(tmp_path)
    for path in files.values():   # within the limit: read as usual
        assert read_image(path, max_pixels=320).size == (16, 20)
    import cv2

    def refuse(*args, **kwargs):
        raise AssertionError("decoded before the pixel limit was checked")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    for path in files.values():
        for reader in (read_image, image_size):
            with pytest.raises(ImageReadError, match="20x16 is 320 pixels, above the pixel limit of 319"):
                reader(path, max_pixels=319)


def test_16bit_rgb_tiff_keeps_its_16_bits(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", pixels, photometric="rgb")
    image = read_image(tmp_path / "deep.tif")
    assert image.bit_depth == 16 and not image.grayscale
    assert np.array_equal(np.round(image.rgb.permute(1, 2, 0).numpy() * 65535).astype(np.uint16), pixels)
    planar = np.ascontiguousarray(np.moveaxis(pixels, -1, 0))
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert torch.equal(read_image(tmp_path / "planar.tif").rgb, image.rgb)


def test_float_tiff_in_unit_range_is_read_with_one_warning(tmp_path):
    values = np.random.default_rng(2).random((9, 11, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", values, photometric="rgb")
    tifffile.imwrite(tmp_path / "b.tif", values[..., 0])
    with pytest.warns(images.ImageWarning, match="float TIFF read as intensities in \\[0, 1\\]"):
        image = read_image(tmp_path / "a.tif")
    assert image.bit_depth == 16
    assert torch.allclose(image.rgb.permute(1, 2, 0), torch.from_numpy(values), atol=1 / 65535)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # said once, not per file
        gray = read_image(tmp_path / "b.tif")
    assert gray.grayscale and torch.allclose(gray.rgb[0], torch.from_numpy(values[..., 0]), atol=1 / 65535)


@pytest.mark.parametrize("array, message", [(np.full((8, 8), 300.0, np.float32), "intensity scale is unknown"),
                                            (np.full((8, 8), np.nan, np.float32), "intensity scale is unknown"),
                                            (np.full((8, 8), 7, np.int32), "int32 TIFF: the intensity scale")])
def test_tiffs_without_a_known_scale_are_refused(tmp_path, array, message):
    tifffile.imwrite(tmp_path / "x.tif", array)
    with pytest.raises(ImageReadError, match=message):
        read_image(tmp_path / "x.tif")


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_icc_profiles_are_kept(tmp_path, bit_depth):
    profile = _srgb_profile()
    rng = np.random.default_rng(3)
    if bit_depth == 8:
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "in.png",
                                                                               icc_profile=profile)
    else:
        (tmp_path / "in.png").write_bytes(encode_png16(rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16),
                                                       icc_profile=profile))
    image = read_image(tmp_path / "in.png")
    assert image.icc_profile == profile and image.bit_depth == bit_depth
    write_png(tmp_path / "out.png", image.rgb, image.alpha, image.grayscale, image.bit_depth, image.exif,
              image.icc_profile)
    with Image.open(tmp_path / "out.png") as written:
        assert written.info.get("icc_profile") == profile
    again = read_image(tmp_path / "out.png")
    assert again.bit_depth == bit_depth and torch.equal(again.rgb, image.rgb)


def test_icc_profile_of_a_16bit_tiff_is_kept(tmp_path):
    profile = _srgb_profile()
    pixels = np.random.default_rng(4).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", pixels, photometric="rgb", iccprofile=profile)
    assert read_image(tmp_path / "in.tif").icc_profile == profile


def test_animated_images_are_refused(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for reader in (read_image, image_size):
        with pytest.raises(ImageReadError, match="animated or multi-page image \\(3 frames\\)"):
            reader(tmp_path / "anim.gif")
    frames[0].save(tmp_path / "still.gif")
    assert read_image(tmp_path / "still.gif").size == (16, 16)
