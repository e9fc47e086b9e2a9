"""Synthetic degradations: deterministic per seed, in [0, 1], and doing what their name says."""
import pytest
import torch

from sipl_fast.data.degradations import DEGRADATIONS, TASK_SETS, degrade, resolve_tasks, task_parts

ALL_TASKS = sorted(set(DEGRADATIONS) | {t for tasks in TASK_SETS.values() for t in tasks})


def _photo_like(batch: int = 2, size: int = 48) -> torch.Tensor:
    """Smooth random images with some texture (never constant, never zero)."""
    g = torch.Generator().manual_seed(7)
    coarse = torch.rand(batch, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (0.15 + 0.7 * smooth + 0.05 * torch.rand(batch, 3, size, size, generator=g)).clamp(0, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_in_range_and_changes_the_image(task):
    x = _photo_like()
    a = degrade(x, task, _gen(1))
    b = degrade(x, task, _gen(1))
    c = degrade(x, task, _gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b), "same seed must give the same image"
    assert not torch.equal(a, c), "another seed must give another image"
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 1e-3, "the degradation must change the image"


def test_parameters_are_drawn_per_image():
    x = _photo_like(batch=1).expand(2, -1, -1, -1).contiguous()
    for task in ("haze", "rain", "blur", "lowlight"):
        y = degrade(x, task, _gen(3))
        assert not torch.equal(y[0], y[1]), task


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_gaussian_noise_has_the_named_sigma(sigma):
    x = torch.full((1, 3, 128, 128), 0.5)
    y = degrade(x, f"noise{sigma}", _gen(0))
    std = (y - x).std().item() * 255
    # Clamping to [0, 1] trims the tails a little at sigma 50 (0.5 +- 2.5 sigma stays inside).
    assert abs(std - sigma) < 0.03 * sigma


def test_haze_pulls_towards_the_airlight_and_lowers_contrast():
    x = _photo_like()
    y = degrade(x, "haze", _gen(0))
    assert y.mean() > x.mean()
    assert y.std(dim=(1, 2, 3)).lt(x.std(dim=(1, 2, 3))).all()


def test_rain_and_snow_only_brighten():
    x = _photo_like()
    for task in ("rain", "snow"):
        y = degrade(x, task, _gen(0))
        assert (y >= x - 1e-6).all(), task


def test_blurs_remove_high_frequencies():
    x = _photo_like()
    def roughness(t):
        return (t[..., 1:, :] - t[..., :-1, :]).abs().mean() + (t[..., :, 1:] - t[..., :, :-1]).abs().mean()
    for task in ("blur", "gaussian_blur"):
        y = degrade(x, task, _gen(0))
        assert roughness(y) < 0.8 * roughness(x), task
        assert abs(y.mean() - x.mean()) < 0.02, task


def test_low_light_darkens():
    x = _photo_like()
    y = degrade(x, "lowlight", _gen(0))
    assert y.mean() < 0.6 * x.mean()


def test_jpeg_gives_8_bit_values_with_block_artefacts():
    x = _photo_like(size=64)
    y = degrade(x, "jpeg", _gen(0))
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-3)
    assert (y - x).abs().mean() > 1e-3


def test_composites_apply_in_physical_order_whatever_the_name_order():
    x = _photo_like()
    assert task_parts("rain+lowlight+haze") == ["haze", "rain", "lowlight"]
    assert torch.equal(degrade(x, "rain+haze", _gen(5)), degrade(x, "haze+rain", _gen(5)))


def test_task_sets_and_task_lists():
    assert resolve_tasks("3task") == ("noise15", "noise25", "noise50", "rain", "haze")
    assert resolve_tasks("5task")[-2:] == ("blur", "lowlight")
    assert len(resolve_tasks("cdd11")) == 11
    assert resolve_tasks("noise25, haze+rain") == ("noise25", "haze+rain")
    for bad in ("fog", "noise25,fog", "", "haze+haze"):
        with pytest.raises(ValueError):
            resolve_tasks(bad)


def test_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        degrade(torch.rand(3, 16, 16), "haze", _gen(0))
