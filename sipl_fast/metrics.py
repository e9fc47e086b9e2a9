"""PSNR and SSIM for restoration results (torch, batched, per image), and the two published
scoring protocols that ``sipl_fast.evaluation`` applies.

``psnr`` and ``ssim`` take float tensors (B, C, H, W) and return one float64 value per image,
shape (B,), computed in float64:

- ``data_range`` is the peak value (1 for images in [0, 1]); values are used as given (callers
  clamp or quantise first);
- ``crop_border`` pixels are removed from each side before anything is computed;
- ``y_channel=False``: all channels (SSIM is the mean over channels); ``y_channel=True``: the
  BT.601 luma of MATLAB's ``rgb2ycbcr`` (``rgb_to_y``: 16-235 on a 0-255 scale, here scaled to
  [0, 1]);
- ``ssim`` is Wang et al. 2004 with a Gaussian window (11 x 11, sigma 1.5, K1 = 0.01,
  K2 = 0.03, population variances) over the "valid" region (no padding), the mean of the map,
  then of the channels. This is BasicSR's ``calculate_ssim`` and equals
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)``.

The protocols, each on (B, 3, H, W) outputs and clean images, returning (psnr, ssim):

- ``promptir_scores``: PromptIR's ``compute_psnr_ssim`` (utils/val_utils.py of the official
  code): both images clipped to [0, 1] in float (not quantised), then scikit-image's
  ``peak_signal_noise_ratio(gt, out, data_range=1)`` and ``structural_similarity(gt, out,
  data_range=1, channel_axis=-1)`` with its defaults (7 x 7 uniform window, sample covariance)
  on (H, W, 3) float64 arrays. (The centre crop to multiples of 16 is the caller's.)
- ``basicsr_scores``: BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (basicsr/metrics/
  psnr_ssim.py) of the 8-bit images its ``tensor2img`` makes: both images quantised
  (``quantize_8bit``), ``crop_border`` pixels removed from each side, optionally the Y channel,
  PSNR with peak 255, and the Gaussian ``ssim`` above. Computed on levels / 255 with
  ``data_range=1``, which is the same arithmetic as BasicSR's on levels with peak 255 and
  C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2 (both PSNR and SSIM are invariant to that scaling).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) Y of MATLAB rgb2ycbcr, in [0, 1].

    Y * 255 = 16 + 65.481 R + 128.553 G + 24.966 B: BasicSR's ``to_y_channel`` (its
    ``bgr2ycbcr(y_only=True)`` of the BGR image, times 255)."""
    weights = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * weights).sum(1, keepdim=True) + 16.0) / 255.0


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit image BasicSR's ``tensor2img`` makes of a [0, 1] tensor, as levels / 255 in float64.

    Clamped to [0, 1], times 255 and rounded half to even, in float32 as ``tensor2img`` does
    (and as ``sipl_fast.images.write_image`` does for 8-bit files), so the levels are those of
    the saved PNG."""
    levels = x.detach().float().clamp(0, 1).mul(255.0).round()
    return levels.double() / 255.0


def _prepare(x: torch.Tensor, y: torch.Tensor, y_channel: bool, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"metrics: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"metrics: crop_border must be a non-negative int, got {crop_border!r}")
    if 2 * crop_border >= min(x.shape[-2:]):
        raise ValueError(f"metrics: crop_border={crop_border} leaves nothing of images of {tuple(x.shape[-2:])}")
    x, y = x.detach().double(), y.detach().double()
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, y_channel: bool = False,
         crop_border: int = 0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; +inf for identical images."""
    x, y = _prepare(x, y, y_channel, crop_border)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-coords**2 / (2 * sigma**2))
    return window / window.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, y_channel: bool = False,
         window_size: int = 11, sigma: float = 1.5, crop_border: int = 0) -> torch.Tensor:
    """Structural similarity per image (Gaussian window; mean over the valid region and the channels)."""
    x, y = _prepare(x, y, y_channel, crop_border)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window_size}-pixel window")
    window = _gaussian_window(window_size, sigma, x.dtype, x.device)
    # The five local means in one separable Gaussian blur: rows, then columns, each of the
    # stacked planes on its own (groups).
    stacked = torch.cat([x, y, x * x, y * y, x * y], 1)
    planes = stacked.shape[1]
    rows = window.view(1, 1, 1, -1).expand(planes, 1, 1, window_size)
    cols = window.view(1, 1, -1, 1).expand(planes, 1, window_size, 1)
    blurred = F.conv2d(F.conv2d(stacked, rows, groups=planes), cols, groups=planes)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = blurred.chunk(5, 1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov = mean_xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def basicsr_scores(output: torch.Tensor, gt: torch.Tensor, crop_border: int = 0,
                   y_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BasicSR's PSNR and SSIM per image of (B, 3, H, W) tensors in [0, 1] (see the module docstring)."""
    output, gt = quantize_8bit(output), quantize_8bit(gt)
    return (psnr(output, gt, y_channel=y_channel, crop_border=crop_border),
            ssim(output, gt, y_channel=y_channel, crop_border=crop_border))


def _hwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W, C) float64 array clipped to [0, 1]."""
    return np.clip(images.detach().double().permute(0, 2, 3, 1).cpu().numpy(), 0.0, 1.0)


def promptir_scores(output: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PromptIR's PSNR and SSIM per image of (B, 3, H, W) tensors (see the module docstring)."""
    if output.shape != gt.shape or output.dim() != 4:
        raise ValueError(f"metrics: expected two (B, C, H, W) tensors of one shape, got {tuple(output.shape)} "
                         f"and {tuple(gt.shape)}")
    if min(output.shape[-2:]) < 7:
        raise ValueError(f"promptir_scores: images of {tuple(output.shape[-2:])} are smaller than the 7-pixel window")
    restored, clean = _hwc(output), _hwc(gt)
    with np.errstate(divide="ignore"):   # identical images: +inf dB, as psnr()
        psnrs = [peak_signal_noise_ratio(c, r, data_range=1) for c, r in zip(clean, restored)]
    ssims = [structural_similarity(c, r, data_range=1, channel_axis=-1) for c, r in zip(clean, restored)]
    return torch.tensor(psnrs, dtype=torch.float64), torch.tensor(ssims, dtype=torch.float64)
