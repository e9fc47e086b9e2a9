"""The triton backend of layer_norm2d and gated_gelu against the float64 reference.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) at small shapes: odd C,
odd H and W (so pixel blocks end in masked tails), both LayerNorm variants (WithBias,
BiasFree) and both gates (GDFN, DualGate), float16, bfloat16, float32 and float64 (computed in float64),
the output and every gradient.
Tests marked ``gpu`` run the SIPL shapes on CUDA in float32 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sipl_fast
from sipl_fast import ops
from sipl_fast.ops import gated_gelu_triton, layer_norm2d_triton, reference

from kernel_checks import (DEVICE, EPS, TOLERANCE, assert_close, float64_truth, on_kernels, outputs_and_grads,
                           reference_rule)



def _layer_norm_inputs(shape, with_bias, dtype, param_dtype=None, offset=0.5, spread=2.0):
    channels = shape[1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, device=DEVICE) * spread + offset).to(dtype)
    weight = (torch.randn(channels, device=DEVICE) + 1).to(param_dtype)
    bias = torch.randn(channels, device=DEVICE).to(param_dtype) if with_bias else None
    return [x, weight, bias]


def _check_layer_norm(inputs, tol):
    names = ["out", "dx", "dweight"] + (["dbias"] if inputs[2] is not None else [])
    out_dtype = layer_norm2d_triton._output_dtype(*inputs)
    cotangent = torch.randn(inputs[0].shape, device=DEVICE).to(out_dtype)
    layer_norm = lambda x, w, b: ops.layer_norm2d(x, w, b, EPS)  # noqa: E731
    got = outputs_and_grads(on_kernels(layer_norm), inputs, cotangent)
    assert got[0].dtype == out_dtype
    assert_close(names, got, float64_truth(lambda x, w, b: reference.layer_norm2d(x, w, b, EPS),
                                           inputs, cotangent), tol, {"dx": _dx_terms(inputs, cotangent)})


def _dx_terms(inputs, cotangent) -> float:
    """The size of the terms of dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight:
    for nearly equal channels (few of them) rstd is large and dx, a difference, is small."""
    x, weight = inputs[0].double(), inputs[1].double()
    centred = x if inputs[2] is None else x - x.mean(1, keepdim=True)  # BiasFree is not centred
    rstd = ((x - x.mean(1, keepdim=True)).square().mean(1, keepdim=True) + EPS).rsqrt()
    return (rstd * (cotangent.double() * weight.view(1, -1, 1, 1)).abs().amax(1, keepdim=True)
            * (1 + (centred * rstd).abs().amax(1, keepdim=True))).max().item()


def _check_gate(x, dual, tol):
    cotangent = torch.randn(x.shape[0], x.shape[1] // 2, *x.shape[2:], device=DEVICE).to(x.dtype)
    got = outputs_and_grads(on_kernels(lambda t: ops.gated_gelu(t, dual)), [x], cotangent)
    assert got[0].dtype == x.dtype
    assert_close(["out", "dx"], got, float64_truth(lambda t: reference.gated_gelu(t, dual), [x], cotangent), tol)


def _assert_backward_is_deterministic(shape, dtype):
    """Two backward calls on the same inputs give bitwise equal dx, dweight and dbias."""
    x, weight, _ = _layer_norm_inputs(shape, True, dtype)
    dy = torch.randn_like(x)
    first = layer_norm2d_triton.layer_norm2d_bwd(dy, x, weight, True, EPS)
    second = layer_norm2d_triton.layer_norm2d_bwd(dy, x, weight, True, EPS)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- LayerNorm2d

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["WithBias", "BiasFree"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (2, 48, 7, 9), (1, 97, 9, 7), (3, 1, 1, 1)])
def test_layer_norm2d_matches_float64(shape, with_bias, dtype):
    _check_layer_norm(_layer_norm_inputs(shape, with_bias, dtype), TOLERANCE[dtype])


@pytest.mark.parametrize("with_bias", [True, False], ids=["WithBias", "BiasFree"])
def test_layer_norm2d_large_mean_is_stable(with_bias):
    """A mean of 300 over a spread of 1: E[x^2] - E[x]^2 in float32 would lose ~3 digits."""
    _check_layer_norm(_layer_norm_inputs((2, 48, 5, 7), with_bias, torch.float32, offset=300.0, spread=1.0), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm2d_half_input_float_params_keeps_the_input_dtype(dtype):
    """16-bit activations with float32 parameters (autocast) give a 16-bit output on the torch
    and triton backends (no float32 copy of the map); the reference promotes, as the authors' code."""
    inputs = _layer_norm_inputs((2, 20, 5, 7), True, dtype, param_dtype=torch.float32)
    with sipl_fast.use_backend("torch"):
        assert ops.layer_norm2d(*inputs).dtype == dtype
    with sipl_fast.use_backend("reference"):
        assert ops.layer_norm2d(*inputs).dtype == torch.float32
    _check_layer_norm(inputs, TOLERANCE[dtype])  # dx is 16-bit


