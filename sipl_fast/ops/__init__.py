"""Public ops of sipl_fast and their single dispatch point.

``proxy_attention`` and ``transposed_attention`` validate their inputs once, then run the
backend chosen by :func:`sipl_fast.backends.resolve_backend` (see that module for how to
choose). Every backend computes the same math; only speed and memory differ.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

import torch

from .. import settings
from ..backends import resolve_backend, triton_interpreter
from . import reference, torch_impl

__all__ = ["proxy_attention", "transposed_attention", "layer_norm2d", "gated_gelu", "pointwise_depthwise",
           "pointwise_depthwise_gate", "backend_module", "kernels_forced", "DEPTHWISE_OPS", "graph_kernels"]

# Triton modules are imported on first use: importing triton costs a second and is not
# needed by the reference and torch backends.
_TRITON_MODULES = {
    "proxy_attention": "sipl_fast.ops.proxy_attention_triton",
    "transposed_attention": "sipl_fast.ops.transposed_attention_triton",
    "layer_norm2d": "sipl_fast.ops.layer_norm2d_triton",
    "gated_gelu": "sipl_fast.ops.gated_gelu_triton",
    "pointwise_depthwise": "sipl_fast.ops.pointwise_depthwise_triton",
    "pointwise_depthwise_gate": "sipl_fast.ops.pointwise_depthwise_gate_triton",
}


# Routing on CUDA (docs/design.md, "Routing rules"): where a kernel measured slower than the
# torch formulation, the triton backend runs the torch formulation instead. The rule of an op
# takes the call's first input (and, for the proxy attention, k and the heads) and says whether
# the torch formulation runs:
# - the proxy attention in 16 bits: by PROXY_ATTENTION_KERNEL_WINS below;
# - the feed-forward gates alone: always (their kernels lost at most SIPL sites);
# - LayerNorm2d: where a gradient is recorded (its backward kernel lost) or the call has fewer
#   than LAYER_NORM_KERNEL_MIN_PIXELS pixels (its forward kernel wins only on large calls);
# - the depthwise projections: always in eager calls; CUDA graphs record their kernels
#   (graph_kernels), where they win.
# SIPL_FAST_KERNELS (sipl_fast.settings) or ``with kernels_forced(op, ...)`` run the kernels anyway.
LAYER_NORM_KERNEL_MIN_PIXELS = 1 << 15
# The ops whose kernels are depthwise 3x3 convolutions.
DEPTHWISE_OPS = ("pointwise_depthwise", "pointwise_depthwise_gate")


def graph_kernels(site: str, channels_last: bool = False) -> tuple[str, ...]:
    """The ops whose kernels a CUDA graph of ``site`` ("refine" or "train") records: the
    depthwise projections at both sites, and LayerNorm2d's forward in a refinement of NCHW maps
    (training keeps torch's norm, whose backward won; on channels-last maps the kernel would copy
    what torch's norm reads in place). ``Refiner(graph_kernels=False)`` and the trainer's
    ``graph_kernels=False`` record what eager calls run instead."""
    if site not in ("refine", "train"):
        raise ValueError(f"graph_kernels: site must be 'refine' or 'train', got {site!r}")
    return DEPTHWISE_OPS + (("layer_norm2d",) if site == "refine" and not channels_last else ())


def _pixels(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[1])


# The proxy attention's route on CUDA for 16-bit inputs, by whether autograd records the call
# and by the shape of the attention (docs/design.md, "Proxy attention route": each entry is the
# faster of the kernel and the torch formulation, normalise + SDPA, in one measured table).
# "keys": fewer queries than keys (the dictionary side, where SDPA underfills the card and the
# kernel splits the keys); "queries": more queries than keys; "square": as many; "wide": a head
# dimension above 256 (p3_cross's 384, beyond SDPA's flash kernels). float32 runs the kernel
# (3xTF32 on tensor cores) everywhere: SDPA has no float32 flash path.
PROXY_ATTENTION_KERNEL_WINS = {
    (False, "keys"): True, (False, "queries"): False, (False, "square"): False, (False, "wide"): True,
    (True, "keys"): False, (True, "queries"): True, (True, "square"): True, (True, "wide"): False,
}


def proxy_attention_shape(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> str:
    """The shape class of a proxy attention call in PROXY_ATTENTION_KERNEL_WINS."""
    if q.shape[1] // num_heads > 256:
        return "wide"
    queries, keys = q.shape[-2] * q.shape[-1], k.shape[-2] * k.shape[-1]
    return "keys" if queries < keys else "queries" if queries > keys else "square"


def _proxy_attention_prefers_torch(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> bool:
    if q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return not PROXY_ATTENTION_KERNEL_WINS[(torch.is_grad_enabled(), proxy_attention_shape(q, k, num_heads))]


_TORCH_FORMULATION_ON_CUDA = {
    "proxy_attention": _proxy_attention_prefers_torch,
    "layer_norm2d": lambda x: torch.is_grad_enabled() or _pixels(x) < LAYER_NORM_KERNEL_MIN_PIXELS,
    "gated_gelu": lambda x: True,
    **dict.fromkeys(DEPTHWISE_OPS, lambda x: True),
}


_FORCED_KERNELS: set[str] = set()  # the ops named by the open kernels_forced blocks


@contextlib.contextmanager
def kernels_forced(*names: str) -> Iterator[None]:
    """Within the block, the triton backend runs the kernels of the named ops on CUDA even where
    it would run their torch formulation; ``kernels_forced("all")`` forces every op's kernels
    (benchmarks comparing the two inside one process, CUDA graph captures)."""
    wanted = set(_TRITON_MODULES) if "all" in names else set(names)
    unknown = wanted - set(_TRITON_MODULES)
    if unknown:
        raise ValueError(f"kernels_forced: no kernels for {sorted(unknown)}; ops with kernels: "
                         f"{sorted(_TRITON_MODULES)} (or 'all')")
    added = wanted - _FORCED_KERNELS
    _FORCED_KERNELS.update(added)
    try:
        yield
    finally:
        _FORCED_KERNELS.difference_update(added)


def _prefers_torch_on_cuda(op: str, x: torch.Tensor, call: tuple) -> bool:
    rule = _TORCH_FORMULATION_ON_CUDA.get(op)
    if rule is None or op in _FORCED_KERNELS:
        return False
    return op not in settings.forced_kernels(_TRITON_MODULES) and rule(x, *call)


def backend_module(op: str, x: torch.Tensor, *call):
    """The module whose function ``op`` computes ``op`` with the active backend, for the call
    whose first input is x (its device; on CUDA its dtype and size, and the rest of the call
    where a route needs it, may choose the route)."""
    device = x.device
    backend = resolve_backend(device)
    if backend == "reference":
        return reference
    if backend == "torch" or (device.type == "cuda" and _prefers_torch_on_cuda(op, x, call)):
        return torch_impl
    if device.type != "cuda" and not triton_interpreter():
        raise RuntimeError(
            f"{op}: the triton backend needs CUDA tensors (got {device.type}); on the CPU it runs "
            "only under TRITON_INTERPRET=1. Use sipl_fast.use_backend('torch') for CPU work."
        )
    name = _TRITON_MODULES[op]
    # sys.modules first: an import statement inside a torch.compile'd region breaks the graph.
    return sys.modules.get(name) or importlib.import_module(name)


def _preload_triton_modules() -> None:
    """Import the Triton op modules up front where they will be used (a GPU, or the interpreter),
    so that torch.compile(fullgraph=True) never meets their import; elsewhere stay lazy."""
    from ..backends import triton_available
    if triton_available() and (torch.cuda.is_available() or triton_interpreter()):
        for name in _TRITON_MODULES.values():
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - raised again, with its message, on first use
                pass


def _check_common(op: str, tensors: dict, temperature: torch.Tensor, num_heads: int) -> None:
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(
                f"{op}: q, k and v must share dtype and device; got "
                + ", ".join(f"{n}={x.dtype}@{x.device}" for n, x in tensors.items())
            )
    channels = first.shape[1]
    for name, t in tensors.items():
        if t.shape[1] != channels:
            raise ValueError(
                f"{op}: channel counts differ: "
                + ", ".join(f"{n}={tuple(x.shape)}" for n, x in tensors.items())
            )
    if any(t.numel() == 0 for t in tensors.values()):
        # (the softmax over no keys is undefined; the kernels would launch empty grids)
        raise ValueError(f"{op}: q, k and v need at least one image, channel and pixel each, got "
                         + ", ".join(f"{n}={tuple(x.shape)}" for n, x in tensors.items()))
    if channels % num_heads:
        raise ValueError(f"{op}: {channels} channels do not split into {num_heads} heads")
    if not isinstance(temperature, torch.Tensor) or temperature.numel() != num_heads:
        shape = tuple(temperature.shape) if isinstance(temperature, torch.Tensor) else type(temperature).__name__
        raise ValueError(f"{op}: temperature must hold one value per head ({num_heads}), got {shape}")
    # The temperature may keep its own float dtype (a float32 parameter under bf16 autocast).
    if temperature.device != first.device or not temperature.is_floating_point():
        raise TypeError(
            f"{op}: temperature is {temperature.dtype}@{temperature.device}, "
            f"inputs are {first.dtype}@{first.device}"
        )


def proxy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    temperature: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Spatial cosine cross-attention of the Proxy Fusion blocks .

    q: (Bq, C, Hq, Wq); k, v: (Bk, C, Hk, Wk) with Bq and Bk each B or 1 (a batch-1 side is
    broadcast); temperature: (heads, 1, 1). Per head the tokens are pixels, q and k are
    L2-normalised over the head's C/heads channels, logits = temperature * q·k, softmax over
    the key tokens, out = P v. Returns (B, C, Hq, Wq).
    """
    _check_common("proxy_attention", {"q": q, "k": k, "v": v}, temperature, num_heads)
    if k.shape != v.shape:
        raise ValueError(f"proxy_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    bq, bk = q.shape[0], k.shape[0]
    if bq != bk and 1 not in (bq, bk):
        raise ValueError(f"proxy_attention: batch sizes {bq} (q) and {bk} (k, v) must match or one must be 1")
    return backend_module("proxy_attention", q, k, num_heads).proxy_attention(q, k, v, temperature, num_heads)


def transposed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         temperature: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Restormer's multi-head transposed (channel) attention core.

    q, k, v: (B, C, H, W); per head c_h = C/heads channels, each L2-normalised over the H*W
    tokens; A = softmax(temperature * q kᵀ) is c_h x c_h; out = A v. Returns (B, C, H, W).
    """
    _check_common("transposed_attention", {"q": q, "k": k, "v": v}, temperature, num_heads)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"transposed_attention: q, k, v must have one shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return backend_module("transposed_attention", q).transposed_attention(
        q, k, v, temperature, num_heads)


def _check_map(op: str, x, layout: str = "(B, C, H, W)", fits=lambda t: True) -> None:
    """One ValueError unless x is a floating 4-D tensor that ``fits``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or not fits(x):
        raise ValueError(f"{op}: x must be a floating {layout} tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def layer_norm2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Per-pixel LayerNorm over the channels of x (B, C, H, W), the backbone's norm.

    With bias ("WithBias"): (x - mean_c) / sqrt(var_c + eps) * weight + bias. Without bias
    ("BiasFree", as the authors define it): x / sqrt(var_c + eps) * weight; the mean is
    subtracted inside the variance only.
    """
    _check_map("layer_norm2d", x)
    channels = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (channels,) or p.device != x.device):
            raise ValueError(f"layer_norm2d: {name} must be ({channels},) on {x.device}, "
                             f"got {tuple(p.shape)} on {p.device}")
    return backend_module("layer_norm2d", x).layer_norm2d(x, weight, bias, eps)


def gated_gelu(x: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """The feed-forward gate on x = (B, 2h, H, W) split into halves (x1, x2).

    dual=False (GDFN): gelu(x1) * x2. dual=True (DualGate FFN): gelu(x2) * x1 + gelu(x1) * x2.
    gelu is the exact (erf) form. Returns (B, h, H, W).
    """
    _check_map("gated_gelu", x, "(B, 2h, H, W)", lambda t: t.shape[1] % 2 == 0)
    return backend_module("gated_gelu", x).gated_gelu(x, dual)


def _check_projection(op: str, x, pointwise: torch.Tensor, depthwise: torch.Tensor) -> None:
    _check_map(op, x)
    hidden = pointwise.shape[0]
    if pointwise.shape[1:] != (x.shape[1], 1, 1) or depthwise.shape != (hidden, 1, 3, 3):
        raise ValueError(f"{op}: weights must be ({hidden}, {x.shape[1]}, 1, 1) and "
                         f"({hidden}, 1, 3, 3), got {tuple(pointwise.shape)} and {tuple(depthwise.shape)}")


def pointwise_depthwise(x: torch.Tensor, pointwise: torch.Tensor, pointwise_bias: torch.Tensor | None,
                        depthwise: torch.Tensor, depthwise_bias: torch.Tensor | None) -> torch.Tensor:
    """depthwise3x3(conv1x1(x)), the projection in front of every attention and gate.

    pointwise: (hidden, C, 1, 1); depthwise: (hidden, 1, 3, 3), padding 1. The torch and
    triton backends keep only x for the backward and recompute the 1x1 output there (one
    GEMM): it is the widest map of a block, and the depthwise backward needs it. The triton
    backend runs the depthwise convolution with its own kernels (NCHW maps).
    """
    _check_projection("pointwise_depthwise", x, pointwise, depthwise)
    return backend_module("pointwise_depthwise", x).pointwise_depthwise(
        x, pointwise, pointwise_bias, depthwise, depthwise_bias)


def pointwise_depthwise_gate(x: torch.Tensor, pointwise: torch.Tensor, pointwise_bias: torch.Tensor | None,
                             depthwise: torch.Tensor, depthwise_bias: torch.Tensor | None,
                             dual: bool = False) -> torch.Tensor:
    """gated_gelu(pointwise_depthwise(x, ...), dual): the feed-forward's projection (1x1 to 2h
    channels, then depthwise 3x3) and gate, returning (B, h, H, W).

    Where autograd records it is exactly those two ops, each dispatched as itself (their
    backward saves only x and the gate's input). Without autograd the triton backend fuses
    the depthwise convolution and the gate (one read of the 1x1 output, one write of the
    result; NCHW maps, the torch formulation on channels-last ones).
    """
    _check_projection("pointwise_depthwise_gate", x, pointwise, depthwise)
    if pointwise.shape[0] % 2:
        raise ValueError(f"pointwise_depthwise_gate: the projection must have an even number of channels "
                         f"(two halves for the gate), got {pointwise.shape[0]}")
    if torch_impl.needs_autograd(x, pointwise, pointwise_bias, depthwise, depthwise_bias):
        return gated_gelu(pointwise_depthwise(x, pointwise, pointwise_bias, depthwise, depthwise_bias), dual)
    return backend_module("pointwise_depthwise_gate", x).pointwise_depthwise_gate(
        x, pointwise, pointwise_bias, depthwise, depthwise_bias, bool(dual))


_preload_triton_modules()
