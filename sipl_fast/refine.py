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
  compacted so finished images cost nothing), tiling large images, and capturing a step in a
  CUDA graph.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F

from . import ops
from .modules import strip_budget
from .ops import extension


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
    """

    def __init__(self, model, steps: int = 2, *, tol: float | None = None, blend: float = 0.0,
                 return_deltas: bool = False, tile: int | None = None, overlap: int = 32,
                 pad_to: int = 8, cuda_graph: bool = False, channels_last: bool | None = None,
                 strip_elements: int | None = None, graph_kernels: bool = True, state=None):
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if pad_to < 8 or pad_to % 8:
            raise ValueError(f"pad_to must be a positive multiple of 8, got {pad_to}")
        if tile is not None and (tile < pad_to or tile % pad_to or not 0 <= overlap < tile):
            raise ValueError(f"tile must be a multiple of {pad_to} and 0 <= overlap < tile; got "
                             f"tile={tile}, overlap={overlap}")
        if cuda_graph and tol is not None:
            raise ValueError("cuda_graph needs fixed shapes: it cannot be combined with tol")
        with strip_budget(strip_elements):  # checks the value now rather than at the first call
            pass
        self.model = model
        self.steps, self.tol, self.blend = steps, tol, float(blend)
        self.return_deltas, self.tile, self.overlap, self.pad_to = return_deltas, tile, overlap, pad_to
        self.cuda_graph = cuda_graph
        self.channels_last = channels_last
        self.strip_elements, self.graph_kernels = strip_elements, graph_kernels
        self._state = state
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
        h, w = x.shape[-2:]
        graphed = self.cuda_graph and x.is_cuda
        with torch.inference_mode(), strip_budget(self.strip_elements):
            padded = pad_to_multiple(x, self.pad_to)
            if graphed:
                with self._graph_lock:
                    self._refreshed = False   # the graph's dictionary values: once per call
                    output, deltas = self._refine(padded)
                    output = output[..., :h, :w].clone()
            else:
                cache = getattr(self.model, "dictionary_cache", None)   # stand-in models have none
                with cache.scope() if cache is not None else contextlib.nullcontext():
                    output, deltas = self._refine(padded)
                    output = output[..., :h, :w].clone()
        return (output, deltas) if self.return_deltas else output

    def _refine(self, padded: torch.Tensor):
        return self._refine_batch(padded) if self.tile is None else self._refine_tiled(padded)

    def state(self, device: torch.device):
        """The IterationState this refiner works in: the one given, else the model's own for
        this thread and device type."""
        return self._state if self._state is not None else thread_state(self.model, device)

    # ------------------------------------------------------------------ one batch
    def _step(self, current: torch.Tensor) -> torch.Tensor:
        """y_t from x_{t-1}: one shared encoder pass, the plain decode, PI, the privileged decode."""
        if self._channels_last(current.device):  # the layout propagates through every layer from the input
            current = current.contiguous(memory_format=torch.channels_last)
        encoded = self.model.encode_all(current)
        initial = self.model.decode(current, encoded)
        privileged = list(self.model.encode(initial))
        features = encoded._asdict()
        del initial, encoded  # the last pass holds the only references: each is freed after its last use
        return self.model.decode_releasing(current, features, privileged).contiguous()

    def _refine_batch(self, x: torch.Tensor):
        if self.steps == 0:
            return self.model(x), []
        state = self.state(x.device)
        state.start(x)
        if self.cuda_graph and x.is_cuda:
            return self._refine_graphed(state, x)
        batch = x.shape[0]
        active = None  # indices of the images still changing; None: all of them
        history = []
        for _ in range(self.steps):
            if active is None:
                deltas = state.step(self._step(state.current()), self.blend)
            else:
                # Only the active images run through the network (the batch is compacted);
                # finished ones keep their image and report a delta of 0.
                still = state.active().clone()
                new = self._step(state.current().index_select(0, active))
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

    def _refine_graphed(self, state, x: torch.Tensor):
        """Replay one captured step (static buffers of the state) ``steps`` times."""
        # The graph reads the weights in place, and the dictionary-side values of its own cache
        # scope, which are recomputed in place before every call's replays (a weight change of
        # any kind, .data writes included, is seen). New storage for a weight re-captures.
        cache = self.model.dictionary_cache
        if self._graph_scope is None:
            self._graph_scope = cache.new_scope()
            weakref.finalize(self, cache.drop, self._graph_scope)
        weights = tuple(p.data_ptr() for p in self.model.parameters())
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
                        self._step(current.clone())
                    torch.cuda.current_stream().wait_stream(warm)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        state.step(self._step(current), self.blend)
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
    def _refine_tiled(self, x: torch.Tensor):
        b, c, h, w = x.shape
        tops = _tile_starts(h, self.tile, self.overlap)
        lefts = _tile_starts(w, self.tile, self.overlap)
        if len(tops) == 1 and len(lefts) == 1:
            return self._refine_batch(x)
        th, tw = min(self.tile, h), min(self.tile, w)  # every tile has this size (_tile_starts)
        output = torch.zeros_like(x)
        weight_sum = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
        delta_sums = [torch.zeros(b, device=x.device) for _ in range(self.steps)]
        for top in tops:
            for left in lefts:
                crop = x[..., top:top + th, left:left + tw]
                refined, deltas = self._refine_batch(crop)
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
