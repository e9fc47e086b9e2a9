"""Test-time self-refinement at close to the unavoidable cost.

The authors' loop, per step t: y0 = f(x); PI = encode(y0); y = f(x, PI); x <- y. It runs the
encoder of x twice (once in each pass) and rebuilds the dictionary projections every pass.
:class:`Refiner` computes the same outputs while

- running the encoder of x once per step and sharing it between both passes;
- reusing the dictionary-only projections (SIPLPromptIR's DictionaryCache);
- running without autograd, with the image state in an ``IterationState`` of the C++
  extension (one per model, device and thread, allocated once per shape and reused across
  steps and calls), so memory does not grow with the number of steps and calls from several
  threads never share buffers;
- optionally stopping images whose per-step change falls below ``tol`` (the batch is
  compacted so finished images cost nothing), tiling large images, running the network in
  bfloat16 or float16 (``dtype``), and capturing a step in a CUDA graph.

:func:`refine` (what ``model.refine`` calls) replays CUDA graphs by default on CUDA.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import threading
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import ops
from .modules import strip_budget
from .ops import extension


# The precisions a refinement runs in (None: the model's own).
REFINE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# Graph-capturing Refiners that refine() keeps per model and thread (each holds a graph and its
# memory pool).
GRAPH_CACHE_SIZE = 4


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple (reflect as the authors; replicate where reflect cannot)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def authors_loop(model, x: torch.Tensor, steps: int = 2, pad_to: int = 8) -> torch.Tensor:
    """The released test loop, literally: two full passes per step, no sharing, no caching.

    The baseline of benchmarks and tests (pair it with ``use_backend("reference")`` for the
    authors' arithmetic too). steps=0 returns the plain pass; otherwise no pass runs beyond
    the steps' own (per step: 2 full forwards and 1 encoder pass of the plain output). Nothing
    is cached: the dictionary cache works only inside a refinement call's scope.
    """
    h, w = x.shape[-2:]
    with torch.no_grad():
        current = pad_to_multiple(x, pad_to)
        output = model(current) if steps == 0 else None
        for _ in range(steps):
            initial = model(current)
            output = model(current, privileged_features=model.encode(initial))
            current = output
    return output[..., :h, :w]


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device, dtype) -> torch.Tensor:
    """1-D blending weight of a tile: linear ramps over the overlap where a neighbour exists."""
    weight = torch.ones(length, device=device, dtype=dtype)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=dtype) / (overlap + 1)
        if not at_start:
            weight[:overlap] = ramp
        if not at_end:
            weight[-overlap:] = ramp.flip(0)
    return weight


class Refiner:
    """Multi-step self-refinement of a SIPLPromptIR. ``Refiner(model, steps=2)(x)``.

    Inference only: it runs under torch.inference_mode (train with the model's forward).
    Several threads may refine with one model (or one Refiner) at once: each thread works in
    its own IterationState and dictionary-cache scope; calls through one Refiner with
    ``cuda_graph=True`` take turns (they replay one graph).

    Args:
        steps: refinement steps T (0 returns the plain pass).
        tol: stop an image once its mean |x_t - x_{t-1}| is <= tol (None: never).
        blend: x_t = y_t + blend * (x_{t-1} - y_t); 0 is the authors' loop.
        return_deltas: also return the per-step per-image deltas (list of float32 (B,) tensors;
            0 for images already stopped).
        tile, overlap: refine tile x tile crops (multiples of pad_to) with blended overlaps
            instead of the whole image; a tile covering the image gives the untiled result.
        pad_to: pad H and W (reflect) to this multiple and crop back (8: the network's need).
        cuda_graph: capture a step in a CUDA graph (CUDA, fixed shapes, tol=None); keep the
            Refiner object to replay the graph on later calls of the same shape.
        channels_last: run the network on channels-last activations (None: on the CPU, where
            oneDNN's convolutions and the torch backend's norms are 1.5-2x faster so).
        strip_elements: the most elements a block's row strips hold alive at once (None: the
            per-device default of ``sipl_fast.modules.STRIP_ELEMENTS``); see
            ``sipl_fast.modules.strip_budget``.
        graph_kernels: a CUDA graph records the kernels of ``ops.graph_kernels("refine")``
            (False: the graph records what eager calls run).
        state: an IterationState to work in (None: the model's own for this thread and device).
        dtype: the precision of the network's weights, activations and kernels:
            torch.bfloat16 (CPU and CUDA), torch.float16 (CUDA only) or torch.float32; None:
            the model's own dtype, with the state and output in the input's dtype. With a dtype
            the image state and the output are float32 whatever the input's floating dtype, and
            the network runs on a copy of the model cast to ``dtype`` (the model itself is
            never changed; where ``dtype`` is the model's own, the model itself runs). The copy
            is made once per model, device and dtype (:func:`cast_model`) and its weights are
            recast from the model's at the start of every call, so a weight change of any
            kind, ``.data`` writes included, is seen by the next call (see docs/design.md,
            "Precision of the refinement"; its cost: docs/performance.md).
    """

    def __init__(self, model, steps: int = 2, *, tol: float | None = None, blend: float = 0.0,
                 return_deltas: bool = False, tile: int | None = None, overlap: int = 32,
                 pad_to: int = 8, cuda_graph: bool = False, channels_last: bool | None = None,
                 strip_elements: int | None = None, graph_kernels: bool = True, state=None,
                 dtype: torch.dtype | None = None):
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if pad_to < 8 or pad_to % 8:
            raise ValueError(f"pad_to must be a positive multiple of 8, got {pad_to}")
        if tile is not None and (tile < pad_to or tile % pad_to or not 0 <= overlap < tile):
            raise ValueError(f"tile must be a multiple of {pad_to} and 0 <= overlap < tile; got "
                             f"tile={tile}, overlap={overlap}")
        if cuda_graph and tol is not None:
            raise ValueError("cuda_graph needs fixed shapes: it cannot be combined with tol")
        if dtype not in REFINE_DTYPES:
            raise ValueError(f"dtype must be one of torch.bfloat16, torch.float16, torch.float32 or None; "
                             f"got {dtype!r}")
        with strip_budget(strip_elements):  # checks the value now rather than at the first call
            pass
        self.model = model
        self.steps, self.tol, self.blend = steps, tol, float(blend)
        self.return_deltas, self.tile, self.overlap, self.pad_to = return_deltas, tile, overlap, pad_to
        self.cuda_graph = cuda_graph
        self.channels_last = channels_last
        self.strip_elements, self.graph_kernels = strip_elements, graph_kernels
        self._state = state
        self.dtype = dtype
        self._graph = None
        self._graph_lock = threading.Lock()   # one captured graph: its callers take turns
        self._graph_scope = None              # the dictionary-cache scope the graph reads
        self._refreshed = False               # its values were recomputed in this call

    def _channels_last(self, device: torch.device) -> bool:
        return self.channels_last if self.channels_last is not None else device.type == "cpu"

    # ------------------------------------------------------------------ entry
    def __call__(self, x: torch.Tensor):
        channels = self.model.config["inp_channels"]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"refine expects images of shape (B, {channels}, H, W), got {shape}")
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            raise ValueError(f"refine needs images of at least 2x2 pixels, got {tuple(x.shape[-2:])}")
        if self.dtype is not None:
            if self.dtype == torch.float16 and x.device.type != "cuda":
                raise ValueError(f"float16 refinement needs CUDA (the image is on {x.device}); "
                                 "use dtype=torch.bfloat16 on the CPU")
            if not x.is_floating_point():
                raise TypeError(f"refine expects a floating image tensor, got {x.dtype}")
            x = x.to(torch.float32)   # the state and the output are float32
        h, w = x.shape[-2:]
        graphed = self.cuda_graph and x.is_cuda
        network = self._network()
        with torch.inference_mode(), strip_budget(self.strip_elements):
            padded = pad_to_multiple(x, self.pad_to)
            if graphed:
                with self._graph_lock:
                    self._refreshed = False   # the graph's dictionary values: once per call
                    output, deltas = self._refine(network, padded)
                    output = output[..., :h, :w].clone()
            else:
                cache = getattr(network, "dictionary_cache", None)   # stand-in models have none
                with cache.scope() if cache is not None else contextlib.nullcontext():
                    output, deltas = self._refine(network, padded)
                    output = output[..., :h, :w].clone()
        return (output, deltas) if self.return_deltas else output

    def _network(self):
        """The module that runs: the model, or its copy cast to ``dtype`` with the current weights."""
        if self.dtype is None:
            return self.model
        weight = next(self.model.parameters(), None)
        if weight is None or weight.dtype == self.dtype:
            return self.model
        return cast_model(self.model, self.dtype)

    def _refine(self, network, padded: torch.Tensor):
        return self._refine_batch(network, padded) if self.tile is None else self._refine_tiled(network, padded)

    def state(self, device: torch.device):
        """The IterationState this refiner works in: the one given, else the model's own for
        this thread and device type."""
        return self._state if self._state is not None else thread_state(self.model, device)

    # ------------------------------------------------------------------ one batch
    def _step(self, network, current: torch.Tensor) -> torch.Tensor:
        """y_t from x_{t-1}: one shared encoder pass, the plain decode, PI, the privileged decode.
        The network runs in its own dtype; y_t comes back in the state's."""
        state_dtype = current.dtype
        current = current.to(self._input_dtype(current))
        if self._channels_last(current.device):  # the layout propagates through every layer from the input
            current = current.contiguous(memory_format=torch.channels_last)
        encoded = network.encode_all(current)
        initial = network.decode(current, encoded)
        privileged = list(network.encode(initial))
        features = encoded._asdict()
        del initial, encoded  # the last pass holds the only references: each is freed after its last use
        return network.decode_releasing(current, features, privileged).to(state_dtype).contiguous()

    def _input_dtype(self, image: torch.Tensor) -> torch.dtype:
        """The dtype the network's input takes: ``dtype`` where given, else the image's own."""
        return image.dtype if self.dtype is None else self.dtype

    def _plain(self, network, x: torch.Tensor) -> torch.Tensor:
        return network(x.to(self._input_dtype(x))).to(x.dtype)

    def _refine_batch(self, network, x: torch.Tensor):
        if self.steps == 0:
            return self._plain(network, x), []
        state = self.state(x.device)
        state.start(x)
        if self.cuda_graph and x.is_cuda:
            return self._refine_graphed(network, state, x)
        batch = x.shape[0]
        active = None  # indices of the images still changing; None: all of them
        history = []
        for _ in range(self.steps):
            if active is None:
                deltas = state.step(self._step(network, state.current()), self.blend)
            else:
                # Only the active images run through the network (the batch is compacted);
                # finished ones keep their image and report a delta of 0.
                still = state.active().clone()
                new = self._step(network, state.current().index_select(0, active))
                deltas = state.step_rows(active, new, self.blend).masked_fill_(~still, 0.0)
            history.append(deltas)
            if self.tol is not None:
                active = state.active_rows(self.tol)
                if active.numel() == 0:
                    break
                if active.numel() == batch:
                    active = None
        history += [torch.zeros_like(history[-1])] * (self.steps - len(history))
        return state.current(), history

    def _refine_graphed(self, network, state, x: torch.Tensor):
        """Replay one captured step (static buffers of the state) ``steps`` times."""
        # The graph reads the weights in place (a cast copy's are recast in place before every
        # call), and the dictionary-side values of its own cache scope, which are recomputed in
        # place before every call's replays (a weight change of any kind, .data writes included,
        # is seen). New storage for a weight re-captures.
        cache = network.dictionary_cache
        if self._graph_scope is None:
            self._graph_scope = cache.new_scope()
            weakref.finalize(self, cache.drop, self._graph_scope)
        weights = tuple(p.data_ptr() for p in network.parameters())
        key = (tuple(x.shape), x.dtype, state.current().data_ptr(), self.blend, weights)
        with cache.scope(self._graph_scope):
            if self._graph is None or self._graph[0] != key:
                self._graph = None
                current = state.current()
                forced = ops.graph_kernels("refine", self._channels_last(x.device)) if self.graph_kernels else ()
                with ops.kernels_forced(*forced):
                    warm = torch.cuda.Stream()
                    warm.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(warm):  # compilation, autotuning and allocations happen before capture
                        self._step(network, current.clone())
                    torch.cuda.current_stream().wait_stream(warm)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        state.step(self._step(network, current), self.blend)
                self._graph = (key, graph)
                state.current().copy_(x)
            elif not self._refreshed:
                cache.refresh(self._graph_scope)
            self._refreshed = True
        history = []
        for _ in range(self.steps):
            self._graph[1].replay()
            history.append(state.deltas().clone())
        return state.current(), history

    # ------------------------------------------------------------------ tiles
    def _refine_tiled(self, network, x: torch.Tensor):
        b, c, h, w = x.shape
        tops = _tile_starts(h, self.tile, self.overlap)
        lefts = _tile_starts(w, self.tile, self.overlap)
        if len(tops) == 1 and len(lefts) == 1:
            return self._refine_batch(network, x)
        th, tw = min(self.tile, h), min(self.tile, w)  # every tile has this size (_tile_starts)
        output = torch.zeros_like(x)
        weight_sum = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
        delta_sums = [torch.zeros(b, device=x.device) for _ in range(self.steps)]
        for top in tops:
            for left in lefts:
                crop = x[..., top:top + th, left:left + tw]
                refined, deltas = self._refine_batch(network, crop)
                weight = (_ramp(th, self.overlap, top == 0, top + th == h, x.device, x.dtype)[:, None]
                          * _ramp(tw, self.overlap, left == 0, left + tw == w, x.device, x.dtype)[None, :])
                output[..., top:top + th, left:left + tw] += refined * weight
                weight_sum[..., top:top + th, left:left + tw] += weight
                for total, d in zip(delta_sums, deltas):
                    total += d
        tiles = len(tops) * len(lefts)  # equal tiles: the image's delta is their mean
        return output / weight_sum, [total / tiles for total in delta_sums]


class ThreadStates:
    """A model's IterationStates: one per thread and device type, created on first use and kept
    while the thread lives, so that later calls of one thread with the same shape reuse its
    buffers and concurrent calls never share them. Runtime state: a pickled or deep-copied model
    gets a new, empty one."""

    def __init__(self):
        self._local = threading.local()

    def __reduce__(self):
        return (type(self), ())

    def get(self, device: torch.device):
        states = self._local.__dict__.setdefault("by_device", {})
        if device.type not in states:
            states[device.type] = extension.IterationState(device)
        return states[device.type]


def thread_state(model, device: torch.device):
    """This thread's IterationState of ``model`` on ``device``'s type."""
    # dict.setdefault is atomic: two threads cannot install two holders. Not a submodule,
    # not in the state_dict.
    return model.__dict__.setdefault("_iteration_states", ThreadStates()).get(device)


# --------------------------------------------------------------------------- precision
class CastCopies:
    """A model's copies cast to other dtypes, one per (device, dtype), made on first use.
    Runtime state: a pickled or deep-copied model gets a new, empty one."""

    def __init__(self):
        self._copies: dict[tuple[torch.device, torch.dtype], torch.nn.Module] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return (type(self), ())

    def get(self, model, dtype: torch.dtype):
        weight = next(model.parameters())
        key = (weight.device, dtype)
        with self._lock:   # one copy per key, even when threads ask at once
            cast = self._copies.get(key)
            if cast is None:
                cast = self._copies[key] = _cast_deepcopy(model, dtype)
        return cast


def _cast_deepcopy(model, dtype: torch.dtype):
    """A deep copy of ``model`` whose floating parameters and buffers are ``dtype`` (made as
    they are copied: the float32 weights are never held twice). Normal tensors even under
    inference_mode: the dictionary cache reads their versions."""
    with torch.inference_mode(False), torch.no_grad():
        memo = {}
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                cast = tensor.detach().to(dtype, copy=True)
                memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else cast
        return copy.deepcopy(model, memo)


def cast_model(model, dtype: torch.dtype):
    """``model``'s copy cast to ``dtype``, its weights and floating buffers recast from the
    model's now (in place: the copy's storage never changes, so a CUDA graph that reads it
    stays valid). Recasting at every call is the rule: ``.data`` writes change neither a
    tensor's version nor its storage, so nothing cheaper notices every weight change. The
    model itself is never changed."""
    holder = model.__dict__.setdefault("_cast_copies", CastCopies())   # atomic; not a submodule
    cast = holder.get(model, dtype)
    cast.train(model.training)
    sources = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    targets = [t for t in (*cast.parameters(), *cast.buffers()) if t.is_floating_point()]
    with torch.inference_mode(False), torch.no_grad():
        torch._foreach_copy_(targets, sources)
    return cast


# --------------------------------------------------------------------------- graph replay
class RefinerCache:
    """A bounded least-recently-used map from a key to what ``factory(key)`` makes (refine():
    graph-capturing Refiners). Not thread-safe: one per thread (:class:`ThreadRefinerCaches`)."""

    def __init__(self, factory, capacity: int = GRAPH_CACHE_SIZE):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.factory, self.capacity = factory, capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """The keys, least recently used first."""
        return list(self._entries)

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._entries[key] = self.factory(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def put(self, key, value) -> None:
        """Replace the value of ``key`` (e.g. with EAGER after a failed capture)."""
        self._entries[key] = value
        self._entries.move_to_end(key)


class GraphKey(NamedTuple):
    """What a graph-capturing Refiner of refine() is kept for."""
    device: torch.device
    shape: tuple
    dtype: torch.dtype   # the input's
    steps: int
    options: tuple       # Refiner's other options, sorted (name, value) pairs


class ThreadRefinerCaches:
    """A model's graph-capturing Refiners for refine(): one RefinerCache per thread, so that no
    two threads ever replay one graph (a graph is not re-entrant) and a thread's later calls
    replay its own. Runtime state: a pickled or deep-copied model gets a new, empty one."""

    def __init__(self):
        self._local = threading.local()

    def __reduce__(self):
        return (type(self), ())

    def get(self, model) -> RefinerCache:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = RefinerCache(lambda key: _graph_refiner(model, key))
        return cache


def _graph_refiner(model, key: GraphKey) -> "Refiner":
    """A graph-capturing Refiner for ``key`` with its own IterationState: the graph reads the
    state's buffers in place, and a state shared with other shapes would be reallocated under
    it (forcing a new capture at every change of shape)."""
    options = dict(key.options)
    options.setdefault("state", extension.IterationState(key.device))
    return Refiner(model, key.steps, cuda_graph=True, **options)


EAGER = object()   # a RefinerCache value: this key's capture failed, run eagerly
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(reason: str) -> None:
    """Warn that refine() runs eagerly on CUDA, once per process and reason."""
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"sipl_fast.refine: no CUDA graph, running eagerly: {reason}", RuntimeWarning, stacklevel=3)


def graph_obstacle(options: dict) -> str | None:
    """Why a refinement with these Refiner options cannot replay a CUDA graph (None: it can).
    Tiling can: every tile has the same size (see _tile_starts)."""
    if options.get("tol") is not None:
        return "tol stops images at different steps (the batch changes shape)"
    try:
        hash(tuple(options.items()))
    except TypeError:
        return "an option value is not hashable (the graph cache is keyed by the options)"
    return None


def refine(model, x: torch.Tensor, steps: int = 2, *, cuda_graph: bool | None = None, **options):
    """Refine ``x`` with ``model`` (what ``model.refine`` runs); options are :class:`Refiner`'s.

    On CUDA (``cuda_graph`` None or True) a step is captured in a CUDA graph and replayed: this
    thread keeps up to ``GRAPH_CACHE_SIZE`` graph-capturing Refiners per model, keyed by device,
    shape, input dtype, steps and options (least recently used first out), so a later call of
    the same kind replays the captured graph. Where a graph cannot serve (``tol`` given, a
    capture error) it runs eagerly and warns once per reason. ``cuda_graph=False`` always runs
    eagerly; on the CPU nothing is captured.
    """
    if cuda_graph is False or not (isinstance(x, torch.Tensor) and x.is_cuda):
        return Refiner(model, steps, cuda_graph=bool(cuda_graph), **options)(x)
    obstacle = graph_obstacle(options)
    if obstacle is not None:
        if cuda_graph:   # asked for explicitly: Refiner says why it cannot
            return Refiner(model, steps, cuda_graph=True, **options)(x)
        warn_once(obstacle)
        return Refiner(model, steps, **options)(x)
    key = GraphKey(x.device, tuple(x.shape), x.dtype, steps, tuple(sorted(options.items())))
    holder = model.__dict__.setdefault("_graph_refiners", ThreadRefinerCaches())   # atomic; not a submodule
    cache = holder.get(model)
    refiner = cache.get(key)
    if refiner is not EAGER:
        try:
            return refiner(x)
        except RuntimeError as error:   # capture failed (an operation that a graph cannot record)
            cache.put(key, EAGER)
            warn_once(f"capture failed ({type(error).__name__}: {error})")
    return Refiner(model, steps, **options)(x)
