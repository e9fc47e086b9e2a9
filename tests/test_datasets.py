"""Datasets: deterministic crops, the three data sources, and one clear error per data problem."""
import numpy as np
import pytest
import torch
from PIL import Image

from sipl_fast.data.datasets import (SKIMAGE_HELD_OUT, SKIMAGE_TRAIN, DataError, DegradedCrops, open_source,
                                     synthetic_eval_set)


def _write_png(path, height=40, width=56, seed=0, offset=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(20, 200, size=(height, width, 3), dtype=np.uint8) + offset
    Image.fromarray(array).save(path)
    return array


def _images(n=3, size=(40, 56)):
    g = torch.Generator().manual_seed(1)
    return [0.1 + 0.8 * torch.rand(3, *size, generator=g) for _ in range(n)]


def test_crops_are_deterministic_per_seed_epoch_and_index():
    data = DegradedCrops(_images(), ("noise25", "haze"), patch=32, seed=3, length=10)
    a, b = data[4], data[4]
    assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"]) and a["task"] == b["task"]
    assert a["lq"].shape == a["gt"].shape == (3, 32, 32)
    assert a["lq"].min() >= 0 and a["lq"].max() <= 1 and a["task"] in (0, 1)
    data.set_epoch(1)
    assert not torch.equal(data[4]["gt"], a["gt"]), "another epoch draws another crop"
    other_seed = DegradedCrops(_images(), ("noise25", "haze"), patch=32, seed=4, length=10)
    assert not torch.equal(other_seed[4]["lq"], a["lq"])


def test_crops_use_every_task():
    data = DegradedCrops(_images(), ("noise15", "rain", "haze"), patch=16, length=60)
    assert {data[i]["task"] for i in range(60)} == {0, 1, 2}


def test_clean_folder_source(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"img{i}.png", seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    assert source.kind == "folder" and len(source.train_images) == 3
    item = source.training_set(("noise25",), patch=32, seed=0)[0]
    assert item["lq"].shape == (3, 32, 32)
    samples = source.eval_set(("noise25",), size=None)
    assert [tuple(s.gt.shape) for s in samples] == [(3, 40, 56)] * 3


def test_empty_folder_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        open_source(str(tmp_path))


def test_unreadable_image_names_the_file(tmp_path):
    _write_png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match="broken.png"):   # the headers are read when the source is opened
        open_source(str(tmp_path))


def test_image_smaller_than_the_patch_names_the_file(tmp_path):
    _write_png(tmp_path / "small.png", height=20, width=20)
    with pytest.raises(DataError, match="small.png.*smaller than the training patch 32"):
        open_source(str(tmp_path)).training_set(("noise25",), patch=32, seed=0)


def test_paired_folders_give_aligned_crops(tmp_path):
    degraded, clean = tmp_path / "input", tmp_path / "target"
    degraded.mkdir()
    clean.mkdir()
    for i in range(2):
        _write_png(clean / f"{i}.png", seed=i)
        _write_png(degraded / f"{i}.png", seed=i, offset=30)   # the same picture, 30 levels brighter
    source = open_source(f"paired:{degraded},{clean}")
    item = source.training_set((), patch=24, seed=0)[1]
    assert torch.allclose(item["lq"] - item["gt"], torch.full_like(item["gt"], 30 / 255), atol=1e-6)
    samples = source.eval_set((), size=None)
    assert [s.task for s in samples] == ["paired", "paired"]


def test_paired_missing_partner_names_the_file(tmp_path):
    degraded, clean = tmp_path / "input", tmp_path / "target"
    degraded.mkdir()
    clean.mkdir()
    _write_png(degraded / "a.png")
    _write_png(degraded / "b.png")
    _write_png(clean / "a.png")
    with pytest.raises(DataError, match="b.png: no clean partner"):
        open_source(f"paired:{degraded},{clean}")
    _write_png(clean / "b.png")
    _write_png(clean / "c.png")
    with pytest.raises(DataError, match="c.png: no degraded partner"):
        open_source(f"paired:{degraded},{clean}")


def test_paired_size_mismatch_names_the_file(tmp_path):
    degraded, clean = tmp_path / "input", tmp_path / "target"
    degraded.mkdir()
    clean.mkdir()
    _write_png(degraded / "a.png", height=48)
    _write_png(clean / "a.png", height=40)
    with pytest.raises(DataError, match="a.png: size 48x56 differs from its partner"):
        open_source(f"paired:{degraded},{clean}")


def test_malformed_paired_spec():
    with pytest.raises(DataError, match="paired:DEGRADED_DIR,CLEAN_DIR"):
        open_source("paired:only_one_dir")


def test_skimage_source_holds_out_its_evaluation_photos():
    assert not set(SKIMAGE_TRAIN) & set(SKIMAGE_HELD_OUT)
    source = open_source("skimage")
    assert len(source.train_images) == len(SKIMAGE_TRAIN)
    assert all(t.shape[0] == 3 and 0 <= t.min() and t.max() <= 1 for t in source.train_images)
    samples = source.eval_set(("noise25", "rain"), size=64)
    assert len(samples) == 2 * len(SKIMAGE_HELD_OUT)
    assert {s.name for s in samples} == set(SKIMAGE_HELD_OUT)
    assert all(s.lq.shape == s.gt.shape == (3, 64, 64) for s in samples)


def test_evaluation_degradations_are_fixed_by_the_seed():
    images = [("a", _images(1)[0])]
    first = synthetic_eval_set(images, ("rain",), size=32, seed=9)
    again = synthetic_eval_set(images, ("rain",), size=32, seed=9)
    assert torch.equal(first[0].lq, again[0].lq)
