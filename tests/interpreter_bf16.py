"""bfloat16 arithmetic for the Triton interpreter (tests only; installed by conftest.py).

The interpreter keeps a bf16 tensor as its uint16 bit patterns and runs numpy on that storage:
``tl.dot`` multiplies the bit patterns (values ~1e10 for inputs of order 1), arithmetic and
comparisons act on the integers, and fp32 -> bf16 casts truncate where the GPU rounds to
nearest even. Upstream leaves bf16 unsupported there (triton-lang/triton#11584), so without
this every bf16 path of the kernels could only be checked on a GPU.

``install()`` wraps the interpreter's builder so that any op with a bf16 operand computes on
the float32 values and rounds a bf16 result to nearest even, which is what sm_80+ GPUs do for
bf16 elementwise math (each op in fp32, one rounding), and a bf16 ``tl.dot`` multiplies the
values exactly and sums in fp32, as the tensor cores' bf16 x bf16 -> fp32 products do (up to
the order of the sum). Loads, stores, selects, reshapes and ``tl.abs`` move bits and were
already right. tests/test_interpreter_bf16.py checks it op by op against torch.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

# Builder methods that compute on their operands' values (every other method moves bits).
# The lambdas behind create_fadd, create_fcmpOLT, create_exp2, create_fp_trunc, ... call these,
# so wrapping them covers every float op and cast.
_VALUE_METHODS = ("binary_op", "unary_op", "ternary_op", "create_fma", "create_dot", "create_erf",
                  "create_rsqrt", "cast_impl", "create_fp_to_fp")


def to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> their exact float32 values."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float values -> bf16 bit patterns (uint16), rounded to nearest even (torch's rounding)."""
    floats = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return floats.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _is_bf16(handle) -> bool:
    return isinstance(handle, interpreter.TensorHandle) and handle.dtype.scalar == tl.bfloat16


def _as_float32(handle):
    return interpreter.TensorHandle(to_float32(handle.data), tl.float32)


def _value_method(method):
    """Runs ``method`` on float32 values where an operand is bf16; a bf16 result (the operands'
    type, or a cast's target) is rounded back to bf16 bits."""

    @functools.wraps(method)
    def wrapped(self, *args):
        handles = [arg for arg in args if isinstance(arg, interpreter.TensorHandle)]
        target = args[1] if method.__name__ in ("cast_impl", "create_fp_to_fp") else None  # (src, dst_type, ...)
        casts_to_bf16 = target is not None and target.scalar == tl.bfloat16
        if not casts_to_bf16 and not any(_is_bf16(h) for h in handles):
            return method(self, *args)
        if casts_to_bf16:  # any rounding mode asked for is taken as to-nearest-even (the default)
            source = _as_float32(args[0]) if _is_bf16(args[0]) else args[0]
            return interpreter.TensorHandle(to_bf16_bits(source.data), tl.bfloat16)
        values = [_as_float32(arg) if _is_bf16(arg) else arg for arg in args]
        result = method(self, *values)
        if target is None and method.__name__ != "create_dot" and result.dtype.scalar == tl.float32 \
                and result.data.dtype == np.float32:
            # An arithmetic op whose own type was bf16 (its operands'): round as the GPU does.
            # (A cast from bf16 has its result in its target type; a dot accumulates in its own.)
            return interpreter.TensorHandle(to_bf16_bits(result.data), tl.bfloat16)
        return result

    wrapped.bf16_wrapped = True
    return wrapped


def _reduction(method):
    """ReduceOps.sum / min_max on a bf16 tensor: reduce the float32 values, round once."""

    @functools.wraps(method)
    def wrapped(self, input, *args, **kwargs):
        if input.dtype.scalar != tl.bfloat16:
            return method(self, input, *args, **kwargs)
        as_float = tl.core.tensor(_as_float32(input.handle), input.type.with_element_ty(tl.float32))
        result = method(self, as_float, *args, **kwargs)
        values = result[0] if isinstance(result, tuple) else result
        bits = to_bf16_bits(values.handle.data).reshape(values.handle.data.shape)
        rounded = tl.core.tensor(interpreter.TensorHandle(bits, tl.bfloat16), values.type.with_element_ty(tl.bfloat16)
                                 if isinstance(values.type, tl.block_type) else tl.bfloat16)
        return (rounded, *result[1:]) if isinstance(result, tuple) else rounded

    wrapped.bf16_wrapped = True
    return wrapped


def _get_bf16(self, value):
    """A bf16 constant (the builder has get_fp16 and get_fp32 only)."""
    return interpreter.TensorHandle(to_bf16_bits(np.array([value])), tl.bfloat16)


def install() -> None:
    """Wraps the interpreter's value methods and adds bf16 constants (idempotent)."""
    builder = interpreter.InterpreterBuilder
    if not hasattr(builder, "get_bf16"):
        builder.get_bf16 = _get_bf16
    missing = [name for name in _VALUE_METHODS if not hasattr(builder, name)]
    missing += [f"ReduceOps.{name}" for name in ("sum", "min_max") if not hasattr(interpreter.ReduceOps, name)]
    if missing:
        raise RuntimeError(f"tests/interpreter_bf16.py: this Triton's interpreter has no {', '.join(missing)}; "
                           "the bf16 shim needs updating for it")
    for name in _VALUE_METHODS:
        method = getattr(builder, name)
        if not getattr(method, "bf16_wrapped", False):
            setattr(builder, name, _value_method(method))
    for name in ("sum", "min_max"):
        method = getattr(interpreter.ReduceOps, name)
        if not getattr(method, "bf16_wrapped", False):
            setattr(interpreter.ReduceOps, name, _reduction(method))
