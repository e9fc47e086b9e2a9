"""Image files <-> float tensors, and atomic file writes.

``read_image`` turns an image file (PNG, JPEG, TIFF, BMP, WebP, ...) into an RGB float tensor
in [0, 1] plus what is needed to write the result back faithfully:

- grayscale images are replicated to three channels (the model is RGB) and written back as
  grayscale (ITU-R BT.601 luma of the restored RGB);
- an alpha channel is split off, never restored, and written back unchanged;
- 16-bit PNGs and TIFFs keep their 16 bits (OpenCV and tifffile decode them; Pillow would
  reduce colour ones to 8 bits; ``encode_png16`` writes them); float TIFFs with values in [0, 1] are read as such (a warning
  says so once) and written back as 16-bit PNGs; TIFFs of other sample types are refused;
- the ICC colour profile and the EXIF block are kept and written into the output PNG (for a
  file converted from CMYK, LAB or YCbCr to RGB the profile no longer applies: it is dropped
  with a warning);
- animated or multi-page files are refused (restore their frames as separate files).

Every reader checks the declared size against a pixel limit (``MAX_PIXELS``, or the
``max_pixels`` argument) from the file header, before anything is decoded.

Every file this package writes goes through ``atomic_write_bytes``: the bytes land in a
temporary file next to the target, then ``os.replace`` swaps it in, so a crash never leaves a
half-written image or checkpoint behind.
"""
from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
import zlib
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Pixel limit of every reader: Pillow's own decompression-bomb threshold, about 1 GiB as a
# float32 RGB tensor (e.g. 9459 x 9459).
MAX_PIXELS = 89_478_485
# ITU-R BT.601 luma weights: how an RGB result is turned back into a grayscale file.
_LUMA = (0.299, 0.587, 0.114)


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


class ImageWarning(UserWarning):
    """Something of an image file that cannot be kept exactly (said once per kind)."""


_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, ImageWarning, stacklevel=3)


@dataclass
class LoadedImage:
    """An image as the model sees it, plus what is needed to write it back."""

    rgb: torch.Tensor            # (3, H, W) float32 in [0, 1]; grayscale replicated to 3 channels
    alpha: torch.Tensor | None   # (1, H, W) float32 in [0, 1], or None
    grayscale: bool              # the file had one colour channel
    bit_depth: int               # 8 or 16 bits per channel to write back
    exif: bytes | None = None    # kept so a photo's orientation tag survives restoration
    icc_profile: bytes | None = None  # the colour profile, written back unchanged

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[2])


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- headers
@dataclass
class _Header:
    width: int
    height: int
    frames: int
    kind: str                 # "png16", "tiff" (decoded by tifffile) or "pillow"
    icc_profile: bytes | None = None
    exif: bytes | None = None


def _header(stream: BinaryIO, path: Path, max_pixels: int | None) -> _Header:
    """What the file declares, from its header only (``stream`` is read from its start, as far
    as the header goes); ImageReadError when it is above the limit."""
    start = stream.read(32)
    stream.seek(0)
    if start[:4] in _TIFF_SIGNATURES:
        header = _tiff_header(stream, path)
    else:
        try:
            with Image.open(stream) as image:   # reads the header, decodes nothing
                width, height = image.size
                png16 = image.format == "PNG" and start[24:25] == b"\x10"
                header = _Header(width, height, getattr(image, "n_frames", 1), "png16" if png16 else "pillow",
                                 image.info.get("icc_profile"), image.info.get("exif"))
        except Image.DecompressionBombError as exc:
            raise ImageReadError(f"{path}: above the pixel limit ({exc})") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    pixels = header.width * header.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(f"{path}: {header.width}x{header.height} is {pixels:,} pixels, above the pixel limit "
                             f"of {max_pixels:,}")
    if header.frames > 1:
        raise ImageReadError(f"{path}: an animated or multi-page image ({header.frames} frames); restore its "
                             "frames as separate files")
    return header


def _tiff_header(stream: BinaryIO, path: Path) -> _Header:
    import tifffile

    try:
        with tifffile.TiffFile(stream) as tif:
            page = tif.pages[0]
            frames = len(tif.pages)
            width, height = int(page.imagewidth), int(page.imagelength)
            eight_bit = page.dtype == np.uint8
            icc = page.tags.get(34675)   # InterColorProfile
            icc = bytes(icc.value) if icc is not None else None
    except Exception as exc:   # tifffile raises many types for damaged files
        raise ImageReadError(f"{path}: not a readable TIFF ({str(exc)[:200] or type(exc).__name__})") from None
    # 8-bit TIFFs go through Pillow (palette, CMYK, YCbCr and EXIF handled there)
    return _Header(width, height, frames, "pillow" if eight_bit else "tiff", icc)


