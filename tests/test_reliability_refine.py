"""Refinement under concurrency, weight changes the version counter misses, and model copies."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

from sipl_fast import SIPLPromptIR
from sipl_fast.ops import extension
from sipl_fast.refine import Refiner

from test_model import SMALL, _randomised, _relative_error


@pytest.fixture
def model():
    return _randomised(SIPLPromptIR(**SMALL)).eval()


def _in_threads(work, count: int) -> list:
    """work(i) in ``count`` threads at once; their results, or the first error raised."""
    results, errors = [None] * count, []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as exc:  # reported below, with the thread's own error
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_refine_calls_each_get_their_own_image(model, monkeypatch):
    """Three threads start their calls (two of one shape, one of another) before any of them
    runs the network: with one shared iteration state, one thread computed another's image and
    the third's new shape broke the others' step."""
    images = [torch.rand(1, 3, 16, 24), torch.rand(1, 3, 16, 24), torch.rand(2, 3, 24, 16)]
    expected = [model.refine(x, steps=2) for x in images]
    meeting = threading.Barrier(len(images), timeout=300)
    arrived = threading.local()
    encode_all = type(model).encode_all

    def encode_all_after_everyone_started(self, x):
        if not getattr(arrived, "done", False):
            arrived.done = True
            meeting.wait()
        return encode_all(self, x)

    monkeypatch.setattr(type(model), "encode_all", encode_all_after_everyone_started)
    results = _in_threads(lambda i: model.refine(images[i], steps=2), len(images))
    for got, want in zip(results, expected):
        assert got.shape == want.shape and _relative_error(got, want) <= 1e-5


def test_threads_sharing_one_refiner_and_many_shapes(model):
    shapes = [(1, 3, 16, 16), (1, 3, 21, 13), (2, 3, 16, 24), (1, 3, 9, 30)]
    images = [torch.rand(shape) for shape in shapes]
    refiner = Refiner(model, steps=2, return_deltas=True)
    expected = [refiner(x) for x in images]

    def work(i):
        return [refiner(images[(i + k) % len(images)]) for k in range(3)]

    for i, outputs in enumerate(_in_threads(work, len(images))):
        for k, (got, deltas) in enumerate(outputs):
            want, want_deltas = expected[(i + k) % len(images)]
            assert _relative_error(got, want) <= 1e-5
            assert all(torch.allclose(d, w, rtol=1e-4, atol=1e-6) for d, w in zip(deltas, want_deltas))


def _with_new_weights(model: SIPLPromptIR, change: str, source: SIPLPromptIR) -> None:
    """Give ``model`` the weights of ``source`` in one of the ways user code does."""
    pairs = list(zip(model.parameters(), source.parameters()))
    if change == "data_copy":              # weight surgery through .data
        for mine, theirs in pairs:
            mine.data.copy_(theirs.data)
    elif change == "data_ema":             # BasicSR's EMA: ema.data.mul_(decay).add_(net.data, alpha=1 - decay)
        for mine, theirs in pairs:
            mine.data.mul_(0.0).add_(theirs.data, alpha=1.0)
    elif change == "no_grad_copy":
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.copy_(theirs)
    else:
        model.load_state_dict(source.state_dict())


@pytest.mark.parametrize("change", ["data_copy", "data_ema", "no_grad_copy", "load_state_dict"])
def test_refine_follows_every_kind_of_weight_change(model, change):
    x = torch.rand(1, 3, 16, 16)
    before = model.refine(x, steps=2)                   # the dictionary side has been computed
    other = SIPLPromptIR(**SMALL).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + p)
    want = other.refine(x, steps=2)
    _with_new_weights(model, change, other)
    got = model.refine(x, steps=2)
    assert _relative_error(got, want) <= 1e-5
    assert _relative_error(before, want) > 1e-2, "the weights must change the output for the test to mean anything"


def test_evaluation_scope_and_a_kept_scope_refresh_in_place(model):
    """A kept scope (a captured CUDA graph reads its values) is recomputed in place after .data writes."""
    cache = model.dictionary_cache
    x = torch.rand(1, 3, 16, 16)
    scope = cache.new_scope()
    with torch.inference_mode(), cache.scope(scope):
        model(x)
        entries = {key: entry.value for key, entry in cache._entries.items() if key[0] == scope}
        model.privileged_dictionary1.data.mul_(-1.0)
        cache.refresh(scope)
        stale = model(x)
    with torch.inference_mode():
        fresh = model(x)
    assert entries and all(cache._entries[key].value is value for key, value in entries.items())
    assert torch.allclose(stale, fresh, rtol=1e-5, atol=1e-6)
    cache.drop(scope)
    assert not cache._entries


class _UnpicklableState(extension.TorchIterationState):
    """Behaves as the C++ extension's IterationState, which refuses to be serialised."""

    def __reduce_ex__(self, protocol):
        raise RuntimeError("Tried to serialize object __torch__.torch.classes.sipl_fast.IterationState "
                           "which does not have a __getstate__ method defined!")


@pytest.mark.parametrize("when", ["before", "after"])
def test_models_copy_save_and_pickle_before_and_after_refine(model, monkeypatch, when):
    monkeypatch.setattr(extension, "IterationState", lambda device=None: _UnpicklableState())
    x = torch.rand(1, 3, 16, 16)
    if when == "after":
        model.refine(x, steps=2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))]
    want = model.refine(x, steps=2)
    for clone in copies:
        assert clone.dictionary_cache is not model.dictionary_cache and not clone.dictionary_cache._entries
        assert _relative_error(clone.refine(x, steps=2), want) <= 1e-6
        assert clone.state_dict().keys() == model.state_dict().keys()
    # a copy refines on its own state: the original's buffers are not shared
    original = Refiner(model).state(x.device)
    assert all(Refiner(clone).state(x.device) is not original for clone in copies)
