"""Loading of the compiled extension ``sipl_fast._C`` and the Python side of its ops.

The package works without the extension (every op has a torch fallback); when ``_C`` is
missing or fails to load, one warning says why. Fake (meta) implementations registered here
let torch.compile and FakeTensor tracing see the C++ ops' output shapes.

Ops of a refinement run (all inference-only, no autograd):

- ``step_delta(prev, new)``: per-image mean |new - prev| (float32).
- ``step_update(current, previous, new, blend=0.0, rows=None)``: one step in one pass,
  previous <- current, current <- new + blend * (current - new), returns the per-image mean
  |current - previous| after the update; with ``rows``, image i of ``new`` updates row
  ``rows[i]`` of current/previous.
- ``active_indices(deltas, tol)``: ascending int64 indices of the images with delta > tol.
- ``scatter_rows(dst, index, src)``: dst[index[i]] = src[i] along dim 0.
- ``IterationState()``: the buffers of a refinement run (the C++ class
  ``torch.classes.sipl_fast.IterationState`` or its pure-torch twin :class:`TorchIterationState`).

Per-image means are deterministic: float64 sums on the CPU in a fixed chunk order, float32
two-pass sums in a fixed order on CUDA.
"""
from __future__ import annotations

import warnings

import torch

LOAD_ERROR: str | None = None
BUILD_INFO: dict = {}


def _load() -> bool:
    global LOAD_ERROR, BUILD_INFO
    try:
        from .._build_info import BUILD_INFO as info
    except ImportError:
        info = {}
    BUILD_INFO = dict(info)
    built_for = info.get("torch_version")
    if built_for is not None and built_for.split("+")[0] != torch.__version__.split("+")[0]:
        LOAD_ERROR = (f"sipl_fast._C was built against torch {built_for} but torch {torch.__version__} "
                      "is running; rebuild with: pip install --no-build-isolation -e .")
        return False
    try:
        from .. import _C  # noqa: F401  (registers the ops with the dispatcher)
    except ImportError as exc:
        LOAD_ERROR = f"sipl_fast._C could not be loaded ({exc}); build it with: pip install --no-build-isolation -e ."
        return False
    return True


LOADED = _load()
if not LOADED:
    warnings.warn(f"{LOAD_ERROR} Falling back to pure-torch implementations.", RuntimeWarning, stacklevel=2)


def built_with_cuda() -> bool:
    """True when the loaded extension has its CUDA kernels compiled in."""
    return LOADED and bool(torch.ops.sipl_fast.built_with_cuda())


def has_kernels_for(device: torch.device | str) -> bool:
    """True when the extension has kernels for tensors on ``device`` (CPU, or CUDA if compiled)."""
    kind = torch.device(device).type
    return LOADED and (kind == "cpu" or (kind == "cuda" and built_with_cuda()))