# --------------------------------------------------------------------------- decoding
def _array_from_pillow(image: Image.Image) -> tuple[np.ndarray, int, bool]:
    """(H, W, C) array, its bit depth, and whether the colours were converted to RGB from
    another colour space. C in {1 (gray), 2 (gray+alpha), 3, 4}."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.int64)
        return np.clip(array, 0, 65535).astype(np.uint16)[..., None], 16, False
    converted = False
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "F"):
        image = image.convert("L")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")   # CMYK, YCbCr, LAB, HSV
        converted = True
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    return array, 8, converted


def _decode_png16(data: bytes, path: Path) -> np.ndarray:
    """(H, W, C) uint16 in the file's channel order (RGB, RGBA, gray or gray+alpha)."""
    import cv2

    colour_type = data[25]
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16:
        raise ImageReadError(f"{path}: corrupted or truncated 16-bit PNG")
    if array.ndim == 2:
        return array[..., None]
    if colour_type == 4:                 # OpenCV expands gray + alpha to BGRA
        return array[..., [0, 3]]
    return array[..., [2, 1, 0, 3][:array.shape[2]]]   # BGR(A) -> RGB(A)


def _decode_tiff(data: bytes, path: Path) -> tuple[np.ndarray, int]:
    """(H, W, C) array of a TIFF that is not 8-bit, and the bit depth to write back."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            photometric = page.photometric.name if page.photometric is not None else "?"
            axes = page.axes
            array = page.asarray()
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable TIFF ({str(exc)[:200] or type(exc).__name__})") from None
    if photometric not in ("MINISBLACK", "RGB"):
        raise ImageReadError(f"{path}: {array.dtype} TIFF in {photometric} colours is not supported; "
                             "save it as RGB or grayscale")
    if axes == "SYX":
        array = np.moveaxis(array, 0, -1)
    elif axes == "YX":
        array = array[..., None]
    elif axes != "YXS":
        raise ImageReadError(f"{path}: TIFF with axes {axes} is not supported (expected one image plane)")
    if array.shape[-1] not in (1, 2, 3, 4):
        raise ImageReadError(f"{path}: TIFF with {array.shape[-1]} samples per pixel is not supported")
    if array.dtype == np.uint16:
        return array, 16
    if array.dtype.kind == "f":
        low, high = (float(array.min()), float(array.max())) if np.isfinite(array).all() else (np.nan, np.nan)
        if not (0.0 <= low and high <= 1.0):
            raise ImageReadError(f"{path}: float TIFF with values in [{low:.4g}, {high:.4g}]: the intensity scale "
                                 "is unknown; convert it to [0, 1], or to 8 or 16 bits")
        _warn_once("float-tiff", f"{path}: float TIFF read as intensities in [0, 1] and written back as a "
                                 "16-bit PNG (nearest 16-bit values)")
        return np.round(array.astype(np.float64) * 65535.0).astype(np.uint16), 16
    if array.dtype == bool:
        return array.astype(np.uint8) * 255, 8
    raise ImageReadError(f"{path}: {array.dtype} TIFF: the intensity scale is unknown; convert it to 8 or "
                         "16 bits per sample")


# --------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> LoadedImage:
    """Read an image file; raises ImageReadError naming the file when it cannot (or when it
    declares more than ``max_pixels`` pixels; None: no limit)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = _header(io.BytesIO(data), path, max_pixels)
    icc, exif = header.icc_profile, header.exif
    if header.kind == "png16":
        array, bit_depth = _decode_png16(data, path), 16
    elif header.kind == "tiff":
        array, bit_depth = _decode_tiff(data, path)
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                array, bit_depth, converted = _array_from_pillow(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageReadError(f"{path}: not a readable image ({exc})") from None
        if converted and icc is not None:
            _warn_once("icc-converted", f"{path}: colours converted to RGB; the file's colour profile "
                                        "describes the old colour space and is not written back")
            icc = None
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    values = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) / scale).permute(2, 0, 1)
    channels = values.shape[0]
    colour = values[:3] if channels >= 3 else values[:1].expand(3, -1, -1)
    alpha = values[-1:].clone() if channels in (2, 4) else None
    return LoadedImage(colour.contiguous(), alpha, grayscale=channels <= 2, bit_depth=bit_depth, exif=exif,
                       icc_profile=icc)


