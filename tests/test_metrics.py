"""PSNR and SSIM against scikit-image's implementations and a transcription of BasicSR's."""
import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sipl_fast.metrics import basicsr_scores, promptir_scores, psnr, quantize_8bit, rgb_to_y, ssim


# --------------------------------------------------------------------------- BasicSR, transcribed
# basicsr/utils/img_util.py tensor2img, basicsr/metrics/metric_util.py to_y_channel,
# basicsr/utils/color_util.py bgr2ycbcr and basicsr/metrics/psnr_ssim.py calculate_psnr /
# calculate_ssim / _ssim, in numpy and OpenCV as BasicSR writes them.
def basicsr_tensor2img(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) RGB tensor -> (H, W, 3) uint8 BGR array."""
    array = image.float().detach().cpu().clamp_(0, 1).numpy().transpose(1, 2, 0)
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    return (array * 255.0).round().astype(np.uint8)


def _basicsr_to_y_channel(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32) / 255.
    y = np.dot(img, [24.966, 128.553, 65.481]) + 16.0   # bgr2ycbcr(y_only=True) of a float32 image
    y = (y / 255.).astype(np.float32)
    return y[..., None] * 255.


def _basicsr_crop(img: np.ndarray, crop_border: int, y_channel: bool) -> np.ndarray:
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
    if y_channel:
        img = _basicsr_to_y_channel(img)
    return img.astype(np.float64)


def basicsr_calculate_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool) -> float:
    img, img2 = _basicsr_crop(img, crop_border, y_channel), _basicsr_crop(img2, crop_border, y_channel)
    mse = np.mean((img - img2)**2)
    return float('inf') if mse == 0 else 10. * np.log10(255. * 255. / mse)


def _basicsr_ssim(img: np.ndarray, img2: np.ndarray) -> float:
    c1 = (0.01 * 255)**2
    c2 = (0.03 * 255)**2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def basicsr_calculate_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool) -> float:
    img, img2 = _basicsr_crop(img, crop_border, y_channel), _basicsr_crop(img2, crop_border, y_channel)
    return float(np.mean([_basicsr_ssim(img[..., i], img2[..., i]) for i in range(img.shape[2])]))


def basicsr_reference(output: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool) -> tuple[float, float]:
    """BasicSR's (PSNR, SSIM) of one (3, H, W) output against its clean image."""
    out, ref = basicsr_tensor2img(output), basicsr_tensor2img(gt)
    return (basicsr_calculate_psnr(out, ref, crop_border, y_channel),
            basicsr_calculate_ssim(out, ref, crop_border, y_channel))


def promptir_reference(output: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """PromptIR's compute_psnr_ssim of one (H, W, 3) image: clipped, scikit-image's defaults."""
    out, ref = np.clip(output, 0, 1).astype(np.float64), np.clip(gt, 0, 1).astype(np.float64)
    return (peak_signal_noise_ratio(ref, out, data_range=1),
            structural_similarity(ref, out, data_range=1, channel_axis=-1))


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


def test_crop_border_drops_the_border_before_measuring():
    x, y = _pair()
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert torch.allclose(psnr(x, y, crop_border=3), psnr(x[inner], y[inner]), rtol=0, atol=1e-12)
    assert torch.allclose(ssim(x, y, crop_border=3), ssim(x[inner], y[inner]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="crop_border=20 leaves nothing"):
        psnr(x, y, crop_border=20)
    with pytest.raises(ValueError, match="non-negative int"):
        ssim(x, y, crop_border=-1)


def test_quantize_8bit_is_basicsr_tensor2img():
    # Values beyond [0, 1] and exactly on rounding ties (k + 0.5) / 255 included.
    x, _ = _pair(shape=(1, 3, 23, 29), noise=0.3)
    x = (x * 1.4 - 0.2).float()
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 255
    levels = quantize_8bit(x)[0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(levels, basicsr_tensor2img(x[0])[..., ::-1])


@pytest.mark.parametrize("crop_border", [0, 3])
@pytest.mark.parametrize("y_channel", [False, True])
def test_basicsr_scores_match_a_transcription_of_basicsr(crop_border, y_channel):
    x, y = _pair(shape=(2, 3, 37, 45), noise=0.05)
    ours_psnr, ours_ssim = basicsr_scores(x, y, crop_border=crop_border, y_channel=y_channel)
    for i in range(2):
        ref_psnr, ref_ssim = basicsr_reference(x[i], y[i], crop_border, y_channel)
        # BasicSR rounds Y to float32 (1e-6 dB); without Y the arithmetic is the same up to float64 rounding.
        assert ours_psnr[i].item() == pytest.approx(ref_psnr, abs=1e-5 if y_channel else 1e-9)
        assert ours_ssim[i].item() == pytest.approx(ref_ssim, abs=1e-7 if y_channel else 1e-10)


def test_promptir_scores_match_skimage_defaults():
    x, y = _pair(shape=(2, 3, 32, 48), noise=0.05)
    x = x * 1.1 - 0.05   # outside [0, 1]: clipped first
    ours_psnr, ours_ssim = promptir_scores(x, y)
    for i in range(2):
        ref_psnr, ref_ssim = promptir_reference(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy())
        assert ours_psnr[i].item() == pytest.approx(ref_psnr, rel=1e-12)
        assert ours_ssim[i].item() == pytest.approx(ref_ssim, rel=1e-12)
    # The uniform 7x7 window with sample covariances is not the Gaussian SSIM.
    assert abs(ours_ssim[0].item() - ssim(x.clamp(0, 1), y)[0].item()) > 1e-4
    with pytest.raises(ValueError, match="7-pixel window"):
        promptir_scores(x[..., :6, :], y[..., :6, :])
