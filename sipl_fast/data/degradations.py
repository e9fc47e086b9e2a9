"""Synthetic degradations for all-in-one restoration training (our own models, documented).

Every degradation takes a clean batch ``x`` (B, 3, H, W) float in [0, 1] and a CPU
``torch.Generator`` and returns a degraded batch of the same shape, clamped to [0, 1].
All random numbers are drawn from that generator, in a fixed order, on the CPU, so a seed
gives the same image on every machine and device. Parameters are drawn per image
(shape (B, 1, 1, 1)), and the pixel work is batched torch ops (JPEG alone goes through Pillow).

Single degradations (name: model):

- ``noise15`` / ``noise25`` / ``noise50``: additive white Gaussian noise, sigma in 0-255 units
  (the BSD68/CBSD68 denoising protocol).
- ``rain``: rain streaks. Sparse random seeds are smeared by a per-image line kernel
  (length 8-24 px, angle -25..25 degrees from vertical, 1.0-1.6 px wide), slightly blurred and
  screen-blended over the image (Rain100L-like light rain).
- ``haze``: atmospheric scattering I = J t + A (1 - t), t = exp(-beta d). The depth d is
  synthetic: a vertical ramp (the top of a photo tends to be far away) plus a smooth random
  field (a 4x4 random grid upsampled bicubically), normalised to [0, 1]; beta in [0.8, 2.0],
  airlight A in [0.75, 1.0] with a small per-channel tint.
- ``blur``: motion blur, a normalised line kernel of length 5-15 px at a random angle.
- ``gaussian_blur``: isotropic Gaussian blur, sigma in [1, 3] px.
- ``lowlight``: darkening plus sensor noise: J' = s J^gamma with gamma in [1.8, 3.0] and
  s in [0.35, 0.7], then Poisson-Gaussian-like noise with std sqrt(a J' + b^2),
  a in [0.001, 0.004], b in [0.002, 0.01].
- ``snow``: snow flakes: sparse seeds of random brightness smeared by a short, slightly
  slanted kernel and a 1-3 px blur (flakes of several sizes), screen-blended, plus a faint
  white veil.
- ``jpeg``: JPEG compression artefacts, quality 10-40 (Pillow encoder).

Composites: any ``"+"``-joined list of the names above, e.g. ``"lowlight+haze+rain"``. They
are applied in the physical order of image formation (scene -> haze -> rain/snow -> blur ->
low light -> sensor noise -> compression), whatever the order in the name.

Task sets (``TASK_SETS``): ``3task`` (noise15, noise25, noise50, rain, haze), ``5task``
(3task + blur + lowlight) and ``cdd11`` (the 11 CDD-11 types: lowlight, haze, rain, snow and
their 7 mixes).
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Degradation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# --------------------------------------------------------------------------- random draws
def _uniform(g: torch.Generator, batch: int, low: float, high: float) -> torch.Tensor:
    """(B, 1, 1, 1) values drawn uniformly in [low, high) on the CPU."""
    return low + (high - low) * torch.rand(batch, 1, 1, 1, generator=g)


def _to(x: torch.Tensor, *tensors: torch.Tensor):
    return [t.to(device=x.device, dtype=x.dtype) for t in tensors]


# --------------------------------------------------------------------------- kernels
def line_kernels(length: torch.Tensor, angle: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size) anti-aliased line segments centred in the kernel, peak value 1.

    length, angle (radians from the x axis) and width (pixels) are (B, 1, 1, 1). A pixel's
    value falls linearly from 1 on the segment to 0 at ``width`` pixels away from it.
    """
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = torch.cos(angle), torch.sin(angle)
    along = (xx * dx + yy * dy).clamp(-length / 2, length / 2)   # nearest point on the segment
    distance = torch.hypot(xx - along * dx, yy - along * dy)
    return (1 - distance / width).clamp(min=0)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size) normalised isotropic Gaussians for per-image sigma (B, 1, 1, 1)."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    kernel = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def filter_per_image(x: torch.Tensor, kernels: torch.Tensor, padding_mode: str = "reflect") -> torch.Tensor:
    """Convolve every channel of image b with kernels[b] (one grouped conv for the batch)."""
    batch, channels, height, width = x.shape
    size = kernels.shape[-1]
    pad = size // 2
    # Reflect padding needs pad < the image side; fall back to replicate on tiny images.
    mode = padding_mode if pad < min(height, width) else "replicate"
    padded = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode=mode)
    weight = kernels.to(x).repeat_interleave(channels, dim=0)
    return F.conv2d(padded, weight, groups=batch * channels).reshape(batch, channels, height, width)


