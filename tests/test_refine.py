"""The refinement engine: the authors' loop exactly, shared encoder, early stop, reuse, tiles."""
from __future__ import annotations

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.model import Encoded
from sipl_fast.ops import extension
from sipl_fast.refine import Refiner, authors_loop

from test_model import SMALL, _randomised, _relative_error


@pytest.fixture(scope="module")
def model():
    return _randomised(SIPLPromptIR(**SMALL)).eval()


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_equals_the_authors_loop_on_the_reference_backend(model, steps):
    x = torch.rand(2, 3, 21, 29)  # odd size: padded to 24x32 and cropped back
    with sipl_fast.use_backend("reference"):
        expected = authors_loop(model, x, steps)
    got, deltas = model.refine(x, steps=steps, return_deltas=True)
    assert got.shape == x.shape
    assert _relative_error(got, expected) <= 2e-4
    assert len(deltas) == steps and all(d.shape == (2,) and d.dtype == torch.float32 for d in deltas)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_authors_loop_runs_the_released_passes_and_no_more(model, monkeypatch, steps):
    """The authors' loop: per step one plain pass, one encoder pass of its output and one pass
    with the privileged features, 3 encoder runs; steps=0 is the plain pass alone. (An extra
    plain pass before the loop once made the baseline 20 % slower than the authors'.)"""
    runs = []
    encode_all = type(model).encode_all
    monkeypatch.setattr(type(model), "encode_all", lambda self, x: runs.append(1) or encode_all(self, x))
    x = torch.rand(1, 3, 16, 16)
    with sipl_fast.use_backend("reference"):
        output = authors_loop(model, x, steps)
    assert len(runs) == (3 * steps if steps else 1)
    if steps == 0:
        with torch.no_grad():
            torch.testing.assert_close(output, model(x))