@pytest.mark.parametrize("layout", ["channel_slice", "row_strip", "channels_last"])
def test_layer_norm2d_strided_inputs(layout):
    """A channel slice or a strip of rows (the refinement's strips) of a larger tensor is read in
    place; channels_last is copied first."""
    x, weight, bias = _layer_norm_inputs((2, 30, 5, 7), True, torch.float32)
    if layout == "channel_slice":
        x = torch.cat([x, torch.randn_like(x)], dim=1)[:, 3:33]
        assert not x.is_contiguous()
    elif layout == "row_strip":
        x = torch.cat([torch.randn_like(x), x, torch.randn_like(x)], dim=2)[:, :, 4:11]
        assert not x.is_contiguous() and layer_norm2d_triton._with_contiguous_planes(x) is x
    else:
        x = x.to(memory_format=torch.channels_last)
    _check_layer_norm([x, weight, bias], TOLERANCE[torch.float32])


def test_layer_norm2d_parameter_gradients_are_deterministic():
    _assert_backward_is_deterministic((2, 48, 9, 11), torch.float32)


def test_layer_norm2d_empty_batch():
    x, weight, bias = _layer_norm_inputs((0, 6, 3, 3), True, torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    out = on_kernels(ops.layer_norm2d)(x, weight, bias)
    out.sum().backward()
    assert out.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("with_bias", [True, False], ids=["WithBias", "BiasFree"])
def test_layer_norm2d_custom_ops_pass_opcheck(with_bias):
    x, weight, bias = _layer_norm_inputs((2, 5, 3, 7), with_bias, torch.float32)
    torch.library.opcheck(layer_norm2d_triton.layer_norm2d_fwd,
                          (x.requires_grad_(), weight.requires_grad_(), bias, EPS))
    torch.library.opcheck(layer_norm2d_triton.layer_norm2d_bwd,
                          (torch.randn_like(x), x.detach(), weight.detach(), with_bias, EPS))


# ----------------------------------------------------------------------------- gated gelu

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dual", [False, True], ids=["GDFN", "DualGate"])
@pytest.mark.parametrize("shape", [(2, 2, 7, 9), (2, 10, 7, 9), (1, 254, 9, 7)])
def test_gated_gelu_matches_float64(shape, dual, dtype):
    # A spread of 3 reaches the flat tails of erf on both sides.
    _check_gate((torch.randn(shape, device=DEVICE) * 3).to(dtype), dual, TOLERANCE[dtype])


@pytest.mark.parametrize("layout", ["channel_slice", "channels_last"])
def test_gated_gelu_strided_inputs(layout):
    """A channel slice of a larger tensor (batch stride only) is read in place; channels_last is copied."""
    x = torch.randn(3, 12, 5, 7, device=DEVICE)
    if layout == "channel_slice":
        x = torch.cat([x, torch.randn_like(x)], dim=1)[:, 5:17]
        assert not x.is_contiguous()
    else:
        x = x.to(memory_format=torch.channels_last)
    _check_gate(x, True, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dual", [False, True], ids=["GDFN", "DualGate"])
def test_gated_gelu_custom_ops_pass_opcheck(dual):
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    torch.library.opcheck(gated_gelu_triton.gated_gelu_fwd, (x.requires_grad_(), dual))
    torch.library.opcheck(gated_gelu_triton.gated_gelu_bwd, (torch.randn(2, 3, 3, 5, device=DEVICE), x.detach(), dual))


# ----------------------------------------------------------------------------- random shapes

@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 70), height=st.integers(1, 9),
       width=st.integers(1, 9), with_bias=st.booleans(), dual=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(batch, channels, height, width, with_bias, dual, seed):
    torch.manual_seed(seed)  # each example's tensors, so that hypothesis can replay it
    _check_layer_norm(_layer_norm_inputs((batch, channels, height, width), with_bias, torch.float32),
                      TOLERANCE[torch.float32])
    _check_gate(torch.randn(batch, 2 * channels, height, width, device=DEVICE) * 3, dual,
                TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------- GPU: SIPL shapes

# (B, C, H, W): enc1 and dec1/refinement at a 128x128 batch-8 training step and 512x512 inference,
# the latent level, and the 704-channel prompt-fusion block.
GPU_LAYER_NORM_SHAPES = [(8, 48, 128, 128), (8, 96, 128, 128), (1, 48, 512, 512), (1, 96, 512, 512),
                         (1, 192, 128, 128), (1, 384, 64, 64), (8, 704, 16, 16)]
# (B, 2h, H, W, dual): GDFN hidden 127/255/510 and the DualGate of the 96- and 384-channel PIM blocks.
GPU_GATE_SHAPES = [(8, 254, 128, 128, False), (1, 510, 512, 512, False), (1, 1020, 128, 128, False),
                   (8, 384, 64, 64, True), (1, 1536, 64, 64, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_LAYER_NORM_SHAPES)
def test_gpu_layer_norm2d_sipl_shapes(shape, dtype):
    inputs = _layer_norm_inputs(shape, True, dtype)
    layer_norm = lambda x, w, b: ops.layer_norm2d(x, w, b, EPS)  # noqa: E731
    if dtype == torch.float32:
        _check_layer_norm(inputs, 1e-4)
    else:
        reference_rule(on_kernels(layer_norm), lambda x, w, b: reference.layer_norm2d(x, w, b, EPS), inputs,
                   ["out", "dx", "dweight", "dbias"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_GATE_SHAPES)
def test_gpu_gated_gelu_sipl_shapes(shape, dtype):
    *size, dual = shape
    x = (torch.randn(size, device=DEVICE) * 3).to(dtype)
    if dtype == torch.float32:
        _check_gate(x, dual, 1e-5)
    else:
        reference_rule(on_kernels(lambda t: ops.gated_gelu(t, dual)), lambda t: reference.gated_gelu(t, dual), [x],
                   ["out", "dx"])


@pytest.mark.gpu
def test_gpu_bf16_activations_with_float32_parameters():
    """The autocast case: bf16 x, float32 weight and bias (float32 output, bf16 dx)."""
    _check_layer_norm(_layer_norm_inputs((8, 96, 64, 64), True, torch.bfloat16, param_dtype=torch.float32),
                      TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_results_are_identical_run_to_run():
    _assert_backward_is_deterministic((8, 96, 128, 128), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_torch_compile_traces_the_custom_ops():
    """fullgraph: the custom ops (called directly, not through the backend dispatch) need no graph break."""
    x, weight, bias = _layer_norm_inputs((2, 96, 32, 32), True, torch.float32)

    def block(t):
        normed = layer_norm2d_triton.layer_norm2d(t, weight, bias, EPS)
        return gated_gelu_triton.gated_gelu(torch.cat([normed, t], dim=1), True)

    x.requires_grad_()
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    cotangent = torch.randn_like(eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, x, cotangent), torch.autograd.grad(eager, x, cotangent))
