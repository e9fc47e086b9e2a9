"""Training: the authors' step, the schedule, exact resume, DDP on 2 CPU processes, validation."""
import os
import subprocess
import sys

import pytest
import torch

from sipl_fast import ops
from sipl_fast.checkpoint import CheckpointError, load_model, load_resume_state
from sipl_fast.data.datasets import EvalSample
from sipl_fast.evaluation import evaluate, format_table
from sipl_fast.train import (GRAPH_WARMUP_STEPS, OptionsError, TrainOptions, Trainer,
                             lr_factor, pick_device)

# CPU even where CUDA exists: exact (bitwise) resume is promised on the CPU.
SMALL = dict(data="skimage", tasks="noise25,haze", preset="tiny", batch=2, patch=32, progress=False, log_every=1,
             device="cpu")


def _options(tmp_path, name="run", **overrides):
    return TrainOptions(**{**SMALL, "out": str(tmp_path / name), **overrides})


def _assert_trained_alike(mine: dict, theirs: dict, start: dict) -> None:
    """Two trainings from the same ``start`` moved the weights alike. AdamW moves each weight by
    about lr whatever its gradient's size, so a rounding-level difference in a near-zero
    gradient can show as a whole step: compare the movements in norm, not weight by weight."""
    moved = torch.cat([(theirs[k].float() - start[k].float()).flatten() for k in start])
    apart = torch.cat([(mine[k].float() - theirs[k].float()).flatten() for k in start])
    assert moved.norm() > 0 and apart.norm() <= 1e-3 * moved.norm(), (apart.norm(), moved.norm())


def test_learning_rate_schedule():
    factors = [lr_factor(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])), "cosine decay never rises"
    assert factors[55] == pytest.approx(0.5) and factors[-1] < 1e-3


def test_step_uses_the_models_own_plain_pass_on_the_clean_image(tmp_path):
    trainer = Trainer(_options(tmp_path, iters=2))
    model = trainer.model
    batch = next(trainer._batches(0))
    lq, gt = batch["lq"], batch["gt"]
    with torch.no_grad():
        expected = model.encode(model(gt))          # the model's own plain pass, weights before the step
    seen = {}
    original_forward = model.forward

    def spy(x, privileged_features=None):
        if privileged_features is not None:
            seen["input"], seen["pi"] = x, privileged_features
        return original_forward(x, privileged_features)

    model.forward = spy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = trainer.train_step(lq, gt)
    assert torch.equal(seen["input"], lq), "the privileged pass runs on the degraded input"
    for got, want in zip(seen["pi"], expected):
        assert not got.requires_grad, "privileged features are computed under no_grad"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert loss.ndim == 0 and torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("privileged_dictionary") for k in changed), "the dictionaries learn"
    assert any(k.startswith("encoder_level1") for k in changed)