# ---------------------------------------------------------------------------- fake kernels
if LOADED:
    @torch.library.register_fake("sipl_fast::step_delta")
    def _step_delta_fake(prev, new):
        torch._check(prev.shape == new.shape, lambda: "step_delta: shapes differ")
        return prev.new_empty((prev.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("sipl_fast::step_update")
    def _step_update_fake(current, previous, new, blend, rows=None):
        return new.new_empty((new.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("sipl_fast::active_indices")
    def _active_indices_fake(deltas, tol):
        count = torch.library.get_ctx().new_dynamic_size()  # data-dependent, like torch.nonzero
        return deltas.new_empty((count,), dtype=torch.int64)

    @torch.library.register_fake("sipl_fast::scatter_rows")
    def _scatter_rows_fake(dst, index, src):
        return None


# ---------------------------------------------------------------------------- checks
# The same rules as csrc/checks.h, so the fallbacks reject what the C++ ops reject.
def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory spans of a and b intersect (conservative for strided tensors)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        start = t.data_ptr()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return start, start + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_rows_like(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() < 1 or b.dim() < 1 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{op}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must be batched "
                         "and agree beyond the batch dimension")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{op}: {name_a} is {a.dtype}@{a.device} but {name_b} is {b.dtype}@{b.device}")


def _check_writable(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} is written in place and must be contiguous")


def _check_no_overlap(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if _overlaps(a, b):
        raise ValueError(f"{op}: {name_a} and {name_b} share memory; pass separate buffers")


def _check_row_index(op: str, index: torch.Tensor, count: int, limit: int, rows_of: torch.Tensor) -> None:
    if index.dim() != 1 or index.shape[0] != count:
        raise ValueError(f"{op}: expected a 1-D index of {count} entries, got shape {tuple(index.shape)}")
    if index.dtype != torch.int64 or index.device != rows_of.device:
        raise ValueError(f"{op}: index must be int64 on {rows_of.device}, got {index.dtype}@{index.device}")
    if index.device.type != "cpu" or count == 0:
        return  # a device index is checked by the kernel (no host sync here)
    if int(index.min()) < 0 or int(index.max()) >= limit:
        raise ValueError(f"{op}: index out of range for {limit} rows: {index.tolist()}")
    if index.unique().numel() != count:
        raise ValueError(f"{op}: index has repeated entries (each row may be written once): {index.tolist()}")


def _check_step_update(current, previous, new, rows) -> None:
    op = "step_update"
    _check_rows_like(op, "current", current, "previous", previous)
    if current.shape != previous.shape:
        raise ValueError(f"{op}: current {tuple(current.shape)} and previous {tuple(previous.shape)} "
                         "must have the same shape")
    _check_rows_like(op, "current", current, "new", new)
    if not current.is_floating_point():
        raise ValueError(f"{op}: expected floating tensors, got {current.dtype}")
    if rows is not None:
        _check_row_index(op, rows, new.shape[0], current.shape[0], current)
    elif new.shape[0] != current.shape[0]:
        raise ValueError(f"{op}: new has {new.shape[0]} images but current has {current.shape[0]}; "
                         "pass rows to update a subset")
    _check_writable(op, "current", current)
    _check_writable(op, "previous", previous)
    _check_no_overlap(op, "current", current, "previous", previous)
    _check_no_overlap(op, "current", current, "new", new)
    _check_no_overlap(op, "previous", previous, "new", new)


# ---------------------------------------------------------------------------- torch fallbacks
def _op_math(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic type of the kernels: float32 for half/bfloat16/float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean |a - b|: differences in op-math type, sums in float64, float32 result."""
    if a.shape[0] == 0 or a[0].numel() == 0:
        return torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    math = _op_math(a.dtype)
    diff = (a.to(math) - b.to(math)).abs()
    return diff.reshape(a.shape[0], -1).to(torch.float64).mean(1).to(torch.float32)


def _step_delta_torch(prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return _mean_abs_diff(new, prev)


def _step_update_torch(current, previous, new, blend, rows=None) -> torch.Tensor:
    math = _op_math(current.dtype)
    old = current if rows is None else current.index_select(0, rows)
    new_math = new.to(math)
    blended = (new_math + blend * (old.to(math) - new_math)).to(current.dtype)
    deltas = _mean_abs_diff(blended, old)  # before the writes: without rows, old is current itself
    if rows is None:
        previous.copy_(current)
        current.copy_(blended)
    else:
        previous.index_copy_(0, rows, old)
        current.index_copy_(0, rows, blended)
    return deltas


def _active_indices_torch(deltas: torch.Tensor, tol: float) -> torch.Tensor:
    return torch.nonzero(deltas > tol).flatten()


def _scatter_rows_torch(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    dst.index_copy_(0, index, src)


# ---------------------------------------------------------------------------- public ops
def step_delta(prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-image mean |new - prev| (float32), the convergence measure of a refinement step."""
    if prev.shape != new.shape or prev.dtype != new.dtype or prev.device != new.device:
        raise ValueError(
            f"step_delta: prev {tuple(prev.shape)} {prev.dtype}@{prev.device} and new "
            f"{tuple(new.shape)} {new.dtype}@{new.device} must match in shape, dtype and device"
        )
    if has_kernels_for(new.device):
        return torch.ops.sipl_fast.step_delta(prev, new)
    return _step_delta_torch(prev, new)


def step_update(current: torch.Tensor, previous: torch.Tensor, new: torch.Tensor, blend: float = 0.0,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """One refinement step in place; returns the per-image float32 mean |current - previous|.

    previous <- current; current <- new + blend * (current - new) (blend=0: the authors' loop,
    current <- new). current and previous are contiguous buffers of the same shape; new,
    current and previous must not share memory. With ``rows`` (int64, distinct), image i of
    ``new`` updates row ``rows[i]`` and the result has one delta per image of ``new``.
    """
    _check_step_update(current, previous, new, rows)
    if has_kernels_for(current.device):
        return torch.ops.sipl_fast.step_update(current, previous, new, float(blend), rows)
    return _step_update_torch(current, previous, new, float(blend), rows)


def active_indices(deltas: torch.Tensor, tol: float) -> torch.Tensor:
    """Ascending int64 indices of the images whose delta exceeds ``tol`` (NaN counts as finished).

    On CUDA the result size is read back from the device (one sync, like torch.nonzero).
    """
    if deltas.dim() != 1 or not deltas.is_floating_point():
        raise ValueError(f"active_indices: expected 1-D floating deltas, got {deltas.dtype} {tuple(deltas.shape)}")
    if has_kernels_for(deltas.device):
        return torch.ops.sipl_fast.active_indices(deltas, float(tol))
    return _active_indices_torch(deltas, float(tol))


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index[i]] = src[i] along dim 0, in place (dst contiguous; index int64, distinct)."""
    op = "scatter_rows"
    _check_rows_like(op, "dst", dst, "src", src)
    _check_row_index(op, index, src.shape[0], dst.shape[0], dst)
    _check_writable(op, "dst", dst)
    _check_no_overlap(op, "dst", dst, "src", src)
    if has_kernels_for(dst.device):
        torch.ops.sipl_fast.scatter_rows(dst, index, src)
    else:
        _scatter_rows_torch(dst, index, src)


# ---------------------------------------------------------------------------- iteration state
class TorchIterationState:
    """Pure-torch twin of ``torch.classes.sipl_fast.IterationState`` (same methods, same results).

    Owns the buffers of one refinement run: current and previous image, float32 per-image
    deltas, a bool active mask and named feature maps. Buffers are allocated once per (batch,
    shape, dtype, device) and reused by later runs of the same shape, so a run's memory does not
    grow with its number of steps and buffer addresses stay fixed. Buffers are ordinary tensors
    even when allocated under torch.inference_mode().
    """

    def __init__(self):
        self._current = self._previous = self._deltas = self._active = None
        self._features: dict[str, torch.Tensor] = {}

    @staticmethod
    def _matches(buffer, like: torch.Tensor) -> bool:
        return (buffer is not None and buffer.shape == like.shape and buffer.dtype == like.dtype
                and buffer.device == like.device)

    @staticmethod
    def _allocate(shape, dtype, device) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.empty(shape, dtype=dtype, device=device)

    def _require(self, buffer):
        if buffer is None:
            raise RuntimeError("IterationState: no buffers yet; call prepare(image) first")
        return buffer

    def prepare(self, like_image: torch.Tensor) -> bool:
        """Buffers shaped like the image batch; True when allocated, False when reused.

        Resets deltas to +inf and active to True (a new run); image contents are left as they are.
        """
        if like_image.dim() < 1 or not like_image.is_floating_point():
            raise RuntimeError("IterationState.prepare: expected a batched floating image tensor, got "
                               f"{like_image.dtype} of shape {tuple(like_image.shape)}")
        allocate = not self._matches(self._current, like_image)
        if allocate:
            self._current = self._previous = None  # free the old pair before allocating the new one
            shape, dtype, device = like_image.shape, like_image.dtype, like_image.device
            self._current = self._allocate(shape, dtype, device)
            self._previous = self._allocate(shape, dtype, device)
            self._deltas = self._allocate((shape[0],), torch.float32, device)
            self._active = self._allocate((shape[0],), torch.bool, device)
        self._deltas.fill_(float("inf"))
        self._active.fill_(True)
        return allocate

    def start(self, image: torch.Tensor) -> bool:
        """prepare(image), then copy image into current."""
        allocated = self.prepare(image)
        self._current.copy_(image)
        return allocated

    def prepared(self) -> bool:
        return self._current is not None

    def current(self) -> torch.Tensor:
        return self._require(self._current)

    def previous(self) -> torch.Tensor:
        return self._require(self._previous)

    def deltas(self) -> torch.Tensor:
        return self._require(self._deltas)

    def active(self) -> torch.Tensor:
        return self._require(self._active)

    def feature(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Persistent buffer for a named feature map shaped like ``like``; reused while it matches."""
        buffer = self._features.get(name)
        if not self._matches(buffer, like):
            self._features.pop(name, None)
            buffer = self._features[name] = self._allocate(like.shape, like.dtype, like.device)
        return buffer

    def step(self, new: torch.Tensor, blend: float) -> torch.Tensor:
        """step_update on the whole batch; stores the deltas and returns them (a new tensor)."""
        self._require(self._current)
        deltas = step_update(self._current, self._previous, new, blend)
        self._deltas.copy_(deltas)
        return deltas

    def step_rows(self, rows: torch.Tensor, new: torch.Tensor, blend: float) -> torch.Tensor:
        """A step of the images ``rows`` only (image i of new -> row rows[i]); returns all B deltas."""
        self._require(self._current)
        deltas = step_update(self._current, self._previous, new, blend, rows)
        scatter_rows(self._deltas, rows, deltas)
        return self._deltas.clone()

    def active_rows(self, tol: float) -> torch.Tensor:
        """Sets active = deltas > tol; returns the ascending indices of the active images."""
        self._require(self._current)
        self._active.copy_(self._deltas > tol)
        return active_indices(self._deltas, tol)

    def nbytes(self) -> int:
        """Bytes held by every buffer (images, deltas, mask, features)."""
        buffers = [self._current, self._previous, self._deltas, self._active, *self._features.values()]
        return sum(b.nbytes for b in buffers if b is not None)

    def release(self) -> None:
        """Frees every buffer; the next prepare allocates again."""
        self._current = self._previous = self._deltas = self._active = None
        self._features.clear()


def IterationState(device: torch.device | str | None = None):
    """A new iteration state: ``torch.classes.sipl_fast.IterationState`` when the extension is
    loaded (and, if ``device`` is given, has kernels for it), else :class:`TorchIterationState`.
    Both have the same methods. Pass the device when a CUDA run may meet a CPU-only build."""
    usable = LOADED if device is None else has_kernels_for(device)
    return torch.classes.sipl_fast.IterationState() if usable else TorchIterationState()
