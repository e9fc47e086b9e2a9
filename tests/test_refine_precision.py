"""Refinement in bfloat16/float16 (Refiner(dtype=...)), the CPU's bf16 formulations of the torch
backend, and refine()'s CUDA graph cache."""
from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR, modules
from sipl_fast.ops import reference, torch_impl
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


# --------------------------------------------------------------------------- the CPU's bf16 formulations
# Each within 2x the error of the reference formulation run in bf16, both against the reference in
# float64 (FlashAttention's rule).
def _within_twice_the_bf16_reference(got: torch.Tensor, reference_bf16: torch.Tensor, truth: torch.Tensor) -> None:
    reference_error = _relative_error(reference_bf16.double(), truth)
    assert 0 < reference_error < 0.05
    assert _relative_error(got.double(), truth) <= 2 * reference_error


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batches", [(2, 2), (1, 2), (2, 1)], ids=["batch", "broadcast q", "broadcast kv"])
@pytest.mark.parametrize("layout", [_channels_last, torch.Tensor.contiguous], ids=["channels_last", "nchw"])
def test_bf16_proxy_attention_in_query_pieces(monkeypatch, batches, layout):
    """bf16 on the CPU without autograd: softmax(q k^T) v by pieces of queries, one logits buffer."""
    monkeypatch.setattr(torch_impl, "ATTENTION_PIECE_ELEMENTS", 2 * 70 * 24)   # 24 queries a piece, a short last one
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batches[0], 32, 10, 10, generator=g, dtype=torch.float64)   # 100 queries
    k, v = (torch.randn(batches[1], 32, 7, 10, generator=g, dtype=torch.float64) for _ in range(2))   # 70 keys
    temperature = 0.5 + 4 * torch.rand(2, 1, 1, generator=g, dtype=torch.float64)
    truth = reference.proxy_attention(q, k, v, temperature, 2)
    reference_bf16 = reference.proxy_attention(*(t.bfloat16() for t in (q, k, v, temperature)), 2)
    with torch.no_grad(), sipl_fast.use_backend("torch"):
        got = sipl_fast.ops.proxy_attention(*(layout(t.bfloat16()) for t in (q, k, v)), temperature.bfloat16(), 2)
    assert got.dtype == torch.bfloat16 and got.shape == truth.shape
    _within_twice_the_bf16_reference(got, reference_bf16, truth)


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dualgate"])
@pytest.mark.parametrize("layout", [_channels_last, torch.Tensor.contiguous], ids=["channels_last", "nchw"])
def test_bf16_gate_without_autograd_leaves_its_input_alone(dual, layout):
    """The gate over dense copies of the halves (an odd half width: 51 channels)."""
    x = torch.randn(2, 102, 9, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x16 = layout(x.bfloat16())
    before = x16.clone()
    with torch.no_grad(), sipl_fast.use_backend("torch"):
        got = sipl_fast.ops.gated_gelu(x16, dual)
    assert torch.equal(x16, before)
    _within_twice_the_bf16_reference(got, reference.gated_gelu(x.bfloat16(), dual), reference.gated_gelu(x, dual))


def test_bf16_gram_per_matrix_above_the_pixel_threshold():
    """bf16 Gram products of >= GRAM_MM_MIN_PIXELS pixels run as one GEMM per head, on views."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 64, torch_impl.GRAM_MM_MIN_PIXELS // 64 + 1, generator=g, dtype=torch.float64)
    rows = torch_impl.rows(_channels_last(x.bfloat16()), 4)
    with torch.no_grad():
        got = torch_impl.gram(rows[:, :2], rows[:, 2:])
    truth_rows = torch_impl.rows(x, 4)
    truth = truth_rows[:, :2] @ truth_rows[:, 2:].transpose(-2, -1)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 6, 6)
    assert _relative_error(got.double(), truth) <= 2 * 2.0 ** -8


def test_bf16_streamed_mdta_sums_its_strips_in_float32():
    """MDTA without autograd on a map wider than a strip: each strip's Gram matrix and norms in
    bf16, summed over 16 strips in float32; no float32 copy of a strip is made."""
    torch.manual_seed(6)
    block = modules.TransformerBlock(16, 2, 2.66, False, "WithBias").double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        block.attn.temperature.uniform_(0.5, 3)
    x = torch.randn(1, 16, 32, 24, dtype=torch.float64)
    low = copy.deepcopy(block).bfloat16()
    with torch.no_grad():
        with sipl_fast.use_backend("reference"):
            truth = block.attn.add_to(x.clone(), block.norm1) - x
            reference_bf16 = low.attn.add_to(x.bfloat16(), low.norm1).double() - x
        with sipl_fast.use_backend("torch"), modules.strip_budget(5 * 16 * 24 * 2):   # 2-row strips
            assert modules.strip_rows(x, 5 * 16) == 2
            got = low.attn.add_to(_channels_last(x.bfloat16()), low.norm1).double() - x
    _within_twice_the_bf16_reference(got, reference_bf16, truth)


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