def image_size(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file header only; raises ImageReadError naming the file (also
    for a file above the pixel limit, or an animated one)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            header = _header(stream, path, max_pixels)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return header.height, header.width


# --------------------------------------------------------------------------- writing
def to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) BT.601 luma."""
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(0, keepdim=True)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png16(pixels: np.ndarray, icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """A 16-bit PNG of an (H, W, C) uint16 array (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA),
    with the colour profile and EXIF block as iCCP and eXIf chunks. Rows are stored unfiltered
    (zlib alone): neither Pillow (16-bit colour) nor OpenCV (gray + alpha, metadata) can write
    every such file."""
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"encode_png16: expected an (H, W, C) array with C in 1..4, got {pixels.shape}")
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))]
    if icc_profile:
        chunks.append(_png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        chunks.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    chunks += [_png_chunk(b"IDAT", zlib.compress(raw, 6)), _png_chunk(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(chunks)


def _planes(rgb: torch.Tensor, alpha: torch.Tensor | None, grayscale: bool) -> np.ndarray:
    """(H, W, C) float array in [0, 1]: luma or RGB, then alpha."""
    if rgb.dim() != 3 or rgb.shape[0] != 3:
        raise ValueError(f"encode_image: expected a (3, H, W) tensor, got {tuple(rgb.shape)}")
    planes = [to_luma(rgb) if grayscale else rgb]
    if alpha is not None:
        planes.append(alpha.to(rgb.dtype))
    return torch.cat(planes).detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


IMAGE_FORMATS = ("png", "tiff", "jpeg")


def encode_image(rgb: torch.Tensor, alpha: torch.Tensor | None = None, grayscale: bool = False,
                 bit_depth: int = 8, exif: bytes | None = None, icc_profile: bytes | None = None,
                 format: str = "png") -> bytes:
    """The bytes of a (3, H, W) [0, 1] image (values outside are clamped) as a PNG or TIFF of 8 or
    16 bits per channel, or a JPEG (8 bits, quality 95), with its colour profile and EXIF block."""
    if format not in IMAGE_FORMATS:
        raise ValueError(f"encode_image: format must be one of {', '.join(IMAGE_FORMATS)}, got {format!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"encode_image: bit_depth must be 8 or 16, got {bit_depth}")
    values = _planes(rgb, alpha, grayscale)
    if format == "jpeg":
        values = values[..., :-1] if alpha is not None else values  # JPEG has no alpha
        bit_depth = 8
    if format == "tiff":
        import tifffile

        dtype, scale = (np.uint16, 65535.0) if bit_depth == 16 else (np.uint8, 255.0)
        array = np.round(values * scale).astype(dtype)
        buffer = io.BytesIO()
        colour = "minisblack" if array.shape[2] <= 2 else "rgb"
        tifffile.imwrite(buffer, array[..., 0] if array.shape[2] == 1 else array, photometric=colour,
                         extrasamples=["unassalpha"] if alpha is not None else None,
                         compression="zlib", iccprofile=icc_profile or None)
        return buffer.getvalue()
    if bit_depth == 16:
        return encode_png16(np.round(values * 65535.0).astype(np.uint16), icc_profile, exif)
    array = np.round(values * 255.0).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    buffer = io.BytesIO()
    metadata = {**({"exif": exif} if exif else {}), **({"icc_profile": icc_profile} if icc_profile else {})}
    if format == "jpeg":
        metadata["quality"] = 95
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(
        buffer, format="JPEG" if format == "jpeg" else "PNG", **metadata)
    return buffer.getvalue()


def write_image(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
                grayscale: bool = False, bit_depth: int = 8, exif: bytes | None = None,
                icc_profile: bytes | None = None, format: str = "png") -> None:
    """Atomically write a (3, H, W) [0, 1] tensor as ``format`` (see encode_image)."""
    atomic_write_bytes(path, encode_image(rgb, alpha, grayscale, bit_depth, exif, icc_profile, format))


def write_png(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
              grayscale: bool = False, bit_depth: int = 8, exif: bytes | None = None,
              icc_profile: bytes | None = None) -> None:
    """Atomically write a (3, H, W) [0, 1] tensor as a PNG (8 or 16 bits per channel)."""
    write_image(path, rgb, alpha, grayscale, bit_depth, exif, icc_profile, "png")


def tensor_from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 array -> (3, H, W) float32 in [0, 1] (gray replicated, alpha dropped)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    values = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    values = values[..., None] if values.dim() == 2 else values
    values = values.permute(2, 0, 1)
    return (values[:3] if values.shape[0] >= 3 else values[:1].expand(3, -1, -1)).contiguous()