def test_deltas_are_the_mean_change_of_each_step(model):
    x = torch.rand(2, 3, 16, 16)
    _, deltas = model.refine(x, steps=2, return_deltas=True)
    first = authors_loop(model, x, 1)
    second = authors_loop(model, x, 2)
    torch.testing.assert_close(deltas[0], (first - x).abs().flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(deltas[1], (second - first).abs().flatten(1).mean(1), rtol=1e-4, atol=1e-6)


def test_early_stop_compacts_the_batch(model, monkeypatch):
    x = torch.rand(3, 3, 16, 16)
    x[1] = 0.5 + 0.01 * x[1]  # a nearly flat image changes differently from the others
    steps = 3
    _, free_deltas = model.refine(x, steps=steps, return_deltas=True)
    per_step = [model.refine(x, steps=t) for t in range(1, steps + 1)]
    first = free_deltas[0].sort().values
    tol = float((first[0] + first[1]) / 2)  # one image stops after the first step
    # Where each image should stop: after the first step whose delta is <= tol.
    stop_after = [next((t + 1 for t in range(steps) if free_deltas[t][i] <= tol), steps) for i in range(3)]
    expected_batches = [sum(1 for i in range(3) if stop_after[i] > t) for t in range(steps)]
    expected_batches = [b for b in expected_batches if b > 0]

    batch_sizes = []
    step = Refiner._step

    def counting_step(self, network, current):
        batch_sizes.append(current.shape[0])
        return step(self, network, current)
    monkeypatch.setattr(Refiner, "_step", counting_step)
    got, got_deltas = model.refine(x, steps=steps, tol=tol, return_deltas=True)
    assert batch_sizes == expected_batches and batch_sizes[1] < 3
    for i in range(3):
        assert _relative_error(got[i], per_step[stop_after[i] - 1][i]) <= 1e-5, i
        for t in range(stop_after[i], steps):
            assert got_deltas[t][i] == 0
        for t in range(stop_after[i]):
            assert abs(float(got_deltas[t][i] - free_deltas[t][i])) <= 1e-5 * float(free_deltas[t][i])


def test_all_stopped_ends_the_loop(model):
    x = torch.rand(2, 3, 16, 16)
    got, deltas = model.refine(x, steps=3, tol=1e9, return_deltas=True)
    assert torch.equal(got, model.refine(x, steps=1))
    assert len(deltas) == 3 and (deltas[1] == 0).all() and (deltas[2] == 0).all()


def test_buffers_are_reused_and_memory_is_flat_in_steps(model):
    x = torch.rand(2, 3, 16, 24)
    refiner = Refiner(model, steps=1)
    refiner(x)
    state = refiner.state(x.device)
    pointer, held = state.current().data_ptr(), state.nbytes()
    Refiner(model, steps=5)(x)  # a new refiner on the same model shares its state
    assert state.current().data_ptr() == pointer and state.nbytes() == held
    assert held == 2 * x.numel() * x.element_size() + 2 * (4 + 1)  # current, previous, deltas, mask
    Refiner(model, steps=1)(torch.rand(1, 3, 16, 16))
    assert state.current().data_ptr() != pointer or state.nbytes() != held


def test_peak_memory_does_not_grow_with_steps(model):
    import gc
    x = torch.rand(2, 3, 48, 48)

    def peak_extra(steps):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status("VmRSS")
        model.refine(x, steps=steps)
        return _status("VmHWM") - before

    peak_extra(1)  # warm: allocator pools, oneDNN primitives
    one, four = peak_extra(1), peak_extra(4)
    assert four <= one * 1.25 + (4 << 20), (one, four)


def _status(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def test_the_last_pass_releases_each_feature_after_its_last_use(model):
    """decode_releasing takes the refiner's containers over: it equals decode and leaves
    them empty, so the features they alone held are freed during the pass."""
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        encoded = model.encode_all(x)
        privileged = list(model.encode(model.decode(x, encoded)))
        expected = model.decode(x, encoded, privileged)
        features, handed_over = encoded._asdict(), list(privileged)
        got = model.decode_releasing(x, features, handed_over)
    assert torch.equal(got, expected)
    assert features == {} and handed_over == [None, None, None]


def test_weight_changes_invalidate_cached_dictionary_work():
    model = _randomised(SIPLPromptIR(**SMALL)).eval()
    x = torch.rand(1, 3, 16, 16)
    before = model.refine(x, steps=1)
    assert torch.equal(model.refine(x, steps=1), before)
    with torch.no_grad():
        model.privileged_dictionary2.mul_(-1)
    after = model.refine(x, steps=1)
    assert not torch.equal(after, before)
    with sipl_fast.use_backend("reference"):
        assert _relative_error(after, authors_loop(model, x, 1)) <= 2e-4


def test_one_tile_covering_the_image_is_the_untiled_result(model):
    x = torch.rand(1, 3, 30, 22)
    assert torch.equal(model.refine(x, steps=2, tile=32, overlap=8), model.refine(x, steps=2))


class _PointwiseModel(torch.nn.Module):
    """A stand-in network that acts pixel by pixel: tiles must stitch to the untiled result."""
    config = {"inp_channels": 3}

    def encode_all(self, x):
        return Encoded(x, x, x, x)

    def encode(self, x):
        return self.encode_all(x).privileged

    def decode(self, x, encoded, privileged_features=None):
        return 0.5 * x + 0.25 if privileged_features is None else x * x + 0.1 * privileged_features[0]

    def decode_releasing(self, x, encoded, privileged=None):
        return self.decode(x, encoded, privileged)

    def forward(self, x):
        return self.decode(x, self.encode_all(x))


def test_overlapping_tiles_blend_to_the_untiled_result():
    stand_in = _PointwiseModel()
    x = torch.rand(2, 3, 45, 70)
    untiled, deltas = Refiner(stand_in, steps=2, return_deltas=True)(x)
    tiled, tiled_deltas = Refiner(stand_in, steps=2, tile=24, overlap=8, return_deltas=True)(x)
    torch.testing.assert_close(tiled, untiled, rtol=1e-6, atol=1e-6)
    assert len(tiled_deltas) == 2


def test_tiles_of_the_real_model_stay_close(model):
    x = torch.rand(1, 3, 48, 48)
    untiled = model.refine(x, steps=1)
    tiled = model.refine(x, steps=1, tile=32, overlap=16)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()


def test_bad_arguments():
    model = SIPLPromptIR.from_preset("tiny")
    with pytest.raises(ValueError, match="steps"):
        model.refine(torch.rand(1, 3, 8, 8), steps=-1)
    with pytest.raises(ValueError, match="tile"):
        model.refine(torch.rand(1, 3, 8, 8), tile=12)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.refine(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="cuda_graph"):
        Refiner(model, cuda_graph=True, tol=0.1)


def test_state_factory_matches_the_build():
    state = extension.IterationState(torch.device("cpu"))
    assert hasattr(state, "step_rows") and hasattr(state, "nbytes")


def test_strips_equal_the_dense_computation(model, monkeypatch):
    from sipl_fast import modules
    x = torch.rand(2, 3, 24, 16)
    dense = model.refine(x, steps=1)
    heights = {"ffn": [], "qkv": []}
    ffn, qkv = modules.GatedFFN._gated, modules.TransposedAttention._projected_channels

    def counting_ffn(self, part):
        heights["ffn"].append(part.shape[-2])
        return ffn(self, part)

    def counting_qkv(self, part, first, count):  # the streamed MDTA's q/k and v projections
        heights["qkv"].append(part.shape[-2])
        return qkv(self, part, first, count)
    monkeypatch.setattr(modules.GatedFFN, "_gated", counting_ffn)
    monkeypatch.setattr(modules.TransposedAttention, "_projected_channels", counting_qkv)
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cpu", 4000)  # a few rows per strip
    strips = model.refine(x, steps=1)
    assert min(heights["ffn"]) < 12 and min(heights["qkv"]) < 12  # strips (with halos) really ran
    assert _relative_error(strips, dense) <= 1e-5


@pytest.mark.gpu
def test_cuda_refine_and_graph_replay_equal_the_authors_loop():
    model = _randomised(SIPLPromptIR(**SMALL)).eval().cuda()
    x = torch.rand(2, 3, 40, 56, device="cuda")
    with sipl_fast.use_backend("reference"):
        expected = authors_loop(model, x, 2)
    assert _relative_error(model.refine(x, steps=2), expected) <= 1e-3
    graphed = Refiner(model, steps=2, cuda_graph=True)
    first = graphed(x)
    again = graphed(torch.flip(x, dims=[0]))  # replays the captured step on new contents
    assert _relative_error(first, expected) <= 1e-3
    assert _relative_error(again, torch.flip(expected, dims=[0])) <= 1e-3
    nhwc = Refiner(model, steps=2, cuda_graph=True, channels_last=True)
    assert _relative_error(nhwc(x), expected) <= 1e-3


@pytest.mark.gpu
def test_cuda_graph_records_the_graph_kernels(monkeypatch):
    """A refinement graph's warm-up and capture run the kernels of ops.graph_kernels("refine")
    (the depthwise kernels, LayerNorm2d's on small maps too); eager refinement runs ATen's."""
    import collections
    from sipl_fast.ops import layer_norm2d_triton, pointwise_depthwise_gate_triton, pointwise_depthwise_triton
    monkeypatch.delenv("SIPL_FAST_KERNELS", raising=False)
    calls = collections.Counter()
    for module, name in ((pointwise_depthwise_triton, "depthwise3x3"),
                         (pointwise_depthwise_gate_triton, "depthwise3x3_gate"),
                         (layer_norm2d_triton, "layer_norm2d_forward")):
        def counted(*args, _original=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    model = _randomised(SIPLPromptIR(**SMALL)).eval().cuda()
    x = torch.rand(1, 3, 40, 56, device="cuda")  # maps far below LayerNorm2d's eager size rule
    with sipl_fast.use_backend("reference"):
        expected = authors_loop(model, x, 2)
    eager = model.refine(x, steps=2, cuda_graph=False)
    assert not calls
    plain_graph = Refiner(model, steps=2, cuda_graph=True, graph_kernels=False)(x)
    assert not calls, "graph_kernels=False records what eager calls run"
    replayed = Refiner(model, steps=2, cuda_graph=True)(x)
    assert set(calls) == {"depthwise3x3", "depthwise3x3_gate", "layer_norm2d_forward"}, calls
    assert _relative_error(eager, expected) <= 1e-3 and _relative_error(replayed, expected) <= 1e-3
    assert _relative_error(plain_graph, expected) <= 1e-3
