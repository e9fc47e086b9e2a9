"""The --data specs: pair rules, the PromptIR and CDD-11 trees, recursive listing, bad files,
mixing several sources, and lazily read evaluation sets."""
import collections
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sipl_fast.data.datasets as datasets
from sipl_fast.data.datasets import (DataError, DataWarning, DegradedCrops, EvalSet, mixed_training_set,
                                     open_source)


def _png(path, seed, height=24, width=32, offset=0):
    """A random RGB PNG (values 20..199 + offset); returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = (rng.integers(20, 200, size=(height, width, 3)) + offset).astype(np.uint8)
    Image.fromarray(array).save(path)
    return array


def _pair(lq, gt, seed, offset, **size):
    """A clean image and its degraded partner: the same pixels, ``offset`` levels brighter."""
    _png(gt, seed, **size)
    _png(lq, seed, offset=offset, **size)


def _offset(sample):
    """The constant brightness difference lq - gt of a correctly paired sample (in levels)."""
    difference = (sample.lq - sample.gt) * 255
    assert float(difference.std()) < 1e-3, f"{sample.name} is paired with another picture"
    return round(float(difference.mean()))


def _offsets(eval_set):
    return {sample.name: _offset(sample) for sample in eval_set}


# --------------------------------------------------------------------------- pair rules
def test_rain_rule_pairs_rain_with_norain(tmp_path):
    for n, offset in ((1, 10), (2, 20), (12, 30)):
        _pair(tmp_path / "rainy" / f"rain-{n}.png", tmp_path / "gt" / f"norain-{n}.png", n, offset)
    source = open_source(f"paired:{tmp_path / 'rainy'},{tmp_path / 'gt'}", pair_rule="rain")
    samples = source.eval_set(("noise25",))
    assert samples.tasks == ("paired",) and [s.task for s in samples] == ["paired"] * 3
    assert _offsets(samples) == {"rain-1.png": 10, "rain-12.png": 30, "rain-2.png": 20}
    with pytest.raises(DataError, match="rain-1.png: no clean partner"):   # the stem rule does not match them
        open_source(f"paired:{tmp_path / 'rainy'},{tmp_path / 'gt'}")


def test_reside_rule_shares_one_clean_image_and_looks_into_subfolders(tmp_path):
    hazy, clear = tmp_path / "synthetic", tmp_path / "original"
    _png(clear / "0001.png", 1)
    _png(clear / "0002.png", 2)
    _png(hazy / "part1" / "0001_0.8_0.2.png", 1, offset=10)
    _png(hazy / "part2" / "0001_0.9_0.1.png", 1, offset=20)
    _png(hazy / "part1" / "0002_0.7_0.3.png", 2, offset=30)
    samples = open_source(f"paired:{hazy},{clear}", pair_rule="reside").eval_set(())
    assert _offsets(samples) == {"part1/0001_0.8_0.2.png": 10, "part1/0002_0.7_0.3.png": 30,
                                 "part2/0001_0.9_0.1.png": 20}


def test_key_regex_rule_uses_the_first_group(tmp_path):
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    _png(gt / "clean-007.png", 7)
    _png(gt / "clean-8.png", 8)
    _png(lq / "img_007_x2.png", 7, offset=5)
    _png(lq / "img_007_x3.png", 7, offset=6)
    _png(lq / "img_8_x2.png", 8, offset=9)
    samples = open_source(f"paired:{lq},{gt}", pair_rule=r"key:(\d+)").eval_set(())
    assert _offsets(samples) == {"img_007_x2.png": 5, "img_007_x3.png": 6, "img_8_x2.png": 9}


@pytest.mark.parametrize("rule, message", [("fuzzy", "pair rule 'fuzzy': unknown; use one of stem, rain"),
                                           ("key:[0-9]+", "needs a group in parentheses"),
                                           ("key:(", "not a regular expression")])
def test_bad_pair_rules_are_named(rule, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        open_source("skimage", pair_rule=rule)


def test_duplicate_keys_name_both_files(tmp_path):
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    _png(lq / "a" / "1.png", 1)
    _png(lq / "b" / "1.png", 1)
    _png(gt / "1.png", 1)
    with pytest.raises(DataError, match=r"a/1.png and .*b/1.png: two degraded files with the key '1'"):
        open_source(f"paired:{lq},{gt}")
    _png(gt / "x" / "1.png", 1)
    with pytest.raises(DataError, match=r"gt/1.png and .*gt/x/1.png: two clean files with the key '1'"):
        open_source(f"paired:{lq},{gt}", pair_rule="reside")


# --------------------------------------------------------------------------- dataset trees
def _promptir_tree(root, parts=("Denoise", "Derain", "Dehaze")):
    train = root / "Train"
    if "Denoise" in parts:
        _png(train / "Denoise" / "a.png", 1)
        _png(train / "Denoise" / "bsd" / "b.png", 2)
    if "Derain" in parts:
        _pair(train / "Derain" / "rainy" / "rain-1.png", train / "Derain" / "gt" / "norain-1.png", 3, 40)
    if "Dehaze" in parts:
        _pair(train / "Dehaze" / "synthetic" / "part1" / "0001_0.8_0.2.png",
              train / "Dehaze" / "original" / "0001.png", 4, 50)


def test_promptir_tree_tasks_and_counts(tmp_path):
    _promptir_tree(tmp_path)
    source = open_source(f"promptir:{tmp_path}")
    data = source.training_set(("rain",), patch=16, seed=0, length=8)
    assert data.tasks == ("noise15", "noise25", "noise50", "derain", "dehaze")
    counts = collections.Counter(data[i]["task"] for i in range(8))   # one epoch of items: each once
    assert counts == {0: 2, 1: 2, 2: 2, 3: 1, 4: 1}
    samples = source.eval_set(("rain",), seed=5, uint8_noise=True)
    assert samples.tasks == data.tasks and len(samples) == 8
    assert [(s.task, s.name) for s in samples][:2] == [("noise15", "a.png"), ("noise15", "bsd/b.png")]
    assert {s.name: _offset(s) for s in samples if s.task in ("derain", "dehaze")} == {
        "rain-1.png": 40, "part1/0001_0.8_0.2.png": 50}
    # noise50 of the second Denoise image: the PromptIR test formula, seeded by (seed, task 2, image 1)
    clean = np.asarray(Image.open(tmp_path / "Train" / "Denoise" / "bsd" / "b.png"))
    noisy = np.clip(clean + np.random.default_rng([5, 2, 1]).standard_normal(clean.shape) * 50, 0, 255)
    sample = samples[5]
    assert (sample.task, sample.name) == ("noise50", "bsd/b.png")
    assert np.array_equal((sample.lq * 255).round().permute(1, 2, 0).numpy(), noisy.astype(np.uint8))


def test_promptir_tree_with_missing_parts_warns_and_without_any_refuses(tmp_path):
    _promptir_tree(tmp_path, parts=("Derain",))
    with pytest.warns(DataWarning, match=r"Denoise, .*Dehaze; training without the Denoise, Dehaze parts"):
        source = open_source(f"promptir:{tmp_path / 'Train'}")   # the Train folder itself works too
    assert source.training_set((), patch=16, seed=0).tasks == ("derain",)
    (tmp_path / "Train" / "Dehaze").mkdir()
    with pytest.warns(DataWarning), pytest.raises(DataError, match="Dehaze/synthetic: missing"):
        open_source(f"promptir:{tmp_path}")
    with pytest.raises(DataError, match="none of the PromptIR parts"):
        open_source(f"promptir:{tmp_path / 'Train' / 'Derain'}")


def test_cdd11_split_tasks_are_its_folders(tmp_path):
    for n in (1, 2):
        _png(tmp_path / "clear" / f"{n}.png", n)
        for offset, folder in ((10, "custom"), (20, "haze_rain"), (30, "low")):
            _png(tmp_path / folder / f"{n}.png", n, offset=offset)
    source = open_source(f"cdd11:{tmp_path}")
    data = source.training_set(("rain",), patch=16, seed=0, length=6)
    assert data.tasks == ("low", "haze_rain", "custom")   # CDD-11's order, then other names
    assert collections.Counter(data[i]["task"] for i in range(6)) == {0: 2, 1: 2, 2: 2}
    samples = source.eval_set(())
    assert [(s.task, s.name, _offset(s)) for s in samples] == [
        ("low", "1.png", 30), ("low", "2.png", 30), ("haze_rain", "1.png", 20), ("haze_rain", "2.png", 20),
        ("custom", "1.png", 10), ("custom", "2.png", 10)]


def test_cdd11_root_with_train_and_test_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=f"point --data at cdd11:{tmp_path / 'train'} or cdd11:{tmp_path / 'test'}"):
        open_source(f"cdd11:{tmp_path}")


def test_listing_is_recursive_and_skips_hidden_and_other_files(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "sub" / "b.png", 2)
    (tmp_path / "sub" / "deeper").mkdir()
    Image.new("RGB", (32, 24), (90, 40, 200)).save(tmp_path / "sub" / "deeper" / "c.jpg")
    _png(tmp_path / ".hidden.png", 4)
    _png(tmp_path / ".cache" / "d.png", 5)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    samples = source.eval_set(("noise15",))
    assert [s.name for s in samples] == ["a.png", "sub/b.png", "sub/deeper/c.jpg"]


# --------------------------------------------------------------------------- bad files
def test_each_problem_names_its_file(tmp_path):
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    _pair(lq / "1.png", gt / "1.png", 1, 10)
    _png(lq / "2.png", 2)
    with pytest.raises(DataError, match="lq/2.png: no clean partner with the key '2'"):
        open_source(f"paired:{lq},{gt}")
    _png(gt / "2.png", 2, height=20)
    with pytest.raises(DataError, match="lq/2.png: size 24x32 differs from its partner .*gt/2.png"):
        open_source(f"paired:{lq},{gt}")
    (gt / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(DataError, match="gt/2.png: not a readable image"):
        open_source(f"paired:{lq},{gt}")
    _png(gt / "2.png", 2)
    with pytest.raises(DataError, match="lq/1.png: 24x32 is smaller than the training patch 28"):
        open_source(f"paired:{lq},{gt}").training_set((), patch=28, seed=0)
    (tmp_path / "empty" / "clear").mkdir(parents=True)
    (tmp_path / "empty" / "low").mkdir()
    with pytest.raises(DataError, match="empty/clear: no images in it or its subfolders"):
        open_source(f"cdd11:{tmp_path / 'empty'}")


def test_skip_bad_drops_bad_files_with_one_warning_per_pass(tmp_path):
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    for n in range(4):
        _pair(lq / f"{n}.png", gt / f"{n}.png", n, 10)
    _png(lq / "orphan.png", 9)                                  # no partner
    _png(gt / "2.png", 2, height=20)                            # partner of another size
    (gt / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")  # unreadable header
    spec = f"paired:{lq},{gt}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = open_source(spec, skip_bad=True)
    assert len(caught) == 1 and issubclass(caught[0].category, DataWarning)
    message = str(caught[0].message)
    assert message.startswith(f"{spec}: skipped 3 bad files: ") and "orphan.png" in message
    assert [item.name for item in source.items] == ["0.png", "1.png"]
    data = (lq / "1.png").read_bytes()
    (lq / "1.png").write_bytes(data[:len(data) // 2])   # header intact, pixels truncated
    dataset = source.training_set((), patch=16, seed=0)
    with pytest.warns(DataWarning, match="skipped 1 bad file: .*lq/1.png"):
        dataset.check()
    assert [item.name for item in dataset.items] == ["0.png"]
    (gt / "0.png").write_bytes(b"")
    (gt / "1.png").write_bytes(b"")
    with pytest.warns(DataWarning, match="skipped 5 bad files"), pytest.raises(DataError, match="no usable images"):
        open_source(spec, skip_bad=True)


# --------------------------------------------------------------------------- mixing sources
def _two_sources(tmp_path):
    for n in range(2):
        _png(tmp_path / "clean" / f"{n}.png", n)
    for n in range(3):
        _pair(tmp_path / "lq" / f"{n}.png", tmp_path / "gt" / f"{n}.png", 10 + n, 10)
    return [open_source(str(tmp_path / "clean")), open_source(f"paired:{tmp_path / 'lq'},{tmp_path / 'gt'}")]


def test_mixing_concatenates_by_default_and_remaps_tasks(tmp_path):
    sources = _two_sources(tmp_path)
    mixed = mixed_training_set(sources, ("noise15", "noise25"), patch=16, seed=3, length=10)
    assert mixed.tasks == ("noise15", "noise25", "paired") and len(mixed) == 10
    tasks = [mixed[i]["task"] for i in range(10)]
    assert all(t in (0, 1) for t in tasks[:2] + tasks[5:7]) and tasks[2:5] == tasks[7:10] == [2, 2, 2]
    item = mixed[3]
    assert torch.allclose(item["lq"] - item["gt"], torch.full_like(item["gt"], 10 / 255), atol=1e-6)
    single = mixed_training_set(sources[:1], ("noise15",), patch=16, seed=3)
    assert isinstance(single, DegradedCrops)
    alone = sources[0].training_set(("noise15",), patch=16, seed=3)
    assert torch.equal(single[5]["lq"], alone[5]["lq"])


def test_mixing_weights_set_the_fraction_of_each_source(tmp_path):
    sources = _two_sources(tmp_path)
    mixed = mixed_training_set(sources, ("noise15",), patch=8, seed=1, weights=[1, 3], length=400)
    tasks = [mixed[i]["task"] for i in range(400)]
    assert abs(tasks.count(1) / 400 - 0.75) < 0.08   # three standard deviations: 0.065
    again = mixed_training_set(sources, ("noise15",), patch=8, seed=1, weights=[1, 3], length=400)
    assert [again[i]["task"] for i in range(40)] == tasks[:40]
    other = mixed_training_set(sources, ("noise15",), patch=8, seed=2, weights=[1, 3], length=400)
    assert [other[i]["task"] for i in range(40)] != tasks[:40]
    with pytest.raises(DataError, match="--data-weights: expected 2 positive"):
        mixed_training_set(sources, ("noise15",), patch=8, seed=1, weights=[1, 0])


# --------------------------------------------------------------------------- evaluation sets
def test_eval_sets_read_each_sample_only_when_indexed(tmp_path, monkeypatch):
    sources = _two_sources(tmp_path)
    reads = []
    real = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k))
    clean = sources[0].eval_set(("noise15", "rain"), size=16)
    paired = sources[1].eval_set(())
    assert isinstance(clean, EvalSet) and len(clean) == 4 and len(paired) == 3 and reads == []
    sample = clean[3]
    assert (sample.task, sample.name) == ("rain", "1.png") and sample.lq.shape == (3, 16, 16)
    assert reads == ["1.png"]
    assert len(paired[1:]) == 2 and reads == ["1.png"]
    paired[-1]
    assert reads == ["1.png", "2.png", "2.png"]


def test_uint8_noise_follows_the_promptir_test_formula_after_the_centre_crop(tmp_path):
    _png(tmp_path / "a.png", 1)
    pixels = _png(tmp_path / "b.png", 2)
    samples = open_source(str(tmp_path)).eval_set(("noise25", "noise50"), size=16, seed=7, uint8_noise=True)
    sample = samples[3]
    assert (sample.task, sample.name) == ("noise50", "b.png")
    clean = pixels[4:20, 8:24]
    noisy = np.clip(clean + np.random.default_rng([7, 1, 1]).standard_normal(clean.shape) * 50, 0, 255)
    assert np.array_equal((sample.gt * 255).round().permute(1, 2, 0).numpy(), clean)
    assert np.array_equal((sample.lq * 255).round().permute(1, 2, 0).numpy(), noisy.astype(np.uint8))
    float_noise = open_source(str(tmp_path)).eval_set(("noise25", "noise50"), size=16, seed=7)[3]
    assert not torch.equal(float_noise.lq, sample.lq)
