"""The triton backend of pointwise_depthwise_gate (1x1 convolution, then the fused depthwise
3x3 convolution and gate) against float64.

The fused kernel is inference-only: its tests run without autograd, on the CPU under
TRITON_INTERPRET=1 (conftest.py), with the default tiles and with forced blocks of 2 planes x
4 x 8 (masked tails on every axis, planes of two images in one block), in float64, float32,
float16 and bfloat16, both gates, with and without biases, on strided inputs (strips, channel slices).
With autograd recording the op runs the torch formulation, whose output and every gradient
are checked too. Tests marked ``gpu`` run SIPL's shapes on CUDA in float32 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sipl_fast
from sipl_fast import ops
from sipl_fast.kernels.depthwise3x3_gate import depthwise3x3_gate
from sipl_fast.modules import GatedFFN, LayerNorm2d
from sipl_fast.ops import pointwise_depthwise_gate_triton, reference

from kernel_checks import (DEVICE, TOLERANCE, assert_close, float64_truth, max_errors, on_kernels,
                           outputs_and_grads, PROJECTION_NAMES as NAMES, projection_inputs)

def _inputs(batch, channels, half, height, width, dtype, biases=True):
    return projection_inputs(batch, channels, 2 * half, height, width, dtype, biases)


def _truth(inputs, dual):
    with torch.no_grad():
        return reference.pointwise_depthwise_gate(*[None if t is None else t.double() for t in inputs], dual)


def _check_forward(inputs, dual, tol):
    with torch.no_grad():
        out = on_kernels(ops.pointwise_depthwise_gate)(*inputs, dual)
    expected = _truth(inputs, dual)
    assert out.dtype == inputs[0].dtype and out.shape == expected.shape and out.is_contiguous()
    assert_close(["out"], [out], [expected], tol)


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 3, 6, 7), (1, 4, 3, 1, 1), (2, 3, 4, 1, 13), (1, 6, 3, 21, 37)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype, dual):
    """(batch, channels, half the hidden channels, height, width): odd sizes, a single pixel,
    a single row, several tiles."""
    _check_forward(_inputs(*shape, dtype), dual, TOLERANCE[dtype])


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_without_biases(dual):
    _check_forward(_inputs(2, 6, 5, 6, 10, torch.float32, biases=False), dual, TOLERANCE[torch.float32])


def test_float32_weights_on_a_half_map():
    """Autocast's case (the training step's no-grad plain pass): a 16-bit 1x1 output and the
    float32 depthwise weights; the output keeps the map's dtype."""
    x, pointwise, pointwise_bias, weight, bias = _inputs(2, 6, 4, 5, 9, torch.float32)
    hidden = F.conv2d(x, pointwise, pointwise_bias).half()
    with torch.no_grad():
        out = pointwise_depthwise_gate_triton.depthwise_gate_fwd(hidden, weight, bias, True)
    assert out.dtype == torch.float16
    expected = reference.gated_gelu(F.conv2d(hidden.double(), weight.double(), bias.double(), padding=1,
                                             groups=weight.shape[0]), True)
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
    expected = reference.gated_gelu(F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]), dual)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)
    assert torch.equal(big, before)


@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
def test_with_autograd_the_torch_formulation_gives_every_gradient(dual):
    inputs = _inputs(2, 5, 4, 5, 9, torch.float32)
    cotangent = torch.randn(2, 4, 5, 9, device=DEVICE)
    op = lambda *tensors: on_kernels(ops.pointwise_depthwise_gate)(*tensors, dual)  # noqa: E731
    truth = float64_truth(lambda *tensors: reference.pointwise_depthwise_gate(*tensors, dual), inputs, cotangent)
    assert_close(NAMES, outputs_and_grads(op, inputs, cotangent), truth, TOLERANCE[torch.float32])


def test_channels_last_keeps_its_layout():
    inputs = _inputs(2, 5, 3, 5, 7, torch.float32)
    inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = on_kernels(ops.pointwise_depthwise_gate)(*inputs, False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), _truth(inputs, False), rtol=0, atol=1e-4)


def test_empty_batch():
    inputs = _inputs(0, 5, 3, 4, 5, torch.float32)
    with torch.no_grad():
        assert on_kernels(ops.pointwise_depthwise_gate)(*inputs, True).shape == (0, 3, 4, 5)


def test_bad_inputs_get_one_clear_error():
    x, pointwise, pointwise_bias, weight, bias = _inputs(1, 5, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"pointwise_depthwise_gate: x must be a floating \(B, C, H, W\)"):
        ops.pointwise_depthwise_gate(x[0], pointwise, pointwise_bias, weight, bias)
    with pytest.raises(ValueError, match=r"weights must be \(6, 5, 1, 1\) and \(6, 1, 3, 3\)"):
        ops.pointwise_depthwise_gate(x, pointwise, pointwise_bias, weight[:4], bias)
    with pytest.raises(ValueError, match=r"even number of channels"):
        ops.pointwise_depthwise_gate(x, pointwise[:5], pointwise_bias[:5], weight[:5], bias[:5])


def test_custom_op_passes_opcheck():
    hidden = torch.randn(2, 6, 6, 9, device=DEVICE)
    weight, bias = torch.randn(6, 1, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE)
    torch.library.opcheck(pointwise_depthwise_gate_triton.depthwise_gate_fwd, (hidden, weight, bias, False))
    torch.library.opcheck(pointwise_depthwise_gate_triton.depthwise_gate_fwd, (hidden, weight, None, True))


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
@given(batch=st.integers(1, 3), channels=st.integers(1, 9), half=st.integers(1, 6), height=st.integers(1, 13),
       width=st.integers(1, 19), biases=st.booleans(), dual=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(batch, channels, half, height, width, biases, dual, seed):
    torch.manual_seed(seed)  # each example's tensors, so that hypothesis can replay it
    _check_forward(_inputs(batch, channels, half, height, width, torch.float32, biases), dual,
                   TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------- GPU: SIPL shapes

# (B, C, h, H, W): the GDFN of enc1 and dec1 in a 128x128 batch-8 step and at 512x512, the
# latent level's GDFN (384 channels: hidden 1021).
GPU_SHAPES = [(8, 48, 127, 128, 128), (8, 96, 255, 128, 128), (1, 96, 255, 512, 512), (1, 384, 1021, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dual", [False, True], ids=["gdfn", "dual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sipl_shapes(shape, dtype, dual):
    """FlashAttention's rule: the kernel's error against float64 at most twice that of the
    reference math run in the inputs' dtype (plus 1e-6 of the output's size)."""
    inputs = _inputs(*shape, dtype)
    truth = _truth(inputs, dual)
    with torch.no_grad():
        ours = on_kernels(ops.pointwise_depthwise_gate)(*inputs, dual)
        theirs = reference.pointwise_depthwise_gate(*inputs, dual)
    mine, base = max_errors([ours, theirs], [truth, truth])
    assert mine <= 2 * base + 1e-6 * max(truth.abs().max().item(), 1.0), (mine, base)


@pytest.mark.gpu
def test_gpu_torch_compile_traces_the_custom_op(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # as in test_depthwise_triton's compile test
    inputs = _inputs(2, 48, 127, 32, 32, torch.float32)
    op = pointwise_depthwise_gate_triton.pointwise_depthwise_gate
    with torch.no_grad():
        eager = op(*inputs, False)
        compiled = torch.compile(op, fullgraph=True)(*inputs, False)
    torch.testing.assert_close(compiled, eager)