def test_tiny_model_loss_falls(tmp_path):
    trainer = Trainer(_options(tmp_path, iters=12, warmup=2, lr=1e-3, tasks="noise50"))
    batch = next(trainer._batches(0))
    losses = [trainer.train_step(batch["lq"], batch["gt"]).item() for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses


def _crash_at(step):
    def on_step(current, loss):
        if current == step:
            raise KeyboardInterrupt
    return on_step


def test_resume_after_an_interruption_is_exact(tmp_path):
    common = dict(iters=5, ema=0.9, random_proxy=True, save_every=2)
    straight = Trainer(_options(tmp_path, "straight", **common))
    straight.run()

    interrupted = Trainer(_options(tmp_path, "crashed", **common))
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(on_step=_crash_at(3))          # dies after step 3; the last save is step 2
    assert load_resume_state(tmp_path / "crashed" / "resume.pt")["step"] == 2
    resumed = Trainer(_options(tmp_path, "crashed", resume=True, **common))
    assert resumed.step == 2
    resumed.run()

    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema.items():
        assert torch.equal(value, resumed.ema[key]), key
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert torch.equal(torch.get_rng_state(), torch.get_rng_state())
    final_a = load_resume_state(tmp_path / "straight" / "resume.pt")
    final_b = load_resume_state(tmp_path / "crashed" / "resume.pt")
    assert final_a["step"] == final_b["step"] == 5
    assert torch.equal(final_a["rng"][0]["torch"], final_b["rng"][0]["torch"])
    assert [e["step"] for e in final_b["history"]] == [1, 2, 3, 4, 5]
    # The inference checkpoint holds the EMA weights.
    model, meta = load_model(tmp_path / "crashed")
    assert meta["weights"] == "ema" and meta["step"] == 5
    assert torch.equal(model.output.weight, resumed.ema["output.weight"])


def test_resume_refuses_changed_options_and_existing_runs(tmp_path):
    Trainer(_options(tmp_path, iters=1)).run()
    with pytest.raises(CheckpointError, match="changed: lr 0.0002 -> 0.001"):
        Trainer(_options(tmp_path, iters=1, lr=1e-3, resume=True))
    with pytest.raises(CheckpointError, match="already holds a training run"):
        Trainer(_options(tmp_path, iters=1))
    with pytest.raises(CheckpointError, match="no resume state"):
        Trainer(_options(tmp_path, "fresh", iters=1, resume=True))


def test_ddp_two_cpu_processes_write_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sipl_fast", "train", "--data", "skimage", "--tasks", "noise25,rain", "--preset", "tiny",
               "--iters", "3", "--batch", "2", "--patch", "32", "--save-every", "2", "--log-every", "1",
               "--device", "cpu", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # NHWC weights (the CPU's default) carry their gradients' strides, so DDP's buckets match
    assert "strides do not match" not in result.stderr, result.stderr
    log = result.stdout
    assert "batch 2 x 2 process(es)" in log
    assert log.count("iter 3/3") == 1, "only rank 0 logs"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "metrics.csv", "options.json",
                                                     "resume.pt", "train.log"]
    state = load_resume_state(out / "resume.pt")
    assert state["step"] == 3 and state["options"]["world_size"] == 2
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    model, meta = load_model(out)
    assert meta["step"] == 3
    assert torch.equal(model.output.weight, state["model"]["output.weight"])
    # 2 ranks x batch 2 see the same samples as one process with batch 4 (the sampler deals the
    # shuffled indices round-robin), and DDP averages the gradients: the same training, up to
    # the order of float additions.
    single = Trainer(_options(tmp_path, "single", tasks="noise25,rain", iters=3, batch=4))
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.run()
    _assert_trained_alike(state["model"], single.model.state_dict(), start)


def test_time_limit_stops_early_and_saves(tmp_path):
    lines = []
    trainer = Trainer(_options(tmp_path, iters=50), log=lines.append)
    trainer.run(time_limit=0.0)
    assert trainer.step == 1 and any("time limit" in line for line in lines)
    assert load_resume_state(tmp_path / "run" / "resume.pt")["step"] == 1


def test_cuda_devices_always_get_an_index(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)


def test_amp_is_ignored_on_cpu(tmp_path):
    lines = []
    trainer = Trainer(_options(tmp_path, iters=1, amp=True), log=lines.append)
    assert not trainer.use_amp and any("--amp ignored" in line for line in lines)


def test_evaluate_reports_every_task_and_step():
    torch.manual_seed(0)
    from sipl_fast import SIPLPromptIR

    model = SIPLPromptIR.from_preset("tiny")
    g = torch.Generator().manual_seed(0)
    samples = []
    for task in ("noise25", "haze"):
        for name in ("a", "b"):
            gt = torch.rand(3, 32, 48, generator=g)   # multiples of 16: the PromptIR protocol crops nothing
            samples.append(EvalSample(task, name, (gt + 0.1).clamp(0, 1), gt))
    result = evaluate(model, samples, steps=2, keep_outputs=True)
    assert [s.task for s in result.scores] == ["noise25", "haze"]
    assert all(len(s.psnr) == len(s.ssim) == 3 and s.images == 2 for s in result.scores)
    with torch.no_grad():
        plain = model(samples[0].lq[None]).clamp(0, 1)
        refined = model.refine(samples[0].lq[None], steps=2).clamp(0, 1)
    outputs = result.outputs[("noise25", "a")]
    torch.testing.assert_close(outputs[0][None], plain)
    torch.testing.assert_close(outputs[2][None], refined)
    table = format_table(result)
    assert "step 0 (plain)" in table and "step 2" in table and "average" in table


