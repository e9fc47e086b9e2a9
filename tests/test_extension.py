"""The C++/CUDA extension's refinement ops and IterationState against torch references.

Every op runs on random, odd-shaped inputs in each dtype it accepts and is compared with the
same arithmetic in float64 (or exactly, where the op only moves data); the torch fallbacks
used without ``_C`` must give the C++ results; torch.library.opcheck checks schemas, fake
kernels and dispatch. CUDA variants are marked ``gpu`` (skipped without a CUDA device).
"""
from __future__ import annotations

import pytest
import torch

from sipl_fast.ops import extension as ext

needs_ext = pytest.mark.skipif(not ext.LOADED, reason=f"sipl_fast._C not loaded: {ext.LOAD_ERROR}")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Shapes of image batches (B first): odd sizes, one image, more elements per image than one
# CPU chunk (32768) and one CUDA chunk (65536), a batch whose images hold one element.
SHAPES = [(3, 3, 17, 23), (1, 5, 9), (2, 3, 129, 131), (7, 1)]
# Per-image means: float64 sums on the CPU; float32 block sums on CUDA (a few ulp per level).
SUM_RTOL = {"cpu": 1e-6, "cuda": 2e-5}
# Rounding of one value in each dtype (relative), for results stored in that dtype.
STORAGE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _images(shape, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)


def _mean_abs_diff64(a, b):
    return (a.double() - b.double()).abs().flatten(1).mean(1)


