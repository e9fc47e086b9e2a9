"""Training's divergence guard, option checks before any work, and the data check at start."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from sipl_fast.checkpoint import RESUME_NAME, WEIGHTS_NAME
from sipl_fast.cli import main
from sipl_fast.data.datasets import DataError, DegradedCrops
from sipl_fast import train as train_module
from sipl_fast.train import TrainOptions, Trainer

SMALL = dict(data="skimage", tasks="noise25", preset="tiny", batch=2, patch=32, progress=False, log_every=1,
             device="cpu", warmup=1)


def _options(tmp_path, **overrides) -> TrainOptions:
    return TrainOptions(**{**SMALL, "out": str(tmp_path / "run"), **overrides})


def _digests(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in (WEIGHTS_NAME, RESUME_NAME)}


def _poison_step(monkeypatch, trainer: Trainer, step: int) -> None:
    """The batch of ``step`` (1-based) gets a NaN pixel in every degraded image."""
    calls = {"n": 0}
    getitem = type(trainer.dataset).__getitem__

    def poisoned(self, index):
        item = getitem(self, index)
        calls["n"] += 1
        if (calls["n"] - 1) // trainer.options.batch == step - 1:
            item["lq"] = item["lq"].clone()
            item["lq"][0, 0, 0] = float("nan")
        return item

    monkeypatch.setattr(type(trainer.dataset), "__getitem__", poisoned)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_options(tmp_path, iters=6, save_every=2))
    _poison_step(monkeypatch, trainer, 3)
    with pytest.raises(train_module.TrainingDiverged, match="at step 3") as caught:
        trainer.run()
    assert "checkpoint of step 2" in str(caught.value) and trainer.saved_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the bad step updated nothing"


def test_the_checkpoint_on_disk_is_untouched_by_a_diverged_run(tmp_path, monkeypatch):
    trainer = Trainer(_options(tmp_path, iters=6, save_every=2))
    _poison_step(monkeypatch, trainer, 4)
    marks = {}

    def on_step(step, loss):
        if step == 3:   # the checkpoint of step 2 is on disk
            marks.update(_digests(trainer.out))

    with pytest.raises(train_module.TrainingDiverged, match="at step 4"):
        trainer.run(on_step=on_step)
    assert marks and _digests(trainer.out) == marks


def test_patience_skips_a_bad_step_without_updating_and_finishes(tmp_path, monkeypatch):
    lines = []
    trainer = Trainer(_options(tmp_path, iters=4, save_every=0, nonfinite_patience=1), log=lines.append)
    _poison_step(monkeypatch, trainer, 2)
    weights = {}
    trainer.run(on_step=lambda step, loss: weights.__setitem__(step, {k: v.clone() for k, v in
                                                                       trainer.model.state_dict().items()}))
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "the skipped step changed weights"
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "later steps train again"
    assert any("step 2: the loss or a gradient is not finite; update skipped" in line for line in lines)
    assert all(np.isfinite(entry.loss) for entry in trainer.history)
    assert (trainer.out / WEIGHTS_NAME).exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = Trainer(_options(tmp_path, iters=4, save_every=1))

    def spoil(step, loss):
        if step == 2:
            with torch.no_grad():
                trainer.model.privileged_dictionary1.fill_(float("inf"))

    with pytest.raises(train_module.TrainingDiverged, match="weights are not finite"):
        trainer.run(on_step=spoil)
    from sipl_fast.checkpoint import read_weights
    state, _, meta = read_weights(trainer.out / WEIGHTS_NAME)
    assert meta["step"] == 1 and all(torch.isfinite(t).all() for t in state.values())


def test_the_command_line_reports_divergence_in_one_line(tmp_path, capsys, monkeypatch):
    original = Trainer.__init__

    def poisoned_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _poison_step(monkeypatch, self, 1)

    monkeypatch.setattr(Trainer, "__init__", poisoned_init)
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--iters", "3", "--batch", "2",
                 "--patch", "32", "--tasks", "noise25", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sipl-fast: error: training diverged at step 1") and err.count("\n") == 1
    assert not (tmp_path / "run" / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("flags, message", [(["--lr", "nan"], "--lr must be a positive finite number"),
                                            (["--lr", "-1"], "--lr must be a positive finite number"),
                                            (["--lr", "inf"], "--lr must be a positive finite number"),
                                            (["--ema", "2"], "--ema must be in [0, 1)"),
                                            (["--ema", "1"], "--ema must be in [0, 1)"),
                                            (["--weight-decay", "-0.5"], "--weight-decay must be a finite number"),
                                            (["--clip", "nan"], "--clip must be a finite number"),
                                            (["--warmup", "-3"], "--warmup must be >= 0"),
                                            (["--nonfinite-patience", "-1"], "--nonfinite-patience must be >= 0"),
                                            (["--val-size", "4"], "--val-size must be at least 16")])
def test_bad_training_options_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    def no_data(spec):
        raise AssertionError("options must be checked before the data is opened")

    monkeypatch.setattr(train_module, "open_source", no_data)
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sipl-fast: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu", "--iters", "1",
                 "--batch", "2", "--patch", "32"])
    err = capsys.readouterr().err
    assert code == 1 and "exists and is not a folder" in err and err.count("\n") == 1


def _write(path, size=(40, 40)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_a_corrupt_training_image_is_found_before_the_first_step(tmp_path):
    folder = tmp_path / "clean"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _write(folder / name)
    data = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(data[:len(data) // 2])   # the header is intact, the pixels are not
    with pytest.raises(DataError, match="b.png"):
        Trainer(_options(tmp_path, data=str(folder), iters=1))
    trainer = Trainer(_options(tmp_path, data=str(folder), iters=1, check_data=False))  # the check can be skipped
    assert isinstance(trainer.dataset, DegradedCrops)


def test_the_data_check_reads_every_file_once_with_a_progress_bar(tmp_path, monkeypatch):
    import sipl_fast.data.datasets as datasets

    folder = tmp_path / "clean"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _write(folder / name)
    read, bars = [], []
    load = datasets._load
    monkeypatch.setattr(datasets, "_load", lambda path: read.append(path.name) or load(path))
    import tqdm.auto

    real_tqdm = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: bars.append(k.get("desc")) or real_tqdm(*a, **k))
    Trainer(_options(tmp_path, data=str(folder), iters=1, progress=True))
    assert sorted(read) == ["a.png", "b.png"] and "check data" in bars
