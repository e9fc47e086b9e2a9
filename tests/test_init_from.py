"""init_from: starting a network from another's weights (official PromptIR Lightning files,
BasicSR .pth, our safetensors), what it reports, and its refusals."""
import copy
import re

import pytest
import torch

from sipl_fast import PromptIR, SIPLPromptIR
from sipl_fast.checkpoint import CheckpointError, InitReport, init_from, save_weights

# SIPL's additions to PromptIR, by the authors' names: the dictionaries and the absorption
# (p{k}_cross) and injection (cross_p{k}) blocks of the three sites.
PROXY_FUSION_KEY = re.compile(r"^(privileged_dictionary[123]$|p[123]_cross\.|cross_p[123]\.)")
# The official PromptIR's six 1x1 convolutions that its forward never reads (bias=False).
OFFICIAL_UNUSED = ({f"chnl_reduce{k}.weight" for k in (1, 2, 3)}
                   | {f"reduce_noise_channel_{k}.weight" for k in (1, 2, 3)})


def _filled(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor of the state_dict drawn afresh (seeded), so loaded values are told apart
    from initial ones: no ones, zeros or default temperatures left."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
    return model


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _lightning_checkpoint(network: torch.nn.Module) -> dict:
    """What the official PromptIR's Lightning Trainer saves: the module's state_dict (the network
    is its attribute ``net``) and the trainer's state, an AdamW state with tensors among it
    (stepped on a copy: ``network`` keeps its weights)."""
    trained = copy.deepcopy(network)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=2e-4)
    for p in trained.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()    # moments and step counts as tensors in the state
    optimizer.zero_grad(set_to_none=True)
    return {
        "epoch": 149,
        "global_step": 223_500,
        "pytorch-lightning_version": "2.0.2",
        "state_dict": {f"net.{k}": v for k, v in network.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 223_500},
                               "epoch_progress": {"total": {"ready": 150, "started": 150, "processed": 150,
                                                            "completed": 149}, "current": {"ready": 150}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                      "'every_n_epochs': 1, 'train_time_interval': None}": {
                          "monitor": None, "best_model_score": None, "best_model_path": "ckpt/epoch=149.ckpt",
                          "dirpath": "ckpt", "best_k_models": {}, "kth_best_model_path": "",
                          "kth_value": torch.tensor(float("inf")), "last_model_path": ""}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"warmup_epochs": 15, "max_epochs": 150, "warmup_start_lr": 0.0, "eta_min": 0.0,
                           "base_lrs": [2e-4], "last_epoch": 149, "_step_count": 150, "_last_lr": [2.1e-8]}],
    }


def test_official_promptir_lightning_file_starts_sipl_promptir(tmp_path):
    official = _filled(PromptIR.from_preset("tiny"), seed=1)
    weights = _snapshot(official)
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_checkpoint(official), path)
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny")
    before = _snapshot(model)

    report = init_from(model, path)

    assert isinstance(report, InitReport) and report.path == str(path)
    proxy_fusion = {k for k in before if PROXY_FUSION_KEY.match(k)}
    backbone = set(before) - proxy_fusion
    assert proxy_fusion and backbone and backbone <= set(weights)   # the backbone keeps the official names
    assert set(report.loaded) == backbone
    assert set(report.missing) == proxy_fusion
    assert set(report.unexpected) == OFFICIAL_UNUSED
    after = model.state_dict()
    for key in backbone:
        assert torch.equal(after[key], weights[key]), key
    for key in proxy_fusion:
        assert torch.equal(after[key], before[key]), key
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith(f"loaded {len(backbone)} tensors from {path}; {len(proxy_fusion)} left fresh (e.g. ")
    assert summary.endswith(f"; {len(OFFICIAL_UNUSED)} in the file unused (e.g. chnl_reduce1.weight, "
                            "chnl_reduce2.weight, ...)")


def test_basicsr_file_prefers_params_ema(tmp_path):
    raw, ema = _filled(SIPLPromptIR.from_preset("tiny"), seed=2), _filled(SIPLPromptIR.from_preset("tiny"), seed=3)
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    model = SIPLPromptIR.from_preset("tiny")

    report = init_from(model, path)

    assert report.loaded == list(ema.state_dict()) and report.missing == [] and report.unexpected == []
    assert report.summary() == f"loaded {len(ema.state_dict())} tensors from {path}; none left fresh"
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema.state_dict()[key]), key