def _screen(x: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """Screen blend: light streaks/flakes brighten the image without clipping abruptly."""
    return 1 - (1 - x) * (1 - layer.clamp(0, 1))


# --------------------------------------------------------------------------- degradations
def gaussian_noise(sigma: float) -> Degradation:
    """Additive white Gaussian noise with std ``sigma`` / 255."""
    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=g).to(x)
        return (x + noise * (sigma / 255.0)).clamp(0, 1)
    apply.__name__ = f"noise{sigma:g}"
    return apply


def _streak_layer(x: torch.Tensor, g: torch.Generator, density: tuple[float, float],
                  length: tuple[float, float], tilt_deg: float, width: tuple[float, float],
                  brightness: tuple[float, float], blur_sigma: tuple[float, float], size: int) -> torch.Tensor:
    """(B, 1, H, W) layer of line-smeared sparse seeds: the shared model of rain and snow."""
    batch, _, height, width_px = x.shape
    rate = _uniform(g, batch, *density)
    seeds = (torch.rand(batch, 1, height, width_px, generator=g) < rate).float()
    seeds = seeds * torch.rand(batch, 1, height, width_px, generator=g)       # each seed its own brightness
    tilt = _uniform(g, batch, -tilt_deg, tilt_deg) * (math.pi / 180)
    kernels = line_kernels(_uniform(g, batch, *length), math.pi / 2 + tilt, _uniform(g, batch, *width), size)
    gain = _uniform(g, batch, *brightness)
    soften = gaussian_kernels(_uniform(g, batch, *blur_sigma), 7)
    seeds, kernels, gain, soften = _to(x, seeds, kernels, gain, soften)
    layer = filter_per_image(seeds, kernels, padding_mode="constant")
    return filter_per_image(layer, soften, padding_mode="constant") * gain


