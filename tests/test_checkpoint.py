"""Checkpoints: safetensors round trip, BasicSR .pth files, no unpickling, one clear error."""
import json

import pytest
import torch

from sipl_fast import SIPLPromptIR
from sipl_fast.checkpoint import (CheckpointError, load_model, load_resume_state, read_weights, save_resume_state,
                                  save_weights)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny").eval()
    with torch.no_grad():   # non-zero dictionaries, so a wrong or missing load shows in the output
        for k in (1, 2, 3):
            getattr(model, f"privileged_dictionary{k}").normal_()
    return model


def _image():
    return torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))


def test_safetensors_round_trip_rebuilds_the_configuration(tiny, tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_weights(path, tiny.state_dict(), tiny.config, step=7)
    loaded, meta = load_model(path)
    assert loaded.config == tiny.config and meta["step"] == 7 and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_image()), tiny(_image()))
    assert load_model(tmp_path)[0].config == tiny.config          # a folder means its checkpoint.safetensors
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]   # no temporary files left


def test_basicsr_pth_prefers_params_ema(tiny, tmp_path):
    other = SIPLPromptIR.from_config(tiny.config)
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": other.state_dict(), "params_ema": tiny.state_dict()}, path)
    loaded, meta = load_model(path, config=tiny.config)
    assert meta["source"].endswith("[params_ema]")
    with torch.no_grad():
        assert torch.equal(loaded(_image()), tiny(_image()))
    torch.save({"params": {f"module.{k}": v for k, v in tiny.state_dict().items()}}, path)  # a DDP-saved file
    assert read_weights(path)[2]["source"].endswith("[params]")
    assert torch.equal(load_model(path, config=tiny.config)[0].privileged_dictionary1, tiny.privileged_dictionary1)


def test_pth_without_configuration_means_the_authors_model(tmp_path):
    torch.manual_seed(0)
    base = SIPLPromptIR()
    path = tmp_path / "sipl_promptir.pth"
    torch.save({"params": base.state_dict()}, path)
    loaded, _ = load_model(path)
    assert sum(p.numel() for p in loaded.parameters()) == 40_028_562
    assert torch.equal(loaded.output.weight, base.output.weight)


class _Payload:
    """A pickle that would create a file when unpickled: must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_never_unpickles_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="evil.pth: not a readable torch checkpoint"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_files_raise_one_clear_error(tiny, tmp_path, damage):
    for name, write in (("checkpoint.safetensors", lambda p: save_weights(p, tiny.state_dict(), tiny.config)),
                        ("model.pth", lambda p: torch.save({"params": tiny.state_dict()}, p))):
        path = tmp_path / name
        write(path)
        data = path.read_bytes()
        path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x13\x37" * 500, "empty": b""}[damage])
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message


def test_mismatched_weights_and_configuration(tiny, tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    config = dict(tiny.config, dim=24)
    save_weights(path, tiny.state_dict(), config)
    with pytest.raises(CheckpointError, match="do not match the model configuration.*wrong shape"):
        load_model(path)
    state = tiny.state_dict()
    del state["output.weight"]
    save_weights(path, state, tiny.config)
    with pytest.raises(CheckpointError, match="1 missing"):
        load_model(path)
    save_weights(path, tiny.state_dict(), {**tiny.config, "no_such_argument": 1})
    with pytest.raises(CheckpointError, match="unusable model configuration"):
        load_model(path)


def test_non_finite_weights_are_refused(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["output.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "checkpoint.safetensors"
    save_weights(path, state, tiny.config)
    with pytest.raises(CheckpointError, match="non-finite values"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nothing.safetensors")


def test_resume_state_loads_with_weights_only(tiny, tmp_path):
    optimizer = torch.optim.AdamW(tiny.parameters())
    state = {"format": "sipl_fast/1", "step": 3, "model": tiny.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": [{"torch": torch.get_rng_state(), "cuda": None}], "options": {"seed": 0}}
    path = tmp_path / "resume.pt"
    save_resume_state(path, state)
    loaded = load_resume_state(path)
    assert loaded["step"] == 3 and torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    torch.save({"something": "else"}, path)
    with pytest.raises(CheckpointError, match="not a sipl_fast resume state"):
        load_resume_state(path)


def test_metadata_holds_json_configuration(tiny, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    save_weights(path, tiny.state_dict(), tiny.config, tasks=["noise25"])
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == tiny.config
    assert json.loads(metadata["tasks"]) == ["noise25"]
