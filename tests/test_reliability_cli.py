"""restore and eval check inputs, outputs and checkpoints first, and fail in one line."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from sipl_fast import SIPLPromptIR
from sipl_fast.checkpoint import CheckpointError, load_model, save_weights
from sipl_fast.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.safetensors"
    save_weights(path, model.state_dict(), model.config)
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


def _one_line_error(capsys, *parts) -> None:
    err = capsys.readouterr().err
    assert err.startswith("sipl-fast: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


def _restore(inputs, checkpoint, out, *names, flags=()):
    return main(["restore", *[str(inputs / n) for n in names], "--checkpoint", str(checkpoint), "--out", str(out),
                 "--refine-steps", "1", "--no-progress", *flags])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_restore_never_replaces_a_file_it_did_not_write_unless_asked(inputs, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"someone else's file")
    assert _restore(inputs, checkpoint, out, "a.png", "b.png") == 1
    _one_line_error(capsys, str(out / "b.png"), "--overwrite")
    assert (out / "b.png").read_bytes() == b"someone else's file" and not (out / "a.png").exists()
    assert _restore(inputs, checkpoint, out, "a.png", "b.png", flags=["--overwrite"]) == 0
    assert read_size(out / "b.png") == (24, 16)


def read_size(path):
    with Image.open(path) as image:
        return image.size[1], image.size[0]


def test_a_bad_later_input_stops_restore_before_anything_is_written(inputs, checkpoint, tmp_path, capsys):
    data = (inputs / "b.png").read_bytes()
    (inputs / "b.png").write_bytes(data[:len(data) // 2])   # header intact, pixels truncated
    out = tmp_path / "out"
    assert _restore(inputs, checkpoint, out, "a.png", "b.png") == 1
    _one_line_error(capsys, "b.png")
    assert not out.exists() or not any(out.iterdir())


def test_a_one_pixel_image_is_one_line(inputs, checkpoint, tmp_path, capsys):
    Image.new("RGB", (1, 1)).save(inputs / "dot.png")
    assert _restore(inputs, checkpoint, tmp_path / "out", "a.png", "dot.png") == 1
    _one_line_error(capsys, "dot.png", "too small")
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_one_line(inputs, checkpoint, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert _restore(inputs, checkpoint, tmp_path / "out", "a.png") == 1
    _one_line_error(capsys, str(tmp_path / "out"), "not a folder")


def test_an_out_that_cannot_be_created_is_one_line(inputs, checkpoint, capsys):
    assert _restore(inputs, checkpoint, "/proc/sipl-fast-out", "a.png") == 1
    _one_line_error(capsys, "/proc/sipl-fast-out")


def test_a_target_that_is_a_folder_is_one_line(inputs, checkpoint, tmp_path, capsys):
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    assert _restore(inputs, checkpoint, tmp_path / "out", "a.png", "b.png") == 1
    _one_line_error(capsys, str(tmp_path / "out" / "a.png"), "folder")
    assert not (tmp_path / "out" / "b.png").exists()


def test_eval_on_pairs_of_different_sizes_is_one_line(checkpoint, tmp_path, capsys):
    degraded, clean = tmp_path / "input", tmp_path / "target"
    degraded.mkdir()
    clean.mkdir()
    Image.new("RGB", (32, 32)).save(degraded / "x.png")
    Image.new("RGB", (40, 32)).save(clean / "x.png")
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", f"paired:{degraded},{clean}", "--size", "0",
                 "--no-progress", "--device", "cpu"]) == 1
    _one_line_error(capsys, "x.png", "differs from its partner")


def test_eval_json_into_a_missing_folder_fails_before_evaluating(checkpoint, tmp_path, capsys, monkeypatch):
    import sipl_fast.evaluation as evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the --json path was checked")

    monkeypatch.setattr(evaluation, "evaluate", never)
    report = tmp_path / "missing" / "scores.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--json", str(report), "--no-progress",
                 "--device", "cpu"]) == 1
    _one_line_error(capsys, str(report), "does not exist")


@pytest.mark.parametrize("change, message", [(dict(dim=-4), "dim must be a positive int"),
                                             (dict(dim=10**7), "weights do not match"),
                                             (dict(heads=[1, 2, 0, 8]), "heads must be 4 positive ints"),
                                             (dict(num_blocks="many"), "num_blocks must be 4 positive ints"),
                                             (dict(ffn_expansion_factor=float("nan")), "ffn_expansion_factor")])
def test_absurd_checkpoint_configurations_are_refused_before_building(checkpoint, inputs, tmp_path, capsys, change,
                                                                       message):
    from sipl_fast.checkpoint import read_weights

    state, config, _ = read_weights(checkpoint)
    path = tmp_path / "absurd.safetensors"
    save_weights(path, state, {**config, **change})
    with pytest.raises(CheckpointError, match=message):
        load_model(path)
    assert main(["restore", str(inputs / "a.png"), "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 1
    _one_line_error(capsys, str(path))