@pytest.mark.gpu
def test_cuda_bf16_training_learns(tmp_path):
    trainer = Trainer(_options(tmp_path, iters=20, warmup=2, lr=1e-3, tasks="noise50", device="cuda", amp=True,
                               batch=4, patch=64))
    assert trainer.use_amp and trainer.cuda_graph  # graph-replayed steps by default on one CUDA process
    batch = next(trainer._batches(0))
    lq, gt = batch["lq"].cuda(), batch["gt"].cuda()
    losses = [trainer.train_step(lq, gt).item() for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    trainer.save()
    model, _ = load_model(tmp_path / "run", device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model.refine(lq[:1], steps=2)).all()


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    with pytest.raises(OptionsError, match="--cuda-graph needs a single CUDA process"):
        Trainer(_options(tmp_path, cuda_graph=True))
    assert not Trainer(_options(tmp_path)).cuda_graph  # the default: graphs on one CUDA process only


def _cuda_run(tmp_path, name, cuda_graph, steps, **overrides):
    """A tiny CUDA trainer and the batches of its first ``steps`` steps (on the device)."""
    trainer = Trainer(_options(tmp_path, name, steps=steps, warmup=2, lr=1e-3, device="cuda", batch=2, patch=32,
                               cuda_graph=cuda_graph, **overrides))
    batches = [(b["lq"].cuda(), b["gt"].cuda()) for b, _ in zip(trainer._batches(0), range(steps))]
    return trainer, batches


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_replays_the_eager_step(tmp_path, monkeypatch, amp):
    """The captured step computes what the same step run eagerly computes: two trainers with
    the same (capturable) optimizer, one stepping eagerly, one warming up, capturing and
    replaying; deterministic cuDNN and no TF32, so only the replay differs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    steps = GRAPH_WARMUP_STEPS + 4  # warm-up steps, the capture, then replays
    eager, batches = _cuda_run(tmp_path, "eager", True, steps, amp=amp)
    graphed, _ = _cuda_run(tmp_path, "graph", True, steps, amp=amp)
    start = {k: v.clone() for k, v in eager.model.state_dict().items()}
    eager_losses = []
    with ops.kernels_forced(*ops.graph_kernels("train")):  # the kernels the graph records
        for lq, gt in batches:
            eager.model.train()
            eager_losses.append(eager._optimizer_step(lq, gt).item())
            eager.scheduler.step()
    graph_losses = [graphed.train_step(lq, gt).item() for lq, gt in batches]
    assert graphed._captured is not None and eager._captured is None
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    _assert_trained_alike(graphed.model.state_dict(), eager.model.state_dict(), start)
    assert graphed.optimizer.param_groups[0]["lr"].item() == pytest.approx(eager.optimizer.param_groups[0]["lr"].item())


def test_channels_last_training_matches_nchw_training(tmp_path):
    """NHWC (the CPU's default) and NCHW training take the same steps."""
    nchw = Trainer(_options(tmp_path, "nchw", iters=3, channels_last=False))
    nhwc = Trainer(_options(tmp_path, "nhwc", iters=3, channels_last=True))
    batches = [(b["lq"], b["gt"]) for b, _ in zip(nchw._batches(0), range(3))]
    start = {k: v.clone() for k, v in nchw.model.state_dict().items()}
    for lq, gt in batches:
        torch.testing.assert_close(nhwc.train_step(lq, gt), nchw.train_step(lq, gt), rtol=1e-4, atol=1e-6)
    assert nhwc.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    depthwise = nhwc.model.encoder_level1[0].ffn.dwconv.weight  # strides set, not just satisfied
    assert depthwise.stride() == (9, 1, 3, 1)
    _assert_trained_alike(nhwc.model.state_dict(), nchw.model.state_dict(), start)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_training_learns_like_plain_training(tmp_path, channels_last):
    steps = GRAPH_WARMUP_STEPS + 8
    plain, batches = _cuda_run(tmp_path, "plain", False, steps, tasks="noise50")
    graphed, _ = _cuda_run(tmp_path, "graph", True, steps, tasks="noise50", channels_last=channels_last)
    plain_losses = [plain.train_step(lq, gt).item() for lq, gt in batches]
    graph_losses = [graphed.train_step(lq, gt).item() for lq, gt in batches]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(plain_losses), rtol=5e-2, atol=0)


@pytest.mark.gpu
def test_cuda_graph_runs_resume_each_other(tmp_path):
    for first, second in ((True, False), (False, True)):
        name = f"run_{first}"
        trainer, batches = _cuda_run(tmp_path, name, first, 6, random_proxy=True)
        for lq, gt in batches[:4]:
            trainer.train_step(lq, gt)
            trainer.step += 1
        trainer.save()
        resumed = Trainer(_options(tmp_path, name, iters=6, warmup=2, lr=1e-3, device="cuda", batch=2, patch=32,
                                   cuda_graph=second, random_proxy=True, resume=True))
        assert resumed.step == 4
        assert resumed.optimizer.param_groups[0]["capturable"] == second
        assert float(resumed.optimizer.param_groups[0]["lr"]) == pytest.approx(
            float(trainer.optimizer.param_groups[0]["lr"]))
        losses = [resumed.train_step(lq, gt).item() for lq, gt in batches[4:] * 3]
        assert all(torch.isfinite(torch.tensor(losses))), losses
