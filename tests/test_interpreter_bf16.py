"""The interpreter's bf16 emulation (interpreter_bf16, installed by conftest.py) against torch's
bf16 arithmetic, which rounds every op's float32 result to nearest even, as the GPU does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import interpreter_bf16
from sipl_fast.backends import triton_interpreter

pytestmark = pytest.mark.skipif(not triton_interpreter(), reason="checks the Triton interpreter")

N = 256


@triton.jit
def _elementwise_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i)
    b = tl.load(b_ptr + i)
    tl.store(out_ptr + 0 * N + i, a * b)
    tl.store(out_ptr + 1 * N + i, a + b)
    tl.store(out_ptr + 2 * N + i, a - b)
    tl.store(out_ptr + 3 * N + i, -a)
    tl.store(out_ptr + 4 * N + i, tl.maximum(a, b))
    tl.store(out_ptr + 5 * N + i, tl.minimum(a, b))
    tl.store(out_ptr + 6 * N + i, tl.where(a < b, a, b * 2.0))
    tl.store(out_ptr + 7 * N + i, tl.fma(a, b, a))
    tl.store(out_ptr + 8 * N + i, tl.abs(a))


def test_elementwise_ops_round_like_torch():
    a, b = torch.randn(2, N).bfloat16()
    out = torch.empty(9 * N, dtype=torch.bfloat16)
    _elementwise_kernel[(1,)](a, b, out, N)
    expected = [a * b, a + b, a - b, -a, torch.maximum(a, b), torch.minimum(a, b), torch.where(a < b, a, b * 2),
                (a.float() * b.float() + a.float()).bfloat16(), a.abs()]
    for index, reference in enumerate(expected):
        assert torch.equal(out[index * N:(index + 1) * N], reference), f"op {index}"


@triton.jit
def _cast_kernel(x_ptr, bits_ptr, back_ptr, half_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    rounded = tl.load(x_ptr + i).to(tl.bfloat16)
    tl.store(bits_ptr + i, rounded)
    tl.store(back_ptr + i, rounded.to(tl.float32) * 3.0)
    tl.store(half_ptr + i, rounded.to(tl.float16))


def test_casts_round_to_nearest_even_and_back_is_exact():
    # Random values, exact ties between two bf16 numbers (even and odd lower neighbours),
    # values that round up into the next binade, subnormals, infinities.
    ties = (torch.arange(N // 4, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    edges = torch.tensor([1.9999999, -3.9999998, 1e-40, -1e-39, float("inf"), -float("inf"), 0.0, -0.0])
    x = torch.cat([torch.randn(N - N // 4 - edges.numel()), ties + 1.0, edges])
    bits = torch.empty(N, dtype=torch.bfloat16)
    back = torch.empty(N)
    half = torch.empty(N, dtype=torch.float16)
    _cast_kernel[(1,)](x, bits, back, half, N)
    assert torch.equal(bits.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(back, x.bfloat16().float() * 3)
    assert torch.equal(half.view(torch.int16), x.bfloat16().half().view(torch.int16))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rows, inner, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b) + tl.dot(a, b.to(tl.float32).to(tl.bfloat16)))


def test_dot_multiplies_values_and_sums_in_float32():
    a = torch.randn(32, 64).bfloat16()
    b = torch.randn(64, 16).bfloat16()
    out = torch.empty(32, 16)
    _dot_kernel[(1,)](a, b, out, 32, 64, 16)
    exact = 2 * (a.double() @ b.double())
    # fp32 summation of 64 exact products: a few fp32 roundings of the terms' size.
    scale = (a.double().abs() @ b.double().abs()) * 2
    assert ((out.double() - exact).abs() <= 64 * 2.0 ** -24 * scale).all()


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + 0, tl.max(x, axis=0))
    tl.store(out_ptr + 1, tl.min(x, axis=0))
    tl.store(out_ptr + 2, tl.sum(x, axis=0).to(tl.bfloat16))


def test_reductions_order_by_value():
    # All negative: the uint16 bit patterns order them backwards.
    x = -(torch.rand(N) + 0.5).bfloat16()
    out = torch.empty(3, dtype=torch.bfloat16)
    _reduce_kernel[(1,)](x, out, N)
    assert out[0] == x.max() and out[1] == x.min()
    assert abs(out[2].float() - x.float().sum()) <= 2.0 ** -8 * x.float().abs().sum()


def test_conversions_are_exact_inverses():
    bits = np.arange(0, 2 ** 16, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(interpreter_bf16.to_float32(bits))
    assert np.array_equal(interpreter_bf16.to_bf16_bits(interpreter_bf16.to_float32(bits))[finite], bits[finite])
