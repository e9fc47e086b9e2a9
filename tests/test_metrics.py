"""PSNR and SSIM against scikit-image's implementations."""
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sipl_fast.metrics import psnr, rgb_to_y, ssim


def _pair(shape=(2, 3, 40, 52), noise=0.08, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = 0.1 + 0.8 * torch.rand(shape, generator=g, dtype=torch.float64)
    noisy = (clean + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return noisy, clean


def _skimage_ssim(x: np.ndarray, y: np.ndarray, channel_axis=0) -> float:
    return structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=channel_axis)


def test_psnr_matches_skimage():
    x, y = _pair()
    ours = psnr(x, y)
    assert ours.shape == (2,)
    for i in range(2):
        assert ours[i].item() == pytest.approx(peak_signal_noise_ratio(y[i].numpy(), x[i].numpy(), data_range=1.0),
                                               rel=1e-10)


@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_matches_skimage_gaussian_window(noise):
    x, y = _pair(noise=noise)
    ours = ssim(x, y)
    for i in range(2):
        assert ours[i].item() == pytest.approx(_skimage_ssim(x[i].numpy(), y[i].numpy()), abs=1e-9)


def test_y_channel_metrics():
    x, y = _pair(shape=(1, 3, 32, 32))
    xy, yy = rgb_to_y(x), rgb_to_y(y)
    assert xy.shape == (1, 1, 32, 32)
    # Pure white and black map to MATLAB's 235 and 16.
    assert rgb_to_y(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235 / 255)
    assert rgb_to_y(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(16 / 255)
    assert psnr(x, y, y_channel=True).item() == pytest.approx(psnr(xy, yy).item())
    assert ssim(x, y, y_channel=True).item() == pytest.approx(
        _skimage_ssim(xy[0, 0].numpy(), yy[0, 0].numpy(), channel_axis=None), abs=1e-9)


def test_identical_images():
    x, _ = _pair()
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_float32_inputs_are_measured_in_float64():
    x, y = _pair()
    assert torch.allclose(psnr(x.float(), y.float()), psnr(x, y), atol=1e-4)
    assert ssim(x.float(), y.float()).dtype == torch.float64


def test_bad_inputs():
    x, y = _pair()
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, y[:, :, :30])
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(x[..., :8, :8], y[..., :8, :8])
