"""Refinement in bfloat16/float16 (Refiner(dtype=...)) and refine()'s CUDA graph cache."""
from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import (EAGER, GraphKey, Refiner, RefinerCache, ThreadRefinerCaches, authors_loop,
                              graph_obstacle, refine, warn_once)

from test_model import _randomised, _relative_error


@pytest.fixture(scope="module")
def model():
    return _randomised(SIPLPromptIR.from_preset("tiny")).eval()


def _snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _float64_authors_loop(model, x, steps):
    with sipl_fast.use_backend("reference"):
        return authors_loop(copy.deepcopy(model).double(), x.double(), steps)


@pytest.mark.parametrize("steps", [0, 2])
def test_bf16_refinement_is_as_accurate_as_torch_in_bf16(model, steps):
    """FlashAttention's rule: within 2x the error of the same computation done by plain torch in
    bf16 (the authors' loop on a bf16 copy of the model, reference backend), both against the
    float64 authors' loop."""
    x = torch.rand(2, 3, 30, 36)  # padded to 32x40 and cropped back
    expected = _float64_authors_loop(model, x, steps)
    with sipl_fast.use_backend("reference"):
        torch_bf16 = authors_loop(copy.deepcopy(model).bfloat16(), x.bfloat16(), steps).double()
    got = Refiner(model, steps=steps, dtype=torch.bfloat16)(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch_error = _relative_error(torch_bf16, expected)
    assert 0 < torch_error < 0.05   # bf16 differs from float64, and not absurdly
    assert _relative_error(got.double(), expected) <= 2 * torch_error


def test_the_model_is_not_changed(model):
    before = _snapshot(model)
    model.refine(torch.rand(1, 3, 16, 16), steps=1, dtype=torch.bfloat16)
    after = model.state_dict()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("change", ["data", "load_state_dict"])
def test_a_weight_change_between_calls_is_seen(change):
    model = _randomised(SIPLPromptIR.from_preset("tiny")).eval()
    x = torch.rand(1, 3, 16, 16)
    refiner = Refiner(model, steps=1, dtype=torch.bfloat16)
    before = refiner(x)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(0.9).add_(0.01)
    if change == "data":   # neither the version counter nor the storage changes
        for p, q in zip(model.parameters(), changed.parameters()):
            p.data.copy_(q.data)
    else:
        model.load_state_dict(changed.state_dict())
    after = refiner(x)
    fresh = Refiner(changed, steps=1, dtype=torch.bfloat16)(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


def test_float16_on_the_cpu_is_one_clear_error(model):
    with pytest.raises(ValueError, match="float16 refinement needs CUDA"):
        model.refine(torch.rand(1, 3, 16, 16), steps=1, dtype=torch.float16)


def test_bad_dtype_is_refused(model):
    with pytest.raises(ValueError, match="dtype must be one of"):
        Refiner(model, steps=1, dtype=torch.float64)


def test_float32_is_exactly_the_default(model):
    x = torch.rand(2, 3, 21, 29)
    assert torch.equal(Refiner(model, steps=2, dtype=torch.float32)(x), Refiner(model, steps=2)(x))
    assert torch.equal(refine(model, x, 2, dtype=torch.float32), Refiner(model, steps=2)(x))


def test_bf16_returns_float32_for_any_floating_input_and_every_option(model):
    x = torch.rand(1, 3, 24, 40)
    expected = Refiner(model, steps=2, dtype=torch.bfloat16)(x)
    assert torch.equal(Refiner(model, steps=2, dtype=torch.bfloat16)(x.double()), expected)
    tiled, deltas = Refiner(model, steps=2, dtype=torch.bfloat16, tile=24, overlap=0, return_deltas=True)(x)
    assert tiled.dtype == torch.float32 and all(d.dtype == torch.float32 for d in deltas)
    stopped = Refiner(model, steps=3, dtype=torch.bfloat16, tol=1e9)(x)
    assert torch.equal(stopped, Refiner(model, steps=1, dtype=torch.bfloat16)(x))


def test_models_copy_and_pickle_after_a_bf16_call(model):
    model.refine(torch.rand(1, 3, 16, 16), steps=1, dtype=torch.bfloat16)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.__dict__["_cast_copies"]._copies == {}
        x = torch.rand(1, 3, 16, 16)
        assert torch.equal(Refiner(clone, steps=1, dtype=torch.bfloat16)(x),
                           Refiner(model, steps=1, dtype=torch.bfloat16)(x))


def test_concurrent_bf16_calls_each_get_their_own_image(model):
    images = [torch.rand(1, 3, 16, 8 * (k + 2)) for k in range(4)]
    expected = [Refiner(model, steps=2, dtype=torch.bfloat16)(x) for x in images]
    results, errors = {}, []

    def work(k):
        try:
            for _ in range(2):
                results[k] = model.refine(images[k], steps=2, dtype=torch.bfloat16)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        assert torch.equal(results[k], expected[k]), k


# --------------------------------------------------------------------------- refine()'s graph cache
def test_refiner_cache_is_a_bounded_lru():
    made = []
    cache = RefinerCache(lambda key: made.append(key) or f"refiner {key}", capacity=2)
    assert cache.get("a") == "refiner a" and cache.get("b") == "refiner b"
    assert cache.get("a") == "refiner a" and made == ["a", "b"]   # a hit makes nothing
    cache.get("c")                                                  # evicts b, the least recent
    assert cache.keys() == ["a", "c"] and len(cache) == 2
    cache.get("b")
    assert made == ["a", "b", "c", "b"] and cache.keys() == ["c", "b"]
    cache.put("c", EAGER)
    assert cache.get("c") is EAGER and cache.keys() == ["b", "c"]
    with pytest.raises(ValueError):
        RefinerCache(lambda key: key, capacity=0)


def test_each_thread_has_its_own_graph_refiners_made_from_the_key(model):
    holder = model.__dict__.setdefault("_graph_refiners", ThreadRefinerCaches())
    key = GraphKey(torch.device("cpu"), (1, 3, 16, 16), torch.float32, 3,
                   tuple(sorted({"dtype": torch.bfloat16, "tile": 64}.items())))
    refiner = holder.get(model).get(key)
    assert holder.get(model).get(key) is refiner and holder.get(model) is holder.get(model)
    assert refiner.cuda_graph and refiner.steps == 3 and refiner.dtype == torch.bfloat16 and refiner.tile == 64
    other_shape = holder.get(model).get(key._replace(shape=(1, 3, 24, 24)))
    # each graph keeps its own state: another shape never reallocates the buffers a graph reads
    assert refiner._state is not None and other_shape._state is not None and other_shape._state is not refiner._state
    other = []
    thread = threading.Thread(target=lambda: other.append(holder.get(model)))
    thread.start()
    thread.join()
    assert other[0] is not holder.get(model) and len(other[0]) == 0
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(clone.__dict__["_graph_refiners"].get(clone)) == 0
    del model.__dict__["_graph_refiners"]


def test_graph_obstacles():
    assert graph_obstacle({}) is None
    assert graph_obstacle({"tile": 64, "overlap": 16, "dtype": torch.bfloat16}) is None
    assert "tol" in graph_obstacle({"tol": 1e-3})
    assert "hashable" in graph_obstacle({"strip_elements": [1]})


def test_warn_once_warns_once_per_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warn_once("test reason one")
        warn_once("test reason two")
    assert [str(w.message).split(": ", 2)[-1] for w in caught] == ["test reason one", "test reason two"]


def test_refine_on_the_cpu_is_the_eager_refiner(model):
    x = torch.rand(1, 3, 16, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(refine(model, x, 2), Refiner(model, steps=2)(x))
        assert torch.equal(refine(model, x, 2, tol=1e-3), Refiner(model, steps=2, tol=1e-3)(x))
    assert "_graph_refiners" not in model.__dict__


# --------------------------------------------------------------------------- CUDA
def _count_captures(monkeypatch):
    captures = []
    original = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "graph", lambda *args, **kwargs: captures.append(1) or original(*args, **kwargs))
    return captures


@pytest.fixture
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.gpu
def test_cuda_refine_replays_a_cached_graph_by_default(monkeypatch, no_tf32):
    model = _randomised(SIPLPromptIR.from_preset("tiny")).eval().cuda()
    captures = _count_captures(monkeypatch)
    x = torch.rand(2, 3, 40, 56, device="cuda")
    with sipl_fast.use_backend("reference"):
        expected = authors_loop(model, x, 2)
    first = model.refine(x, steps=2)
    assert len(captures) == 1 and _relative_error(first, expected) <= 1e-3
    again = model.refine(torch.flip(x, dims=[0]), steps=2)   # same shape: replays
    assert len(captures) == 1 and _relative_error(again, torch.flip(expected, dims=[0])) <= 1e-3
    other = torch.rand(1, 3, 24, 32, device="cuda")
    with sipl_fast.use_backend("reference"):
        other_expected = authors_loop(model, other, 2)
    assert _relative_error(model.refine(other, steps=2), other_expected) <= 1e-3
    assert len(captures) == 2                                 # a new shape captures again
    eager = model.refine(x, steps=2, cuda_graph=False)
    assert len(captures) == 2 and _relative_error(eager, expected) <= 1e-3
    with torch.no_grad():   # a weight change through .data is seen by the replay
        for p in model.parameters():
            p.data.mul_(0.95)
    with sipl_fast.use_backend("reference"):
        changed = authors_loop(model, x, 2)
    assert _relative_error(model.refine(x, steps=2), changed) <= 1e-3 and len(captures) == 2


@pytest.mark.gpu
def test_cuda_bf16_and_fp16_refinement(no_tf32):
    model = _randomised(SIPLPromptIR.from_preset("tiny")).eval().cuda()
    x = torch.rand(1, 3, 40, 56, device="cuda")
    expected = _float64_authors_loop(model, x, 2)
    for dtype in (torch.bfloat16, torch.float16):
        with sipl_fast.use_backend("reference"):
            torch_low = authors_loop(copy.deepcopy(model).to(dtype), x.to(dtype), 2).double()
        for cuda_graph in (False, None):
            got = model.refine(x, steps=2, dtype=dtype, cuda_graph=cuda_graph)
            assert got.dtype == torch.float32
            assert _relative_error(got.double(), expected) <= 2 * _relative_error(torch_low, expected)


@pytest.mark.gpu
def test_cuda_refine_falls_back_to_eager_and_warns_once(monkeypatch, no_tf32):
    import sipl_fast.refine as refine_module
    monkeypatch.setattr(refine_module, "_warned", set())
    model = _randomised(SIPLPromptIR.from_preset("tiny")).eval().cuda()
    captures = _count_captures(monkeypatch)
    x = torch.rand(2, 3, 40, 56, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model.refine(x, steps=2, tol=1e-6)
        second = model.refine(x, steps=2, tol=1e-6)
    assert not captures and len(caught) == 1 and "tol" in str(caught[0].message)
    assert torch.equal(first, second)
    assert torch.equal(first, Refiner(model, steps=2, tol=1e-6)(x))
