"""A training run as practitioners drive it: the papers' dataset layouts mixed, a held-out
validation set, the run folder's records (options.json, train.log, metrics.csv, best and
periodic checkpoints), ``--resume`` with no other flag, option files and renamed flags."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from sipl_fast.cli import main
from sipl_fast.train import OptionsError, TrainOptions, read_options_file, run_options

SIZE = (40, 48)   # H, W of the generated images: above the 32-pixel test patch


def _photo(seed: int) -> np.ndarray:
    """A smooth random colour image (structure for the network to learn, never constant)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 220, size=(5, 6, 3))
    image = np.kron(coarse, np.ones((8, 8, 1)))[: SIZE[0], : SIZE[1]]
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _promptir_tree(root):
    """ROOT/Train/{Denoise, Derain/{rainy,gt}, Dehaze/{synthetic/part1,original}}."""
    for i in range(2):
        _save(root / "Train" / "Denoise" / f"{i:04d}.png", _photo(i))
        clean = _photo(10 + i)
        _save(root / "Train" / "Derain" / "gt" / f"norain-{i + 1}.png", clean)
        _save(root / "Train" / "Derain" / "rainy" / f"rain-{i + 1}.png", np.clip(clean.astype(int) + 25, 0, 255)
              .astype(np.uint8))
        clear = _photo(20 + i)
        _save(root / "Train" / "Dehaze" / "original" / f"{i + 1:04d}.jpg", clear)
        _save(root / "Train" / "Dehaze" / "synthetic" / "part1" / f"{i + 1:04d}_0.8_0.2.jpg",
              (clear * 0.6 + 90).astype(np.uint8))
    return root


def _cdd11_tree(root):
    for i in range(2):
        clear = _photo(30 + i)
        _save(root / "clear" / f"{i:03d}.png", clear)
        _save(root / "haze_rain" / f"{i:03d}.png", (clear * 0.7 + 60).astype(np.uint8))
        _save(root / "low" / f"{i:03d}.png", (clear * 0.3).astype(np.uint8))
    return root


def _paired_tree(root):
    for i in range(2):
        clean = _photo(40 + i)
        _save(root / "target" / f"{i}.png", clean)
        _save(root / "input" / f"{i}.png", np.clip(clean.astype(int) - 30, 0, 255).astype(np.uint8))
    return root / "input", root / "target"


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


