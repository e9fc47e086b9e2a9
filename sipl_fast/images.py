"""Image files <-> float tensors, and atomic file writes.

``read_image`` turns any file Pillow can open (PNG, JPEG, TIFF, ...) into an RGB float tensor
in [0, 1] plus what is needed to write the result back faithfully:

- grayscale images are replicated to three channels (the model is RGB) and written back as
  grayscale (ITU-R BT.601 luma of the restored RGB);
- an alpha channel is split off, never restored, and written back unchanged;
- 16-bit PNGs keep their 16 bits. Pillow reads 16-bit *colour* PNGs as 8-bit, so this module
  decodes and encodes 16-bit PNGs itself (zlib + the five PNG row filters, vectorised numpy).

Every file this package writes goes through ``atomic_write_bytes``: the bytes land in a
temporary file next to the target, then ``os.replace`` swaps it in, so a crash never leaves a
half-written image or checkpoint behind.
"""
from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> number of channels (16-bit PNGs cannot be palette images).
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
# ITU-R BT.601 luma weights: how an RGB result is turned back into a grayscale file.
_LUMA = (0.299, 0.587, 0.114)


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


@dataclass
class LoadedImage:
    """An image as the model sees it, plus what is needed to write it back."""

    rgb: torch.Tensor            # (3, H, W) float32 in [0, 1]; grayscale replicated to 3 channels
    alpha: torch.Tensor | None   # (1, H, W) float32 in [0, 1], or None
    grayscale: bool              # the file had one colour channel
    bit_depth: int               # 8 or 16 bits per channel in the file
    exif: bytes | None = None    # kept so a photo's orientation tag survives restoration

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


