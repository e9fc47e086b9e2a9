"""The ops at SIPL's shapes: op x implementation x dtype x shape x mode, with pytest-benchmark.

    pytest bench/test_op_benchmarks.py --benchmark-only              # CUDA: the SIPL shapes (bench/shapes.py)
    pytest bench/test_op_benchmarks.py --benchmark-only              # CPU: their smoke variants (--run-slow: full size)
    pytest bench/test_op_benchmarks.py --benchmark-disable           # every case called once (the CI smoke run)

Implementations: ``reference`` (the authors' eager math, the baseline), ``torch``
(sipl_fast.ops.torch_impl; for proxy attention the norms, then SDPA), ``triton`` (sipl_fast's
kernels, forced with ``ops.kernels_forced`` where the triton backend would route the call to
the torch formulation) and ``compile`` (torch.compile of the best torch formulation: for proxy
attention sipl_fast's torch formulation, elsewhere the reference; one static compile per case).
On the CPU, triton is the Triton interpreter, a correctness tool: it runs in the smoke run and
is never timed; torch.compile is left out on the CPU (minutes of C++ compilation per case).
Dtypes: ``fp32``; ``bf16`` is the model under bf16 autocast: bf16 activations, float32
LayerNorm and projection parameters (the projections run under torch.autocast).
Modes: ``fwd`` under no_grad, as in the refinement; ``fwd+bwd`` the gradients of every input
(the projection + gate kernel is inference-only: fwd only).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import sipl_fast
from sipl_fast import ops
from sipl_fast.ops import reference, torch_impl

import shapes
from measure import assert_finite, record_op

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
IMPLS = ("reference", "torch", "triton", "compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
INFERENCE_ONLY = ("pointwise_depthwise_gate",)
EPS = 1e-5
# Per device: (the SIPL shapes or their smoke variants, the implementations, the marks).
PLANS = {"cuda": ((True, IMPLS, ()),),
         "cpu": ((False, ("reference", "torch", "triton"), ()), (True, ("reference", "torch"), (pytest.mark.slow,)))}


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """On the CPU the smoke-size ops run on one thread: on a loaded machine OpenMP threads only
    contend (a 0.05 ms op took 20 ms on two)."""
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cases():
    """Every (op, shape, dtype, mode, impl). CUDA: the SIPL shapes, every implementation. CPU:
    the smoke variants with reference, torch and triton (the interpreter), and the SIPL shapes,
    marked slow, with reference and torch; no torch.compile (minutes of C++ compilation per case)."""
    for full_size, impls, marks in PLANS[DEVICE.type]:
        for op in shapes.OPS:
            for shape in shapes.shapes(op, full_size):
                for dtype in DTYPES:
                    for mode in MODES[:1] if op in INFERENCE_ONLY else MODES:
                        for impl in impls:
                            yield pytest.param(op, shape, dtype, mode, impl, marks=marks,
                                               id=f"{op}-{shape.name}-{dtype}-{mode}-{impl}".replace(" ", "_"))


def make_inputs(op: str, shape, dtype: str, requires_grad: bool) -> tuple[list[torch.Tensor], tuple]:
    """(the tensors of a call, the other arguments after them), on DEVICE."""
    activation = DTYPES[dtype]
    parameter = torch.float32  # fp32 and bf16 autocast alike

    def randn(*size, dtype=activation, scale=1.0):
        return torch.randn(*size, device=DEVICE, dtype=dtype) * scale

    if op == "proxy_attention":
        tensors = [randn(shape.batch, shape.channels, *shape.q_hw), randn(shape.batch, shape.channels, *shape.kv_hw),
                   randn(shape.batch, shape.channels, *shape.kv_hw)]
    elif op == "transposed_attention":  # q, k, v as channel chunks of one qkv map, as in the model
        tensors = [t.detach() for t in randn(shape.batch, 3 * shape.channels, *shape.hw).chunk(3, dim=1)]
    else:
        tensors = [randn(shape.batch, shape.channels, *shape.hw)]
    if op in ("proxy_attention", "transposed_attention"):
        # One dtype for all four: the reference formulation does not mix a float32 temperature in.
        tensors.append(torch.linspace(1.0, 4.0, shape.heads, device=DEVICE, dtype=activation).reshape(-1, 1, 1))
        extra = (shape.heads,)
    elif op == "layer_norm2d":
        tensors += [randn(shape.channels, dtype=parameter) + 1, randn(shape.channels, dtype=parameter)]
        extra = (EPS,)
    elif op == "gated_gelu":
        extra = (shape.dual,)
    else:  # the 1x1 convolution, then the depthwise 3x3, each with its bias
        tensors += [randn(shape.hidden, shape.channels, 1, 1, dtype=parameter, scale=shape.channels ** -0.5),
                    randn(shape.hidden, dtype=parameter), randn(shape.hidden, 1, 3, 3, dtype=parameter, scale=1 / 3),
                    randn(shape.hidden, dtype=parameter)]
        extra = (shape.dual,) if op == "pointwise_depthwise_gate" else ()
    return [t.requires_grad_(requires_grad) for t in tensors], extra


@contextlib.contextmanager
def _implementation(op: str, impl: str):
    """The backend of ``impl`` (none for compile, which calls its formulation directly); for
    triton the op's kernel forced on CUDA."""
    if impl == "compile":
        yield
        return
    with sipl_fast.use_backend(impl), ops.kernels_forced(*((op,) if impl == "triton" else ())):
        yield


def op_function(op: str, impl: str, dtype: str):
    """f(*tensors, *extra) computing ``op`` as ``impl`` does."""
    if impl == "compile":
        formulation = torch_impl.proxy_attention if op == "proxy_attention" else getattr(reference, op)
        function = torch.compile(formulation, dynamic=False)
    else:
        function = getattr(ops, op)
    autocast = dtype == "bf16" and op.startswith("pointwise_depthwise")

    def call(*args):
        with _implementation(op, impl), torch.autocast(DEVICE.type, torch.bfloat16, enabled=autocast):
            return function(*args)
    return call


def make_run(op: str, shape, dtype: str, mode: str, impl: str):
    """A zero-argument call of the op in ``mode`` (fwd+bwd: the output's gradient is drawn at
    the first call, once its shape and dtype are known)."""
    function = op_function(op, impl, dtype)
    tensors, extra = make_inputs(op, shape, dtype, requires_grad=mode == "fwd+bwd")
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return function(*tensors, *extra)
        return run
    grad_out = []

    def run():
        out = function(*tensors, *extra)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        return torch.autograd.grad(out, tensors, grad_out[0])
    return run


@pytest.mark.parametrize("op,shape,dtype,mode,impl", list(_cases()))
def test_op(benchmark, op, shape, dtype, mode, impl):
    if not CUDA and impl == "triton" and not benchmark.disabled:
        pytest.skip("triton on the CPU is the Triton interpreter: checked in the smoke run, never timed")
    benchmark.group = f"{op} {shape.name} {dtype} {mode}"
    run = make_run(op, shape, dtype, mode, impl)
    result = record_op(benchmark, run, DEVICE, rounds=10 if CUDA else 5, table=op, case=shape.name,
                       dtype=dtype, mode=mode, impl=impl, baseline="reference", shape=repr(shape))
    assert_finite(result)
    if impl == "compile":
        torch._dynamo.reset()  # one static compile per case; keeps the cache small