def test_ddp_saved_file_into_wrapped_models(tmp_path):
    """A file saved from DistributedDataParallel (``module.`` keys) into a model inside
    DataParallel or torch.compile: the wrappers' prefixes are not the network's keys."""
    source = _filled(SIPLPromptIR.from_preset("tiny"), seed=4)
    path = tmp_path / "ddp.pth"
    torch.save({"params": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    for wrap in (torch.nn.DataParallel, torch.compile):
        model = SIPLPromptIR.from_preset("tiny")
        report = init_from(wrap(model), path)
        assert len(report.loaded) == len(source.state_dict()) and not report.missing
        assert torch.equal(model.privileged_dictionary2, source.privileged_dictionary2)


def test_our_safetensors_checkpoint_starts_plain_promptir(tmp_path):
    """The reverse direction, from our own SIPL checkpoint folder: the Proxy Fusion tensors are
    unused, the official network's six unused convolutions stay as initialised."""
    sipl = _filled(SIPLPromptIR.from_preset("tiny"), seed=5)
    save_weights(tmp_path / "checkpoint.safetensors", sipl.state_dict(), sipl.config, arch="sipl-promptir")
    model = PromptIR.from_preset("tiny")
    before = _snapshot(model)

    report = init_from(model, tmp_path)

    assert report.path == str(tmp_path / "checkpoint.safetensors")
    assert set(report.missing) == OFFICIAL_UNUSED
    assert set(report.unexpected) == {k for k in sipl.state_dict() if PROXY_FUSION_KEY.match(k)}
    assert set(report.loaded) == set(before) - OFFICIAL_UNUSED
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key] if key in OFFICIAL_UNUSED else sipl.state_dict()[key]), key


@pytest.mark.parametrize("damage", ["shape", "non-finite", "integer"])
def test_bad_tensors_are_refused_and_leave_the_model_untouched(tmp_path, damage):
    state = {k: v.clone() for k, v in _filled(SIPLPromptIR.from_preset("tiny"), seed=6).state_dict().items()}
    if damage == "shape":
        state["output.weight"] = torch.rand(3, 8, 3, 3) + 0.5
        message = r"output\.weight has shape \(3, 8, 3, 3\) in the file but \(3, 32, 3, 3\) in the sipl-promptir"
    elif damage == "non-finite":
        state["output.weight"][0, 0, 0, 0] = float("inf")
        message = r"non-finite values in 1 tensors \(e\.g\. output\.weight\)"
    else:
        state["output.weight"] = torch.ones(3, 32, 3, 3, dtype=torch.int64)
        message = r"output\.weight is torch\.int64 in the file but torch\.float32"
    path = tmp_path / "checkpoint.safetensors"
    save_weights(path, state, {})
    model = SIPLPromptIR.from_preset("tiny")
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}"):
        init_from(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_file_of_which_nothing_matches(tmp_path):
    path = tmp_path / "other.safetensors"
    save_weights(path, {"encoder.conv1.weight": torch.rand(8, 3, 3, 3) + 0.5, "fc.bias": torch.rand(10) + 0.5}, {})
    with pytest.raises(CheckpointError, match=f"^no tensor of {re.escape(str(path))} matches sipl-promptir "
                                              r"\(the file's keys: (encoder\.conv1\.weight|fc\.bias), "
                                              r"(encoder\.conv1\.weight|fc\.bias); the model's: "):
        init_from(SIPLPromptIR.from_preset("tiny"), path)


class _Hyperparameters:
    """An object in a checkpoint (as Lightning's save_hyperparameters stores): loading it
    would construct the class, which counts its instances."""

    constructed = 0

    def __new__(cls, *args, **kwargs):
        cls.constructed += 1
        return super().__new__(cls)

    def __init__(self, lr):
        self.lr = lr


def test_a_file_that_needs_unsafe_unpickling_is_refused(tmp_path):
    network = _filled(PromptIR.from_preset("tiny"), seed=7)
    path = tmp_path / "epoch=1.ckpt"
    torch.save({**_lightning_checkpoint(network), "hyper_parameters": _Hyperparameters(2e-4)}, path)
    _Hyperparameters.constructed = 0
    model = SIPLPromptIR.from_preset("tiny")
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as info:
        init_from(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable torch checkpoint (it holds ")
    assert "_Hyperparameters, which only unsafe unpickling could load" in message and "\n" not in message
    assert _Hyperparameters.constructed == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