def _assert_deltas(got, expected64, rtol):
    assert got.dtype == torch.float32 and got.shape == expected64.shape
    torch.testing.assert_close(got.double().cpu(), expected64.cpu(), rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------- step_delta
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_delta_matches_float64(device, dtype, shape):
    prev, new = _images(shape, dtype, device), _images(shape, dtype, device)
    got = torch.ops.sipl_fast.step_delta(prev, new)
    _assert_deltas(got, _mean_abs_diff64(new, prev), rtol=SUM_RTOL[device])


def test_step_delta_cpu_does_not_depend_on_thread_count():
    prev, new = _images((2, 3, 200, 190), torch.float32, "cpu"), _images((2, 3, 200, 190), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.step_delta(prev, new)
        torch.set_num_threads(max(2, threads))
        many = ext.step_delta(prev, new)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---------------------------------------------------------------------------- step_update
def _step_update_float64(current, new, blend):
    """What one step must produce: (current, previous, deltas) from float64 arithmetic."""
    blended = (new.double() + blend * (current.double() - new.double())).to(current.dtype)
    return blended, current.clone(), _mean_abs_diff64(blended, current)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blend", [0.0, 0.3])
def test_step_update_matches_float64(device, dtype, shape, blend):
    current, new = _images(shape, dtype, device), _images(shape, dtype, device)
    previous = torch.full_like(current, 7.0)
    new_before = new.clone()
    want_current, want_previous, want_deltas = _step_update_float64(current, new, blend)

    deltas = torch.ops.sipl_fast.step_update(current, previous, new, blend)

    assert torch.equal(previous, want_previous), "previous must hold the old current exactly"
    assert torch.equal(new, new_before), "new is read only"
    if blend == 0.0:
        assert torch.equal(current, new), "blend=0 is the authors' loop: current <- new exactly"
    else:  # the kernels blend in float32 (float64 for float64): at most one rounding step apart
        torch.testing.assert_close(current.double(), want_current.double(), rtol=STORAGE_RTOL[dtype], atol=1e-6)
    _assert_deltas(deltas, _mean_abs_diff64(current, previous), rtol=SUM_RTOL[device])
    _assert_deltas(deltas, want_deltas, rtol=STORAGE_RTOL[dtype] * 4 + SUM_RTOL[device])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_step_update_with_blend_zero_gives_step_delta(device):
    current, new = _images((3, 3, 40, 37), torch.float32, device), _images((3, 3, 40, 37), torch.float32, device)
    expected = ext.step_delta(current, new)
    deltas = ext.step_update(current, torch.empty_like(current), new, 0.0)
    if device == "cpu":  # same float64 chunked sums
        assert torch.equal(deltas, expected)
    else:
        torch.testing.assert_close(deltas, expected, rtol=1e-6, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_update_rows_touches_only_those_rows(device, dtype):
    shape = (5, 3, 11, 13)
    current, previous = _images(shape, dtype, device), _images(shape, dtype, device)
    rows = torch.tensor([4, 0, 2], device=device)
    new = _images((3, *shape[1:]), dtype, device)
    current_before, previous_before = current.clone(), previous.clone()

    deltas = torch.ops.sipl_fast.step_update(current, previous, new, 0.5, rows)

    want_current, want_previous, want_deltas = _step_update_float64(current_before[rows], new, 0.5)
    untouched = torch.tensor([1, 3], device=device)
    assert torch.equal(current[untouched], current_before[untouched])
    assert torch.equal(previous[untouched], previous_before[untouched])
    assert torch.equal(previous[rows], want_previous)
    torch.testing.assert_close(current[rows].double(), want_current.double(), rtol=STORAGE_RTOL[dtype], atol=1e-6)
    assert deltas.shape == (3,)
    _assert_deltas(deltas, _mean_abs_diff64(current[rows], previous[rows]), rtol=SUM_RTOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_step_update_rejects_shared_memory_and_bad_layouts(device):
    current, new = _images((2, 3, 4, 5), torch.float32, device), _images((2, 3, 4, 5), torch.float32, device)
    previous = torch.empty_like(current)
    with pytest.raises((ValueError, RuntimeError), match="share memory"):
        ext.step_update(current, current, new, 0.0)
    with pytest.raises((ValueError, RuntimeError), match="share memory"):
        ext.step_update(current, previous, current, 0.0)
    with pytest.raises((ValueError, RuntimeError), match="share memory"):
        ext.step_update(current, previous, previous, 0.0)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        ext.step_update(current.transpose(2, 3), previous.transpose(2, 3), new.transpose(2, 3), 0.0)
    with pytest.raises((ValueError, RuntimeError), match="dtypes differ|float64"):
        ext.step_update(current, previous, new.double(), 0.0)
    with pytest.raises((ValueError, RuntimeError), match="images"):
        ext.step_update(current, previous, new[:1], 0.0)
    rows_of = torch.tensor
    for bad_rows, message in [(rows_of([0, 0], device=device), "twice|repeated"),
                              (rows_of([0, 2], device=device), "out of range"),
                              (rows_of([0, 1], device=device, dtype=torch.int32), "int64")]:
        if device == "cuda" and message != "int64":
            continue  # device indices are checked inside the kernel, not on the host
        with pytest.raises((ValueError, RuntimeError), match=message):
            ext.step_update(current, previous, new, 0.0, bad_rows)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_step_update_c_checks_match_python_checks(device):
    """The C++ op itself (no Python wrapper in front) rejects the same inputs."""
    current, new = _images((2, 3, 4), torch.float32, device), _images((2, 3, 4), torch.float32, device)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.sipl_fast.step_update(current, current, new, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.sipl_fast.step_update(current.mT, torch.empty_like(current).mT, new.mT, 0.0)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="twice"):
            torch.ops.sipl_fast.step_update(current, torch.empty_like(current), new, 0.0, torch.tensor([1, 1]))


@needs_ext
def test_step_update_accepts_non_contiguous_new():
    current = _images((2, 3, 6, 5), torch.float32, "cpu")
    new = _images((2, 3, 5, 6), torch.float32, "cpu").transpose(2, 3)
    expected = current.clone()
    expected_deltas = ext._step_update_torch(expected, torch.empty_like(expected), new, 0.2)
    deltas = ext.step_update(current, torch.empty_like(current), new, 0.2)
    assert torch.equal(current, expected)
    torch.testing.assert_close(deltas, expected_deltas, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- active_indices
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("count", [1, 7, 33, 1500])
def test_active_indices_matches_nonzero(device, dtype, count):
    deltas = torch.rand(count, dtype=torch.float64).to(dtype=dtype, device=device)
    tol = 0.4
    got = torch.ops.sipl_fast.active_indices(deltas, tol)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.nonzero(deltas > tol).flatten())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_active_indices_edges(device):
    deltas = torch.tensor([0.5, float("nan"), 0.2, float("inf"), 0.50001, 0.0], device=device)
    assert torch.ops.sipl_fast.active_indices(deltas, 0.5).tolist() == [3, 4]  # strict >, NaN is finished
    assert torch.ops.sipl_fast.active_indices(deltas, 10.0).tolist() == [3]
    assert torch.ops.sipl_fast.active_indices(deltas, -1.0).tolist() == [0, 2, 3, 4, 5]
    assert torch.ops.sipl_fast.active_indices(deltas[:0], 0.0).shape == (0,)


# ---------------------------------------------------------------------------- scatter_rows
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("row_shape", [(3, 5, 7), (1,), (2, 33)])
def test_scatter_rows_matches_index_copy(device, dtype, row_shape):
    dst = (10 * torch.randn(6, *row_shape)).to(dtype=dtype, device=device)
    src = (10 * torch.randn(3, *row_shape)).to(dtype=dtype, device=device)
    index = torch.tensor([5, 0, 3], device=device)
    expected = dst.clone().index_copy_(0, index, src)
    src_before = src.clone()
    torch.ops.sipl_fast.scatter_rows(dst, index, src)
    assert torch.equal(dst, expected)
    assert torch.equal(src, src_before)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rows_unaligned_and_non_contiguous_source(device):
    """Rows of 3 bytes at odd offsets (byte copies) and a transposed source."""
    storage = torch.randint(0, 255, (4 * 3 + 1,), dtype=torch.uint8, device=device)
    dst = storage[1:].view(4, 3)  # base address 1 byte past the allocation
    src = torch.randint(0, 255, (3, 2), dtype=torch.uint8, device=device).t()
    index = torch.tensor([2, 0], device=device)
    expected = dst.clone().index_copy_(0, index, src)
    torch.ops.sipl_fast.scatter_rows(dst, index, src)
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rows_rejects_bad_arguments(device):
    dst = torch.zeros(4, 3, device=device)
    src = torch.ones(2, 3, device=device)
    with pytest.raises((ValueError, RuntimeError), match="beyond the batch"):
        ext.scatter_rows(dst, torch.tensor([0, 1], device=device), torch.ones(2, 4, device=device))
    with pytest.raises((ValueError, RuntimeError), match="entries"):
        ext.scatter_rows(dst, torch.tensor([0], device=device), src)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        ext.scatter_rows(torch.zeros(3, 4, device=device).t(), torch.tensor([0, 1], device=device), src)
    with pytest.raises((ValueError, RuntimeError), match="share memory"):
        ext.scatter_rows(dst, torch.tensor([0, 1], device=device), dst[2:])
    if device == "cpu":
        with pytest.raises((ValueError, RuntimeError), match="repeated|twice"):
            ext.scatter_rows(dst, torch.tensor([1, 1]), src)
        with pytest.raises((ValueError, RuntimeError), match="out of range"):
            ext.scatter_rows(dst, torch.tensor([1, -1]), src)


# ---------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    current = _images((3, 2, 5, 7), torch.float32, device)
    return [
        ("step_delta", (current, _images((3, 2, 5, 7), torch.float32, device))),
        ("step_update", (current.clone(), torch.empty_like(current), _images((3, 2, 5, 7), torch.float32, device),
                         0.25)),
        ("step_update", (current.clone(), torch.empty_like(current), _images((2, 2, 5, 7), torch.float32, device),
                         0.0, torch.tensor([2, 0], device=device))),
        ("active_indices", (torch.rand(9, device=device), 0.5)),
        ("scatter_rows", (torch.zeros(5, 4, 3, device=device), torch.tensor([4, 1], device=device),
                          torch.randn(2, 4, 3, device=device))),
    ]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(5))
def test_opcheck(device, case):
    name, args = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.sipl_fast, name).default, args)


# ---------------------------------------------------------------------------- fallbacks
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fallbacks_equal_the_extension(device, dtype):
    shape = (4, 3, 45, 50)
    prev, new = _images(shape, dtype, device), _images(shape, dtype, device)
    # The CPU kernels and the fallbacks both sum in float64 (in different orders): equal to float32
    # rounding; CUDA sums in float32.
    rtol = SUM_RTOL[device]

    torch.testing.assert_close(ext._step_delta_torch(prev, new), torch.ops.sipl_fast.step_delta(prev, new),
                               rtol=rtol, atol=0)

    for rows in (None, torch.tensor([3, 1], device=device)):
        new_images = new if rows is None else new[:2]
        c_cur, c_prev = prev.clone(), torch.zeros_like(prev)
        t_cur, t_prev = prev.clone(), torch.zeros_like(prev)
        c_deltas = torch.ops.sipl_fast.step_update(c_cur, c_prev, new_images, 0.4, rows)
        t_deltas = ext._step_update_torch(t_cur, t_prev, new_images, 0.4, rows)
        # Same op-math arithmetic; a compiler may fuse the blend into one FMA (nvcc does, gcc on
        # targets with FMA), which is at most one rounding of the stored value apart.
        torch.testing.assert_close(c_cur, t_cur, rtol=STORAGE_RTOL[dtype], atol=1e-6)
        assert torch.equal(c_prev, t_prev)
        torch.testing.assert_close(c_deltas, t_deltas, rtol=rtol, atol=1e-7)

    deltas = torch.rand(40, device=device).to(dtype)
    assert torch.equal(ext._active_indices_torch(deltas, 0.3), torch.ops.sipl_fast.active_indices(deltas, 0.3))

    index = torch.tensor([2, 0], device=device)
    c_dst, t_dst = prev.clone(), prev.clone()
    torch.ops.sipl_fast.scatter_rows(c_dst, index, new[:2])
    ext._scatter_rows_torch(t_dst, index, new[:2])
    assert torch.equal(c_dst, t_dst)


def test_public_ops_fall_back_without_kernels(monkeypatch):
    """With the extension unavailable, the public functions give the same results via torch."""
    current, new = _images((2, 3, 9, 8), torch.float32, "cpu"), _images((2, 3, 9, 8), torch.float32, "cpu")
    with_ext = (ext.step_delta(current, new), ext.active_indices(torch.tensor([0.1, 0.9]), 0.5))
    monkeypatch.setattr(ext, "LOADED", False)
    assert not ext.has_kernels_for("cpu")
    torch.testing.assert_close(ext.step_delta(current, new), with_ext[0], rtol=0, atol=0)
    assert torch.equal(ext.active_indices(torch.tensor([0.1, 0.9]), 0.5), with_ext[1])
    assert isinstance(ext.IterationState(), ext.TorchIterationState)


# ---------------------------------------------------------------------------- IterationState
def _states():
    cases = [pytest.param(ext.TorchIterationState, id="torch")]
    if ext.LOADED:
        cases.append(pytest.param(lambda: torch.classes.sipl_fast.IterationState(), id="cpp"))
    return cases


STATE_DEVICES = [("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("make_state", _states())
@pytest.mark.parametrize("device", STATE_DEVICES)
def test_iteration_state_reuses_buffers_of_the_same_shape(make_state, device):
    state = make_state()
    image = _images((2, 3, 16, 24), torch.float32, device)
    assert not state.prepared()
    assert state.prepare(image) is True
    pointers = [t.data_ptr() for t in (state.current(), state.previous(), state.deltas(), state.active())]
    assert state.current().shape == image.shape and state.current().dtype == image.dtype
    assert state.deltas().shape == (2,) and state.deltas().dtype == torch.float32
    assert state.active().shape == (2,) and state.active().dtype == torch.bool

    assert state.prepare(image.clone()) is False
    assert state.start(_images((2, 3, 16, 24), torch.float32, device)) is False
    assert pointers == [t.data_ptr() for t in (state.current(), state.previous(), state.deltas(), state.active())]

    assert state.prepare(image[:1]) is True  # new batch size: new storage
    assert state.current().shape == (1, 3, 16, 24)
    assert state.prepare(image.double()) is True  # new dtype
    assert state.current().dtype == torch.float64


@pytest.mark.parametrize("make_state", _states())
@pytest.mark.parametrize("device", STATE_DEVICES)
def test_iteration_state_steps_like_step_update(make_state, device):
    state = make_state()
    x0 = _images((3, 3, 10, 14), torch.float32, device)
    assert state.start(x0) is True
    assert torch.equal(state.current(), x0)
    assert torch.isinf(state.deltas()).all() and state.active().all()  # a new run: all active

    reference_current, reference_previous = x0.clone(), torch.empty_like(x0)
    history = []
    for step in range(3):
        new = _images(x0.shape, torch.float32, device)
        deltas = state.step(new, 0.1)
        expected = ext.step_update(reference_current, reference_previous, new, 0.1)
        assert torch.equal(deltas, expected) and torch.equal(state.deltas(), expected)
        assert torch.equal(state.current(), reference_current)
        assert torch.equal(state.previous(), reference_previous)
        history.append(deltas)
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(history, history[1:])), \
        "returned deltas are new tensors, safe to keep per step"

    # Early stop: image 1 converges; a step of the others leaves it (and its delta) alone.
    state.deltas().copy_(torch.tensor([0.5, 1e-4, 0.7], device=device))
    active = state.active_rows(1e-3)
    assert active.tolist() == [0, 2]
    assert state.active().tolist() == [True, False, True]
    frozen = state.current()[1].clone()
    new = _images((2, *x0.shape[1:]), torch.float32, device)
    all_deltas = state.step_rows(active, new, 0.0)
    assert torch.equal(state.current()[1], frozen)
    assert torch.equal(state.current()[active], new)
    assert all_deltas[1].item() == pytest.approx(1e-4)
    torch.testing.assert_close(all_deltas[active], _mean_abs_diff64(new, state.previous()[active]).float(),
                               rtol=SUM_RTOL[device], atol=0)


@pytest.mark.parametrize("make_state", _states())
def test_iteration_state_features_and_byte_count(make_state):
    state = make_state()
    assert state.nbytes() == 0
    image = _images((2, 3, 8, 8), torch.float32, "cpu")
    state.prepare(image)
    image_bytes = 2 * image.nbytes + 2 * 4 + 2 * 1  # current, previous, deltas, active
    assert state.nbytes() == image_bytes

    like = torch.randn(2, 96, 4, 4, dtype=torch.float16)
    enc = state.feature("enc_level2", like)
    assert enc.shape == like.shape and enc.dtype == like.dtype
    assert state.feature("enc_level2", torch.randn(2, 96, 4, 4, dtype=torch.float16)).data_ptr() == enc.data_ptr()
    latent = state.feature("latent", torch.randn(2, 384, 1, 1))
    assert state.nbytes() == image_bytes + enc.nbytes + latent.nbytes
    resized = state.feature("enc_level2", torch.randn(2, 96, 8, 8, dtype=torch.float16))
    assert resized.shape == (2, 96, 8, 8)
    assert state.nbytes() == image_bytes + resized.nbytes + latent.nbytes

    # Memory stays flat over steps: a step allocates nothing that the state keeps.
    before = state.nbytes()
    state.start(image)
    for _ in range(5):
        state.step(_images(image.shape, torch.float32, "cpu"), 0.0)
        assert state.nbytes() == before

    state.release()
    assert state.nbytes() == 0 and not state.prepared()
    with pytest.raises(RuntimeError, match="prepare"):
        state.current()
    assert state.prepare(image) is True  # allocates again after release


@pytest.mark.parametrize("make_state", _states())
def test_iteration_state_prepared_in_inference_mode_works_outside(make_state):
    state = make_state()
    with torch.inference_mode():
        image = torch.randn(2, 3, 8, 8)
        state.start(image)
        state.step(torch.randn(2, 3, 8, 8), 0.0)
    assert not state.current().is_inference()
    deltas = state.step(torch.randn(2, 3, 8, 8), 0.5)  # in place outside inference mode
    assert deltas.shape == (2,)


def test_iteration_state_factory():
    state = ext.IterationState()
    if ext.LOADED:
        assert isinstance(state, torch.ScriptObject)
        assert isinstance(ext.IterationState("cpu"), torch.ScriptObject)
    else:
        assert isinstance(state, ext.TorchIterationState)
    if not ext.has_kernels_for("cuda"):
        assert isinstance(ext.IterationState("cuda"), ext.TorchIterationState)


@needs_ext
@pytest.mark.gpu
def test_iteration_state_step_replays_in_a_cuda_graph():
    """The state's buffers never move, so a captured step replays on them (what Refiner's
    cuda_graph option relies on)."""
    state = ext.IterationState("cuda")
    x0 = torch.randn(2, 3, 16, 24, device="cuda")
    new = torch.randn_like(x0)  # the graph's static input
    state.start(x0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        state.step(new, 0.25)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        state.step(new, 0.25)
    assert state.start(x0) is False  # same buffers as captured

    reference_current, reference_previous = x0.clone(), torch.empty_like(x0)
    for _ in range(3):
        graph.replay()
        expected = ext.step_update(reference_current, reference_previous, new, 0.25)
        torch.cuda.synchronize()
        assert torch.equal(state.current(), reference_current)
        assert torch.equal(state.previous(), reference_previous)
        assert torch.equal(state.deltas(), expected)
