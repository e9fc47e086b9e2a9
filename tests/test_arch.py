"""--arch through train, eval, restore: checkpoints record their architecture, and a plain
PromptIR trains with the plain step and refuses refinement steps."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sipl_fast.checkpoint import load_model, read_weights
from sipl_fast.cli import main
from sipl_fast.model import NO_PROXY_FUSION
from sipl_fast.train import OptionsError, TrainOptions, Trainer

TRAIN = ["--preset", "tiny", "--tasks", "noise25,haze", "--iters", "2", "--batch", "2", "--patch", "32",
         "--save-every", "0", "--no-progress", "--device", "cpu"]


def _one_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("sipl-fast: error: ") and message in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sipl-adair and a promptir run, two steps each."""
    folder = tmp_path_factory.mktemp("runs")
    for arch in ("sipl-adair", "promptir"):
        assert main(["train", "--arch", arch, "--out", str(folder / arch), *TRAIN]) == 0
    return folder


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)).save(path)
    return path


def test_checkpoints_record_their_architecture(runs):
    for arch, cls_name in (("sipl-adair", "SIPLAdaIR"), ("promptir", "PromptIR")):
        _, config, metadata = read_weights(runs / arch)
        assert metadata["arch"] == arch and config["dim"] == 16
        model, meta = load_model(runs / arch)
        assert type(model).__name__ == cls_name and meta["arch"] == arch
        _, _, resume = read_weights(runs / arch / "resume.pt")
        assert resume["arch"] == arch


def test_sipl_adair_restores_and_evaluates(runs, photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["restore", str(photo), "--checkpoint", str(runs / "sipl-adair"), "--out", str(out),
                 "--refine-steps", "1", "--no-progress"]) == 0
    with Image.open(out / "photo.png") as restored:
        assert restored.size == (30, 21)
    report = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(runs / "sipl-adair"), "--tasks", "haze", "--size", "32",
                 "--refine-steps", "1", "--json", str(report), "--no-progress"]) == 0
    assert "(sipl-adair)" in capsys.readouterr().out
    assert len(json.loads(report.read_text())["average"]["psnr"]) == 2


def test_promptir_evaluates_and_restores_the_plain_pass_only(runs, photo, tmp_path, capsys):
    report = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(runs / "promptir"), "--tasks", "haze", "--size", "32",
                 "--json", str(report), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "step 0 (plain)" in printed and "step 1" not in printed
    assert len(json.loads(report.read_text())["average"]["psnr"]) == 1
    assert main(["restore", str(photo), "--checkpoint", str(runs / "promptir"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    for command in (["eval", "--checkpoint", str(runs / "promptir"), "--refine-steps", "2"],
                    ["restore", str(photo), "--checkpoint", str(runs / "promptir"), "--out",
                     str(tmp_path / "refused"), "--refine-steps", "2"]):
        assert main(command) == 1
        _one_error(capsys, NO_PROXY_FUSION)
    assert not (tmp_path / "refused").exists()


def test_contradicting_or_changed_architecture_is_one_error(runs, photo, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(runs / "promptir"), "--arch", "sipl-adair"]) == 1
    _one_error(capsys, "holds a promptir network, not sipl-adair")
    assert main(["restore", str(photo), "--checkpoint", str(runs / "sipl-adair"), "--arch", "sipl-promptir",
                 "--out", str(tmp_path / "out")]) == 1
    _one_error(capsys, "holds a sipl-adair network, not sipl-promptir")
    assert main(["train", "--arch", "sipl-promptir", "--out", str(runs / "promptir"), "--resume", *TRAIN]) == 1
    _one_error(capsys, "arch 'promptir' -> 'sipl-promptir'")
    assert main(["train", "--arch", "promptir", "--random-proxy", "--out", str(tmp_path / "run"), *TRAIN]) == 1
    _one_error(capsys, "--random-proxy needs Proxy Fusion")


def test_promptir_trains_with_the_plain_step(tmp_path):
    """No privileged pass: PromptIR's encode() refuses, so a step that called it would fail."""
    trainer = Trainer(TrainOptions(arch="promptir", data="skimage", tasks="haze", batch=2, patch=32, iters=1,
                                   progress=False, device="cpu", out=str(tmp_path / "run")))
    batch = next(trainer._batches(0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss = trainer.train_step(batch["lq"], batch["gt"])
    assert loss.isfinite()
    after = trainer.model.state_dict()
    assert any(not after[k].equal(before[k]) for k in before)
    assert all(after[k].equal(before[k]) for k in before if k.startswith(("chnl_reduce", "reduce_noise_channel")))
    with pytest.raises(OptionsError, match="--arch: unknown architecture"):
        Trainer(TrainOptions(arch="restormer", out=str(tmp_path / "other")))
