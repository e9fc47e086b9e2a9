"""The triton backend of depthwise_gate (the fused depthwise 3x3 convolution and gate) against
float64.

The kernel is inference-only: its tests run without autograd, on the CPU under
TRITON_INTERPRET=1 (conftest.py), with the default tiles and with forced blocks of 2 planes x
4 x 8 (masked tails on every axis, planes of two images in one block), in float64, float32
and float16, both gates, with and without bias, on strided inputs (strips, channel slices).
With autograd recording the op runs the torch formulation, whose output and gradients are
checked too. Tests marked ``gpu`` run SIPL's shapes on CUDA in float32 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sipl_fast
from sipl_fast import ops
from sipl_fast.kernels.depthwise3x3_gate import depthwise3x3_gate
from sipl_fast.modules import GatedFFN, LayerNorm2d
from sipl_fast.ops import depthwise_gate_triton, reference

from kernel_checks import (DEVICE, TOLERANCE, assert_close, float64_truth, max_errors, on_kernels,
                           outputs_and_grads)


def _inputs(batch, half, height, width, dtype, bias=True):
    channels = 2 * half
    tensors = [torch.randn(batch, channels, height, width, device=DEVICE),
               torch.randn(channels, 1, 3, 3, device=DEVICE) / 3,
               torch.randn(channels, device=DEVICE) if bias else None]
    return [None if t is None else t.to(dtype) for t in tensors]


def _truth(x, weight, bias, dual):
    with torch.no_grad():
        return reference.depthwise_gate(x.double(), weight.double(), None if bias is None else bias.double(), dual)


def _check_forward(x, weight, bias, dual, tol):
    with torch.no_grad():
        out = on_kernels(ops.depthwise_gate)(x, weight, bias, dual)
    expected = _truth(x, weight, bias, dual)
    assert out.dtype == x.dtype and out.shape == expected.shape and out.is_contiguous()
    assert_close(["out"], [out], [expected], tol)


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 3, 1, 1), (2, 4, 1, 13), (1, 3, 21, 37)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype, dual):
    """(batch, half the channels, height, width): odd sizes, a single pixel, a single row, several tiles."""
    _check_forward(*_inputs(*shape, dtype), dual, TOLERANCE[dtype])


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_without_bias(dual):
    _check_forward(*_inputs(2, 5, 6, 10, torch.float32, bias=False), dual, TOLERANCE[torch.float32])


def test_float32_weights_on_a_half_map():
    """Autocast's case (the training step's no-grad plain pass): a 16-bit 1x1 output and the
    float32 depthwise weights; the output keeps the map's dtype."""
    x, weight, bias = _inputs(2, 4, 5, 9, torch.float32)
    half = x.half()
    with torch.no_grad():
        out = on_kernels(ops.depthwise_gate)(half, weight, bias, True)
    assert out.dtype == torch.float16
    expected = _truth(half, weight, bias, True)
    assert (out.double() - expected).abs().max() <= TOLERANCE[torch.float16] * expected.abs().max()


@pytest.mark.parametrize("tile", [None, (2, 4, 8)], ids=["default-tiles", "2x4x8-tiles"])
@pytest.mark.parametrize("layout", ["strip", "channel_slice"])
@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_kernel_on_strided_maps(layout, tile, dual):
    """Against ATen in float64 on a strip x[..., lo:hi, :] and a channel slice of a larger
    map (read in place, as views), the inputs left untouched."""
    big = torch.randn(3, 14, 14, 9, device=DEVICE, dtype=torch.float64)
    x = big[:, :, 3:10] if layout == "strip" else big[:, 2:12]
    before = big.clone()
    assert not x.is_contiguous()
    weight = torch.randn(x.shape[1], 1, 3, 3, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(x.shape[1], dtype=torch.float64, device=DEVICE)
    got = depthwise3x3_gate(x, weight, bias, dual, tile=tile)
    torch.testing.assert_close(got, _truth(x, weight, bias, dual), rtol=0, atol=1e-11)
    assert torch.equal(big, before)


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_with_autograd_the_torch_formulation_gives_every_gradient(dual):
    inputs = _inputs(2, 4, 5, 9, torch.float32)
    cotangent = torch.randn(2, 4, 5, 9, device=DEVICE)
    op = lambda x, w, b: on_kernels(ops.depthwise_gate)(x, w, b, dual)  # noqa: E731
    truth = float64_truth(lambda x, w, b: reference.depthwise_gate(x, w, b, dual), inputs, cotangent)
    assert_close(["out", "dx", "dweight", "dbias"], outputs_and_grads(op, inputs, cotangent), truth,
                 TOLERANCE[torch.float32])


def test_channels_last_keeps_its_layout():
    x, weight, bias = _inputs(2, 3, 5, 7, torch.float32)
    x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = on_kernels(ops.depthwise_gate)(x, weight, bias, False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), _truth(x, weight, bias, False), rtol=0, atol=1e-4)


