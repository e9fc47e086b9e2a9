"""PSNR and SSIM for restoration results (torch, batched, per image).

Conventions (those of the PromptIR / all-in-one evaluation code):

- images are float tensors (B, C, H, W) in [0, 1] (``data_range`` = 1); callers clamp model
  outputs to [0, 1] first; values are not quantised to 8 bits;
- ``y_channel=False`` (default): computed on all RGB channels (SSIM is the mean over channels);
  ``y_channel=True``: on the BT.601 luma Y of MATLAB's ``rgb2ycbcr`` (16-235 range scaled to [0, 1]);
- SSIM uses the Gaussian window of Wang et al. 2004 (11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03)
  over the "valid" region (no padding); this equals ``skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.
Both functions return one value per image, shape (B,), in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) Y of MATLAB rgb2ycbcr, in [0, 1]."""
    weights = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * weights).sum(1, keepdim=True) + 16.0) / 255.0


def _prepare(x: torch.Tensor, y: torch.Tensor, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"metrics: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    x, y = x.detach().double(), y.detach().double()
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; +inf for identical images."""
    x, y = _prepare(x, y, y_channel)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-coords**2 / (2 * sigma**2))
    return window / window.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, y_channel: bool = False,
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (mean over the valid region and the channels)."""
    x, y = _prepare(x, y, y_channel)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window_size}-pixel window")
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, x.dtype, x.device)
    # A separable Gaussian: filter rows, then columns, each channel on its own (groups).
    rows = window.view(1, 1, 1, -1).expand(channels, 1, 1, window_size)
    cols = window.view(1, 1, -1, 1).expand(channels, 1, window_size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