def rain(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rain streaks (see the module docstring)."""
    layer = _streak_layer(x, g, density=(0.002, 0.006), length=(8, 24), tilt_deg=25, width=(1.0, 1.6),
                          brightness=(1.2, 2.0), blur_sigma=(0.4, 0.8), size=25)
    return _screen(x, layer).clamp(0, 1)


def snow(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Snow flakes and a faint white veil (see the module docstring)."""
    layer = _streak_layer(x, g, density=(0.002, 0.008), length=(1, 4), tilt_deg=40, width=(1.0, 2.0),
                          brightness=(3.0, 5.0), blur_sigma=(0.6, 1.5), size=9)
    veil = _to(x, _uniform(g, x.shape[0], 0.0, 0.12))[0]
    return _screen(x * (1 - veil) + veil, layer).clamp(0, 1)


def synthetic_depth(batch: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) smooth depth in [0, 1]: a vertical ramp (far at the top) plus a random field."""
    field = F.interpolate(torch.rand(batch, 1, 4, 4, generator=g), size=(height, width),
                          mode="bicubic", align_corners=True)
    ramp = torch.linspace(1, 0, height).view(1, 1, height, 1).expand(batch, 1, height, width)
    mix = _uniform(g, batch, 0.3, 0.7)
    depth = mix * ramp + (1 - mix) * field
    low = depth.amin(dim=(2, 3), keepdim=True)
    high = depth.amax(dim=(2, 3), keepdim=True)
    return (depth - low) / (high - low + 1e-6)


def haze(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Atmospheric scattering with a synthetic depth map (see the module docstring)."""
    batch, _, height, width = x.shape
    depth = synthetic_depth(batch, height, width, g)
    beta = _uniform(g, batch, 0.8, 2.0)
    airlight = _uniform(g, batch, 0.75, 1.0) + 0.03 * (2 * torch.rand(batch, 3, 1, 1, generator=g) - 1)
    transmission, airlight = _to(x, torch.exp(-beta * depth), airlight)
    return (x * transmission + airlight * (1 - transmission)).clamp(0, 1)


def motion_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Linear motion blur, length 5-15 px at a random angle."""
    batch = x.shape[0]
    kernels = line_kernels(_uniform(g, batch, 5, 15), _uniform(g, batch, 0, math.pi), torch.ones(batch, 1, 1, 1), 17)
    kernels = kernels / kernels.sum(dim=(-2, -1), keepdim=True)
    return filter_per_image(x, kernels).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Isotropic Gaussian blur, sigma 1-3 px."""
    return filter_per_image(x, gaussian_kernels(_uniform(g, x.shape[0], 1.0, 3.0), 19)).clamp(0, 1)


def low_light(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma darkening plus signal-dependent sensor noise (see the module docstring)."""
    batch = x.shape[0]
    gamma, scale = _uniform(g, batch, 1.8, 3.0), _uniform(g, batch, 0.35, 0.7)
    shot, read = _uniform(g, batch, 0.001, 0.004), _uniform(g, batch, 0.002, 0.01)
    noise = torch.randn(x.shape, generator=g)
    gamma, scale, shot, read, noise = _to(x, gamma, scale, shot, read, noise)
    dark = scale * x.clamp(min=0) ** gamma
    return (dark + noise * torch.sqrt(shot * dark + read**2)).clamp(0, 1)


def jpeg(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """JPEG compression at a quality of 10-40 (Pillow, one image at a time)."""
    qualities = torch.randint(10, 41, (x.shape[0],), generator=g).tolist()
    pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image, quality in zip(pixels, qualities):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x).div(255.0)


# --------------------------------------------------------------------------- registry
# Order of image formation: composites apply their parts in this order.
DEGRADATIONS: dict[str, Degradation] = {
    "haze": haze,
    "rain": rain,
    "snow": snow,
    "blur": motion_blur,
    "gaussian_blur": gaussian_blur,
    "lowlight": low_light,
    "noise15": gaussian_noise(15),
    "noise25": gaussian_noise(25),
    "noise50": gaussian_noise(50),
    "jpeg": jpeg,
}

_THREE_TASK = ("noise15", "noise25", "noise50", "rain", "haze")
TASK_SETS: dict[str, tuple[str, ...]] = {
    "3task": _THREE_TASK,
    "5task": _THREE_TASK + ("blur", "lowlight"),
    "cdd11": ("lowlight", "haze", "rain", "snow", "lowlight+haze", "lowlight+rain", "lowlight+snow",
              "haze+rain", "haze+snow", "lowlight+haze+rain", "lowlight+haze+snow"),
}


def task_parts(task: str) -> list[str]:
    """The single degradations of a task, in application order; ValueError for unknown names."""
    parts = task.split("+")
    unknown = [p for p in parts if p not in DEGRADATIONS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"unknown or repeated degradation in task {task!r}; "
                         f"known: {', '.join(DEGRADATIONS)} (join with '+' for composites)")
    order = list(DEGRADATIONS)
    return sorted(parts, key=order.index)


def resolve_tasks(spec: str) -> tuple[str, ...]:
    """A task-set name (``3task``, ``5task``, ``cdd11``) or a comma list of tasks -> task names."""
    if spec in TASK_SETS:
        return TASK_SETS[spec]
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not tasks:
        raise ValueError(f"no tasks in {spec!r}; use {', '.join(TASK_SETS)} or a comma list of degradations")
    for task in tasks:
        task_parts(task)
    return tasks


def degrade(x: torch.Tensor, task: str, g: torch.Generator) -> torch.Tensor:
    """Apply ``task`` (a single degradation or a '+' composite) to a (B, 3, H, W) batch in [0, 1]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"degrade: expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    for part in task_parts(task):
        x = DEGRADATIONS[part](x, g)
    return x