# --------------------------------------------------------------------------- 16-bit PNG
def _png_chunks(data: bytes, path: Path):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ImageReadError(f"{path}: truncated PNG chunk {kind!r}")
        yield kind, body
        pos += 12 + length
        if kind == b"IEND":
            return
    raise ImageReadError(f"{path}: PNG ends before its IEND chunk (truncated file)")


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_png_rows(filtered: np.ndarray, filter_types: np.ndarray) -> np.ndarray:
    """Undo the PNG row filters. filtered: (H, W, bytes_per_pixel) uint8.

    A byte depends on its left, upper and upper-left neighbours, so all pixels on one
    anti-diagonal (y + x = d) are independent: the loop runs over the H + W - 1 diagonals
    with numpy doing each diagonal at once, instead of a Python loop over every pixel.
    """
    height, width, _ = filtered.shape
    # One zero row on top and one zero column on the left: PNG's "outside the image" bytes.
    recon = np.zeros((height + 1, width + 1, filtered.shape[2]), dtype=np.int32)
    data = filtered.astype(np.int32)
    for d in range(height + width - 1):
        ys = np.arange(max(0, d - width + 1), min(height, d + 1))
        xs = d - ys
        a = recon[ys + 1, xs]        # left
        b = recon[ys, xs + 1]        # up
        c = recon[ys, xs]            # up-left
        kind = filter_types[ys][:, None]
        predicted = np.select(
            [kind == 0, kind == 1, kind == 2, kind == 3],
            [np.zeros_like(a), a, b, (a + b) // 2],
            _paeth(a, b, c),
        )
        recon[ys + 1, xs + 1] = (data[ys, xs] + predicted) & 0xFF
    return recon[1:, 1:].astype(np.uint8)


def decode_png16(data: bytes, path: Path) -> np.ndarray:
    """Decode a non-interlaced 16-bit PNG into an (H, W, C) uint16 array."""
    header = None
    idat = []
    for kind, body in _png_chunks(data, path):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    if header is None:
        raise ImageReadError(f"{path}: PNG without an IHDR chunk")
    width, height, bit_depth, colour_type, _, _, interlace = header
    if bit_depth != 16 or colour_type not in _PNG_CHANNELS:
        raise ImageReadError(f"{path}: not a 16-bit grayscale/RGB(A) PNG "
                             f"(bit depth {bit_depth}, colour type {colour_type})")
    if interlace:
        raise ImageReadError(f"{path}: interlaced (Adam7) 16-bit PNGs are not supported; re-save without interlacing")
    channels = _PNG_CHANNELS[colour_type]
    row_bytes = 1 + width * channels * 2
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageReadError(f"{path}: corrupted PNG image data ({exc})") from None
    if len(raw) < row_bytes * height:
        raise ImageReadError(f"{path}: PNG image data is truncated")
    rows = np.frombuffer(raw, dtype=np.uint8, count=row_bytes * height).reshape(height, row_bytes)
    filter_types = rows[:, 0]
    if (filter_types > 4).any():
        raise ImageReadError(f"{path}: corrupted PNG (unknown row filter)")
    pixels = _unfilter_png_rows(rows[:, 1:].reshape(height, width, channels * 2), filter_types)
    return pixels.reshape(height, width * channels * 2).view(">u2").reshape(height, width, channels).astype(np.uint16)


def encode_png16(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, C) uint16 array (C = 1, 2, 3 or 4) as a 16-bit PNG (rows unfiltered)."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] != PNG_SIGNATURE or len(data) < 25 or data[12:16] != b"IHDR":
        return None
    return data[24]


# --------------------------------------------------------------------------- reading
def _array_from_pillow(image: Image.Image) -> tuple[np.ndarray, int]:
    """(H, W, C) array and its bit depth, C in {1 (gray), 2 (gray+alpha), 3, 4}."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.int64)
        return np.clip(array, 0, 65535).astype(np.uint16)[..., None], 16
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "F"):
        image = image.convert("L")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")   # CMYK, YCbCr, LAB, HSV
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    return array, 8


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file; raises ImageReadError naming the file when it cannot."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    exif = None
    if _png_bit_depth(data) == 16:
        array, bit_depth = decode_png16(data, path), 16
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                exif = image.info.get("exif")
                array, bit_depth = _array_from_pillow(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    scale = 65535.0 if bit_depth == 16 else 255.0
    values = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) / scale).permute(2, 0, 1)
    channels = values.shape[0]
    colour = values[:3] if channels >= 3 else values[:1].expand(3, -1, -1)
    alpha = values[-1:].clone() if channels in (2, 4) else None
    return LoadedImage(colour.contiguous(), alpha, grayscale=channels <= 2, bit_depth=bit_depth, exif=exif)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header only; raises ImageReadError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    return height, width


# --------------------------------------------------------------------------- writing
def to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) BT.601 luma."""
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(0, keepdim=True)


def encode_image(rgb: torch.Tensor, alpha: torch.Tensor | None = None, grayscale: bool = False,
                 bit_depth: int = 8, exif: bytes | None = None) -> bytes:
    """PNG bytes of a (3, H, W) [0, 1] image (values outside are clamped)."""
    if rgb.dim() != 3 or rgb.shape[0] != 3:
        raise ValueError(f"encode_image: expected a (3, H, W) tensor, got {tuple(rgb.shape)}")
    planes = [to_luma(rgb) if grayscale else rgb]
    if alpha is not None:
        planes.append(alpha.to(rgb.dtype))
    values = torch.cat(planes).detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if bit_depth == 16:
        return encode_png16(np.round(values * 65535.0).astype(np.uint16))
    array = np.round(values * 255.0).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(
        buffer, format="PNG", **({"exif": exif} if exif else {}))
    return buffer.getvalue()


def write_png(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
              grayscale: bool = False, bit_depth: int = 8, exif: bytes | None = None) -> None:
    """Atomically write a (3, H, W) [0, 1] tensor as a PNG (8 or 16 bits per channel)."""
    atomic_write_bytes(path, encode_image(rgb, alpha, grayscale, bit_depth, exif))


def tensor_from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 array -> (3, H, W) float32 in [0, 1] (gray replicated, alpha dropped)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    values = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    values = values[..., None] if values.dim() == 2 else values
    values = values.permute(2, 0, 1)
    return (values[:3] if values.shape[0] >= 3 else values[:1].expand(3, -1, -1)).contiguous()