TINY = ["--preset", "tiny", "--batch", "2", "--patch", "32", "--log-every", "5", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The layouts mixed, validated every 10 iterations, trained 20 then resumed to 30."""
    base = tmp_path_factory.mktemp("layouts")
    promptir, cdd11 = _promptir_tree(base / "promptir"), _cdd11_tree(base / "cdd11")
    lq, gt = _paired_tree(base / "val")
    out = base / "run"
    first = main(["train", "--data", f"promptir:{promptir}", "--data", f"cdd11:{cdd11}", "--val-data",
                  f"paired:{lq},{gt}", "--val-every", "10", "--val-steps", "1", "--iters", "20", "--save-every", "10",
                  "--keep", "1", "--out", str(out), *TINY])
    snapshot = {name: (out / name).read_bytes() for name in ("options.json", "metrics.csv", "train.log")}
    second = main(["train", "--out", str(out), "--resume", "--iters", "30"])
    return {"out": out, "codes": (first, second), "first": snapshot}


def test_a_run_folder_records_everything(run):
    out, first = run["out"], run["first"]
    assert run["codes"] == (0, 0)
    for name in ("checkpoint.safetensors", "resume.pt", "best.safetensors", "options.json", "train.log",
                 "metrics.csv"):
        assert (out / name).is_file(), name
    options = json.loads(first["options.json"])
    assert options["data"][0].startswith("promptir:") and options["data"][1].startswith("cdd11:")
    assert options["iters"] == 20 and options["preset"] == "tiny" and options["warmup"] == 2
    assert "resume" not in options and "out" not in options
    rows = list(csv.DictReader(first["metrics.csv"].decode().splitlines()))
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [int(r["iter"]) for r in train_rows] == [5, 10, 15, 20]
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 and float(r["peak_memory_mib"]) > 0
               for r in train_rows)
    assert float(train_rows[0]["lr"]) > float(train_rows[-1]["lr"]) >= 0, "cosine decay to 0 at the last iteration"
    val = [r for r in rows if r["kind"] == "val"]
    assert {int(r["iter"]) for r in val} == {10, 20}
    assert {r["task"] for r in val} == {"paired", "average"} and {r["refine_step"] for r in val} == {"0", "1"}
    assert all(10 < float(r["psnr"]) < 60 and -1 <= float(r["ssim"]) <= 1 for r in val)
    log = first["train.log"].decode()
    assert "validation at iter 10" in log and "iter 20/20" in log
    # the log covers the training sources' tasks: PromptIR's five and CDD-11's folders
    for task in ("noise15", "noise25", "noise50", "derain", "dehaze", "haze_rain", "low"):
        assert task in log, task


def test_resume_alone_continues_with_the_recorded_options(run):
    out = run["out"]
    options = json.loads((out / "options.json").read_text())
    assert options["iters"] == 30 and options["warmup"] == 2, "the warm-up stays as the run resolved it"
    rows = _rows(out / "metrics.csv")
    assert [int(r["iter"]) for r in rows if r["kind"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert {int(r["iter"]) for r in rows if r["kind"] == "val"} == {10, 20, 30}
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "at iteration 20" in log and log.startswith(run["first"]["train.log"].decode())
    periodic = sorted(p.name for p in out.glob("checkpoint_iter*.safetensors"))
    assert periodic == ["checkpoint_iter0000030.safetensors"], "--keep 1 keeps the newest periodic checkpoint"


def test_best_checkpoint_holds_the_best_validated_weights(run):
    from safetensors import safe_open

    out = run["out"]
    val = [r for r in _rows(out / "metrics.csv") if r["kind"] == "val" and r["task"] == "average"
           and r["refine_step"] == "1"]
    best = max(val, key=lambda r: float(r["psnr"]))
    with safe_open(str(out / "best.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["step"]) == int(best["iter"])
    assert json.loads(meta["val_psnr"]) == pytest.approx(float(best["psnr"]), abs=1e-4)


def test_resume_refuses_a_changed_training_option_unless_overridden(run, capsys):
    out = run["out"]
    assert main(["train", "--out", str(out), "--resume", "--lr", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert "--lr" in err and "--override" in err and err.count("\n") == 1
    with pytest.raises(OptionsError, match="--batch"):
        run_options({"out": str(out), "resume": True, "batch": 4})
    allowed = run_options({"out": str(out), "resume": True, "batch": 4, "override": True})
    assert allowed.batch == 4 and allowed.preset == "tiny"


def test_options_files_json_and_yaml(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"iters": 7, "preset": "tiny", "data": ["skimage"], "lr": 1e-3}))
    (tmp_path / "b.yaml").write_text("iters: 9\nconfig: base\nval-every: 3\n")
    assert read_options_file(tmp_path / "a.json") == {"iters": 7, "preset": "tiny", "data": ["skimage"], "lr": 1e-3}
    assert read_options_file(tmp_path / "b.yaml") == {"iters": 9, "preset": "base", "val_every": 3}
    options = run_options({"out": "x", "lr": 5e-4}, str(tmp_path / "a.json"))
    assert (options.iters, options.lr, options.data) == (7, 5e-4, ["skimage"]), "typed flags win over the file"
    (tmp_path / "bad.yaml").write_text("iterations: 9\n")
    with pytest.raises(OptionsError, match="bad.yaml.*iterations"):
        read_options_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.json").write_text("{iters: ")
    with pytest.raises(OptionsError, match="broken.json: not valid JSON"):
        read_options_file(tmp_path / "broken.json")
    with pytest.raises(OptionsError, match="--iters: expected int"):
        from sipl_fast.train import validate_options

        validate_options(TrainOptions(iters="ten"))


def test_renamed_flags_still_work_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--steps", "2", "--tasks", "noise25", "--batch", "2", "--patch", "32",
                 "--no-progress", "--device", "cpu", "--out", str(out), "--no-check-data"])
    err = capsys.readouterr().err
    assert code == 0
    assert "--config is now --preset" in err and "--steps is now --iters" in err
    assert json.loads((out / "options.json").read_text())["iters"] == 2


def test_version_and_missing_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "sipl-fast 0." in capsys.readouterr().out
    assert main(["train", "--iters", "2"]) == 1
    assert "--out is required" in capsys.readouterr().err


def test_validation_without_held_out_data_is_refused_before_work(tmp_path, capsys):
    folder = tmp_path / "clean"
    for i in range(2):
        _save(folder / f"{i}.png", _photo(i))
    assert main(["train", "--data", str(folder), "--val-every", "5", "--out", str(tmp_path / "run"), *TINY]) == 1
    assert "--val-every needs --val-data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", "--tasks", "noise25", "--iters", "2", "--tensorboard", "--out", str(out), "--no-check-data",
                 *TINY, "--log-every", "1"]) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]


def test_init_from_a_plain_promptir_checkpoint_loads_the_backbone(tmp_path):
    import torch

    from sipl_fast.checkpoint import CheckpointError, save_weights
    from sipl_fast.model import PromptIR
    from sipl_fast.train import Trainer

    torch.manual_seed(5)
    plain = PromptIR.from_preset("tiny")
    # the official Lightning layout: a state_dict under "state_dict", every key under "net."
    lightning = tmp_path / "promptir.ckpt"
    torch.save({"epoch": 3, "global_step": 120, "state_dict": {f"net.{k}": v for k, v in plain.state_dict().items()}},
               lightning)
    lines = []
    trainer = Trainer(TrainOptions(tasks="noise25", iters=1, batch=2, patch=32, progress=False, device="cpu",
                                   out=str(tmp_path / "run"), init_from=str(lightning), check_data=False),
                      log=lines.append)
    mine = trainer.model.state_dict()
    shared = [k for k in plain.state_dict() if k in mine]
    assert len(shared) > 100
    assert all(torch.equal(mine[k], plain.state_dict()[k]) for k in shared)
    assert any(line.startswith("loaded ") and "left fresh" in line and "privileged_dictionary" in line
               for line in lines), lines
    save_weights(tmp_path / "other.safetensors", {"encoder_level1.0.norm1.body.weight": torch.ones(7)}, {})
    with pytest.raises(CheckpointError, match="encoder_level1.0.norm1.body.weight.*shape"):
        Trainer(TrainOptions(tasks="noise25", iters=1, batch=2, patch=32, progress=False, device="cpu",
                             out=str(tmp_path / "run2"), init_from=str(tmp_path / "other.safetensors"),
                             check_data=False))
