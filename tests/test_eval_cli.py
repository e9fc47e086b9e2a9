"""``sipl-fast eval`` as papers compute their numbers: paired folders with a pair rule, the
PromptIR protocol, per-image CSV scores that the saved images reproduce, and bf16."""
import csv

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sipl_fast.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def rain_pairs(tmp_path_factory):
    """Rain100L naming (rain-N / norain-N) with sides that are not multiples of 16."""
    root = tmp_path_factory.mktemp("rain")
    rng = np.random.default_rng(3)
    for i, (height, width) in enumerate([(37, 50), (41, 33)], start=1):
        clean = rng.integers(40, 200, size=(height, width, 3), dtype=np.uint8)
        rainy = np.clip(clean.astype(int) + rng.integers(0, 60, size=clean.shape), 0, 255).astype(np.uint8)
        (root / "target").mkdir(exist_ok=True)
        (root / "input").mkdir(exist_ok=True)
        Image.fromarray(clean).save(root / "target" / f"norain-{i}.png")
        Image.fromarray(rainy).save(root / "input" / f"rain-{i}.png")
    return root


def _centre_crop16(array: np.ndarray) -> np.ndarray:
    """PromptIR's crop_img(base=16), written from its definition."""
    height, width = array.shape[:2]
    cut_h, cut_w = height % 16, width % 16
    return array[cut_h // 2:height - cut_h + cut_h // 2, cut_w // 2:width - cut_w + cut_w // 2]


def test_csv_scores_equal_skimage_on_the_saved_images(checkpoint, rain_pairs, tmp_path, capsys):
    scores, images = tmp_path / "scores.csv", tmp_path / "images"
    code = main(["eval", "--checkpoint", str(checkpoint), "--data",
                 f"paired:{rain_pairs / 'input'},{rain_pairs / 'target'}", "--pair-rule", "rain",
                 "--protocol", "promptir", "--refine-steps", "1", "--csv", str(scores), "--save-images", str(images),
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "promptir protocol" in capsys.readouterr().out
    with open(scores, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {row["task"] for row in rows} == {"paired"}
    for row in rows:
        stem = row["image"].rsplit(".", 1)[0]
        number = stem.split("-")[1]
        clean = _centre_crop16(np.asarray(Image.open(rain_pairs / "target" / f"norain-{number}.png"))) / 255.0
        assert (int(row["height"]), int(row["width"])) == clean.shape[:2]
        for step in (0, 1):
            saved = np.asarray(Image.open(images / "paired" / f"{stem}_step{step}.png")) / 255.0
            assert saved.shape == clean.shape
            # the saved PNG is the float output rounded to 8 bits: at most 1/510 from it per pixel
            psnr = peak_signal_noise_ratio(clean, saved, data_range=1)
            ssim = structural_similarity(clean, saved, data_range=1, channel_axis=-1)
            assert float(row[f"step{step}_psnr"]) == pytest.approx(psnr, abs=0.05)
            assert float(row[f"step{step}_ssim"]) == pytest.approx(ssim, abs=2e-3)
        rainy = _centre_crop16(np.asarray(Image.open(rain_pairs / "input" / f"rain-{number}.png"))) / 255.0
        assert float(row["input_psnr"]) == pytest.approx(peak_signal_noise_ratio(clean, rainy, data_range=1), rel=1e-9)


def test_existing_outputs_are_kept_without_overwrite(checkpoint, rain_pairs, tmp_path, capsys):
    scores = tmp_path / "scores.csv"
    scores.write_text("mine\n")
    code = main(["eval", "--checkpoint", str(checkpoint), "--data",
                 f"paired:{rain_pairs / 'input'},{rain_pairs / 'target'}", "--pair-rule", "rain", "--csv", str(scores),
                 "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "scores.csv exists" in err and err.count("\n") == 1
    assert scores.read_text() == "mine\n"


@pytest.mark.parametrize("flags, message", [(["--protocol", "promptir", "--y-channel"], "--protocol basicsr"),
                                            (["--pair-rule", "nope"], "--pair-rule"),
                                            (["--size", "8"], "--size must be at least 16"),
                                            (["--precision", "fp16"], "fp16 needs a CUDA device")])
def test_bad_eval_options_are_one_line(checkpoint, rain_pairs, capsys, flags, message):
    code = main(["eval", "--checkpoint", str(checkpoint), "--data",
                 f"paired:{rain_pairs / 'input'},{rain_pairs / 'target'}", "--no-progress", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err


def test_basicsr_protocol_and_bf16_run(checkpoint, rain_pairs, tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(checkpoint), "--data",
                 f"paired:{rain_pairs / 'input'},{rain_pairs / 'target'}", "--pair-rule", "rain", "--protocol",
                 "basicsr", "--crop-border", "2", "--y-channel", "--precision", "bf16", "--refine-steps", "1",
                 "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "basicsr protocol" in out and "paired" in out