def test_empty_batch():
    x, weight, bias = _inputs(0, 3, 4, 5, torch.float32)
    with torch.no_grad():
        assert on_kernels(ops.depthwise_gate)(x, weight, bias, True).shape == (0, 3, 4, 5)


def test_bad_inputs_get_one_clear_error():
    x, weight, bias = _inputs(1, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"depthwise_gate: x must be a floating \(B, 2h, H, W\)"):
        ops.depthwise_gate(x[:, :5], weight[:5], bias[:5])
    with pytest.raises(ValueError, match=r"weight must be \(6, 1, 3, 3\)"):
        ops.depthwise_gate(x, weight[:4], bias)


def test_custom_op_passes_opcheck():
    x, weight, bias = _inputs(2, 3, 6, 9, torch.float32)
    torch.library.opcheck(depthwise_gate_triton.depthwise_gate_fwd, (x, weight, bias, False))
    torch.library.opcheck(depthwise_gate_triton.depthwise_gate_fwd, (x, weight, None, True))


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_feed_forward_without_autograd_equals_the_reference_backend(dual):
    """GatedFFN's inference route (1x1, then the fused op) against the reference backend."""
    torch.manual_seed(0)
    ffn, norm = GatedFFN(6, 2.66, bias=True, dual=dual).to(DEVICE), LayerNorm2d(6, with_bias=True).to(DEVICE)
    x = torch.randn(2, 6, 11, 13, device=DEVICE)
    with torch.no_grad():
        with sipl_fast.use_backend("reference"):
            expected = ffn.add_to(x, norm)
        got = on_kernels(lambda t: ffn.add_to(t, norm))(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), half=st.integers(1, 6), height=st.integers(1, 13), width=st.integers(1, 19),
       bias=st.booleans(), dual=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(batch, half, height, width, bias, dual, seed):
    torch.manual_seed(seed)  # each example's tensors, so that hypothesis can replay it
    _check_forward(*_inputs(batch, half, height, width, torch.float32, bias), dual, TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------- GPU: SIPL shapes

# (B, h, H, W): the GDFN of enc1 and dec1 in a 128x128 batch-8 step and at 512x512, the latent
# level's GDFN, a Proxy Fusion block's DualGate FFN (384 channels: hidden 1021).
GPU_SHAPES = [(8, 127, 128, 128), (8, 255, 128, 128), (1, 255, 512, 512), (1, 1021, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sipl_shapes(shape, dtype, dual):
    """FlashAttention's rule: the kernel's error against float64 at most twice that of the
    reference math run in the inputs' dtype (plus 1e-6 of the output's size)."""
    x, weight, bias = _inputs(*shape, dtype)
    truth = _truth(x, weight, bias, dual)
    with torch.no_grad():
        ours = on_kernels(ops.depthwise_gate)(x, weight, bias, dual)
        theirs = reference.depthwise_gate(x, weight, bias, dual)
    mine, base = max_errors([ours, theirs], [truth, truth])
    assert mine <= 2 * base + 1e-6 * max(truth.abs().max().item(), 1.0), (mine, base)


@pytest.mark.gpu
def test_gpu_torch_compile_traces_the_custom_op():
    x, weight, bias = _inputs(2, 127, 32, 32, torch.float32)
    with torch.no_grad():
        eager = depthwise_gate_triton.depthwise_gate(x, weight, bias, False)
        compiled = torch.compile(depthwise_gate_triton.depthwise_gate, fullgraph=True)(x, weight, bias, False)
    torch.testing.assert_close(compiled, eager)
