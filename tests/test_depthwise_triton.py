"""The triton backend of pointwise_depthwise (its depthwise 3x3 kernels) against float64.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py): planes up to 16 x 32 in one
tile, larger ones in several; the kernel-level tests also force blocks of 2 planes x 4 x 8, so
that blocks end in masked tails on every axis (planes of two images in one block). Planes of one pixel and one row test the padding alone. Every gradient (x, both weights, both biases) is checked,
with and without biases, in float64, float32, float16 and bfloat16, on strided inputs (strips, channel
slices). Tests marked ``gpu`` run SIPL's shapes on CUDA in float32 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sipl_fast
from sipl_fast import ops
from sipl_fast.kernels.depthwise3x3 import depthwise3x3, depthwise3x3_weight_grad
from sipl_fast.kernels.depthwise3x3_gate import depthwise3x3_gate
from sipl_fast.ops import pointwise_depthwise_triton, reference

from kernel_checks import (DEVICE, TOLERANCE, assert_close, compile_sm90, float64_truth, on_kernels,
                           outputs_and_grads, PROJECTION_NAMES as NAMES, projection_inputs, reference_rule,
                           run_compiled)

def _check(inputs, tol):
    x = inputs[0]
    hidden = inputs[1].shape[0]
    cotangent = torch.randn(x.shape[0], hidden, *x.shape[2:], device=DEVICE).to(x.dtype)
    got = outputs_and_grads(on_kernels(ops.pointwise_depthwise), inputs, cotangent)
    assert got[0].dtype == x.dtype and got[0].shape == cotangent.shape
    names = [n for n, t in zip(NAMES, [x, *inputs]) if t is not None]
    assert_close(names, got, float64_truth(reference.pointwise_depthwise, inputs, cotangent), tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 9), (1, 3, 4, 1, 1), (2, 4, 3, 1, 13), (1, 3, 5, 21, 37)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, dtype):
    """(batch, channels, hidden, height, width): odd sizes, a single pixel, a single row, several tiles."""
    _check(projection_inputs(*shape, dtype), TOLERANCE[dtype])


def test_without_biases():
    _check(projection_inputs(2, 5, 7, 6, 10, torch.float32, biases=False), TOLERANCE[torch.float32])


def test_float32_weights_on_a_half_map():
    """Autocast's case: the 1x1 output is 16-bit and the depthwise weights float32; the output
    keeps the map's dtype and each gradient its input's dtype."""
    x, *params = projection_inputs(2, 6, 8, 5, 9, torch.float32)
    hidden = F.conv2d(x, params[0], params[1]).half()
    weight, bias = params[2], params[3]
    out = on_kernels(pointwise_depthwise_triton.depthwise3x3_fwd)(hidden, weight, bias, False)
    assert out.dtype == torch.float16
    expected = F.conv2d(hidden.double(), weight.double(), bias.double(), padding=1, groups=weight.shape[0])
    assert (out.double() - expected).abs().max() <= TOLERANCE[torch.float16] * expected.abs().max()


@pytest.mark.parametrize("tile", [None, (2, 4, 8)], ids=["default-tiles", "2x4x8-tiles"])
@pytest.mark.parametrize("layout", ["strip", "channel_slice"])
def test_kernels_on_strided_maps(layout, tile):
    """The three kernels against ATen in float64, on a strip x[..., lo:hi, :] and a channel
    slice of a larger map (read in place, as views)."""
    big = torch.randn(2, 12, 14, 9, device=DEVICE, dtype=torch.float64)
    x = big[:, :, 3:10] if layout == "strip" else big[:, 2:9]
    assert not x.is_contiguous()
    channels = x.shape[1]
    weight = torch.randn(channels, 1, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(channels, dtype=torch.float64, device=DEVICE, requires_grad=True)
    leaf = x.detach().requires_grad_()
    expected = F.conv2d(leaf, weight, bias, padding=1, groups=channels)
    dout = torch.randn_like(expected)
    expected.backward(dout)
    exact = dict(rtol=0, atol=1e-11)
    torch.testing.assert_close(depthwise3x3(x, weight.detach(), bias.detach(), tile=tile), expected.detach(), **exact)
    torch.testing.assert_close(depthwise3x3(dout, weight.detach(), flip=True, tile=tile), leaf.grad, **exact)
    grad_weight, grad_bias = depthwise3x3_weight_grad(dout, x, tile=tile)
    torch.testing.assert_close(grad_weight, weight.grad, **exact)
    torch.testing.assert_close(grad_bias, bias.grad, **exact)


def test_row_chunks_and_strips_equal_aten():
    """Blocks of two planes, 4 rows and 8 columns on a 14x30 map: every kernel streams 4-row
    chunks of 8-column strips (each chunk's first row reads the previous chunk's last, strips
    meet inside the map, the last chunk and strip are partial), and an odd plane count leaves
    the last program's planes partly empty: forward, input gradient, weight gradient and the
    fused gate equal float64 ATen everywhere."""
    x = torch.randn(1, 5, 14, 30, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(5, dtype=torch.float64, device=DEVICE)
    tile, exact = (2, 4, 8), dict(rtol=0, atol=1e-11)
    expected = F.conv2d(x, weight, bias, padding=1, groups=5)
    torch.testing.assert_close(depthwise3x3(x, weight, bias, tile=tile), expected, **exact)
    torch.testing.assert_close(depthwise3x3(x, weight, flip=True, tile=tile),
                               F.conv2d(x, weight.flip(-1, -2), padding=1, groups=5), **exact)
    dout = torch.randn_like(x)
    leaf_weight, leaf_bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    F.conv2d(x, leaf_weight, leaf_bias, padding=1, groups=5).backward(dout)
    grad_weight, grad_bias = depthwise3x3_weight_grad(dout, x, tile=tile)
    torch.testing.assert_close(grad_weight, leaf_weight.grad, **exact)
    torch.testing.assert_close(grad_bias, leaf_bias.grad, **exact)
    pairs = torch.randn(1, 6, 14, 30, dtype=torch.float64, device=DEVICE)
    pair_weight, pair_bias = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    gated = reference.gated_gelu(F.conv2d(pairs, pair_weight, pair_bias, padding=1, groups=6), True)
    torch.testing.assert_close(depthwise3x3_gate(pairs, pair_weight, pair_bias, True, tile=tile), gated, **exact)


def test_channels_last_keeps_its_layout():
    """NHWC maps keep the torch route (cuDNN's NHWC depthwise) and stay channels_last."""
    inputs = projection_inputs(2, 6, 8, 5, 7, torch.float32)
    inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    with sipl_fast.use_backend("triton"):
        out = on_kernels(ops.pointwise_depthwise)(*inputs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check(inputs, TOLERANCE[torch.float32])


def test_weight_gradients_are_identical_run_to_run():
    x, dout = torch.randn(3, 7, 11, 13, device=DEVICE), torch.randn(3, 7, 11, 13, device=DEVICE)
    first, second = (depthwise3x3_weight_grad(dout, x, tile=(2, 4, 8)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_without_autograd_equals_the_autograd_path():
    inputs = projection_inputs(2, 5, 6, 7, 9, torch.float32)
    run = on_kernels(ops.pointwise_depthwise)
    with torch.no_grad():
        plain = run(*inputs)
    tracked = run(inputs[0].requires_grad_(), *inputs[1:])
    assert tracked.requires_grad and torch.equal(plain, tracked.detach())


def test_empty_batch():
    x, *params = projection_inputs(0, 4, 6, 3, 5, torch.float32)
    params = [p.requires_grad_() for p in params]
    out = on_kernels(ops.pointwise_depthwise)(x, *params)
    out.sum().backward()
    assert out.shape == (0, 6, 3, 5) and torch.equal(params[2].grad, torch.zeros_like(params[2]))


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 5, 6, 9, device=DEVICE)
    weight, bias = torch.randn(5, 1, 3, 3, device=DEVICE), torch.randn(5, device=DEVICE)
    torch.library.opcheck(pointwise_depthwise_triton.depthwise3x3_fwd, (x, weight, bias, False))
    torch.library.opcheck(pointwise_depthwise_triton.depthwise3x3_fwd, (x, weight, None, True))
    torch.library.opcheck(pointwise_depthwise_triton.depthwise3x3_wgrad, (torch.randn_like(x), x))


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 9), hidden=st.integers(1, 12),
       height=st.integers(1, 13), width=st.integers(1, 19), biases=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(batch, channels, hidden, height, width, biases, seed):
    torch.manual_seed(seed)  # each example's tensors, so that hypothesis can replay it
    _check(projection_inputs(batch, channels, hidden, height, width, torch.float32, biases), TOLERANCE[torch.float32])


def compile_for_sm90() -> list[str]:
    """Compiles the row-streaming depthwise kernels (the forward with each gate, the weight
    gradient) with the GPU configs of SIPL's plane sizes for sm_90 (no GPU needed; the
    interpreter checks none of what the compiler does) and returns the failures. Needs
    TRITON_INTERPRET unset before the kernels are imported, hence its own process."""
    import triton
    from sipl_fast.kernels import depthwise3x3 as kernels
    failures = []
    variants = [(kernels.depthwise3x3_fwd_kernel, {"GATE": gate, "FLIP": gate == 0}) for gate in (0, 1, 2)]
    for kernel, flags in variants + [(kernels.depthwise3x3_wgrad_kernel, {})]:
        for dtype in ("bf16", "fp32"):
            for plane in ((512, 512), (720, 1280), (64, 64), (16, 16), (7, 9)):
                block_c, rows, block_w, warps = kernels.stream_config(*plane)
                constants = dict(BLOCK_C=block_c, BLOCK_R=rows, BLOCK_W=block_w, COMPUTE=triton.language.float32,
                                 WIDE=plane == (720, 1280), **flags)  # both offset widths
                if "HAS_BIAS" in kernel.arg_names:
                    constants["HAS_BIAS"] = True
                pointer_type = lambda name: "*fp32" if name in ("w_ptr", "b_ptr", "partial_ptr") else f"*{dtype}"  # noqa: E731,B023
                try:
                    compile_sm90(kernel, constants, pointer_type, warps)
                except Exception as error:  # noqa: BLE001 - reported with its config
                    failures.append(f"{kernel.fn.__name__} {flags} {dtype} {plane}: {type(error).__name__}: "
                                    f"{str(error)[-600:]}")
    return failures


def test_gpu_configs_compile_for_sm90():
    result = run_compiled(__file__, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# ----------------------------------------------------------------------------- GPU: SIPL shapes

# (B, C, hidden, H, W): the qkv and GDFN projections of enc1 and dec1 in a 128x128 batch-8
# training step and at 512x512, the latent level's GDFN, a Proxy Fusion block's kv (384 -> 768).
GPU_SHAPES = [(8, 48, 144, 128, 128), (8, 48, 254, 128, 128), (8, 96, 510, 128, 128),
              (1, 96, 288, 512, 512), (1, 384, 2040, 64, 64), (1, 384, 768, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sipl_shapes(shape, dtype, monkeypatch):
    inputs = projection_inputs(*shape, dtype)
    if dtype == torch.float32:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the 1x1 convolutions: exact products
        _check(inputs, 1e-4)
    else:
        reference_rule(on_kernels(ops.pointwise_depthwise), reference.pointwise_depthwise, inputs, NAMES)


@pytest.mark.gpu
def test_gpu_weight_gradients_are_identical_run_to_run():
    x, dout = torch.randn(8, 510, 128, 128, device=DEVICE), torch.randn(8, 510, 128, 128, device=DEVICE)
    first, second = depthwise3x3_weight_grad(dout, x), depthwise3x3_weight_grad(dout, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_gpu_torch_compile_traces_the_custom_ops(monkeypatch):
    # Inductor runs the 1x1 convolution and its weight gradient as float32 matmuls, eager calls
    # as cuDNN convolutions: other summation orders, whose float32 results differ by more than
    # assert_close's defaults where the entries are large. So the compiled op is held to FlashAttention's rule
    # against float64, as the eager kernels are, with cuDNN's TF32 off so that the reference
    # math runs in float32 (TF32 would widen the bound enough to hide an error).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    inputs = projection_inputs(2, 48, 144, 32, 32, torch.float32)
    compiled = torch.compile(pointwise_depthwise_triton.pointwise_depthwise, fullgraph=True)
    reference_rule(compiled, reference.pointwise_depthwise, inputs, NAMES)


if __name__ == "__main__":  # the subprocess of test_gpu_configs_compile_for_sm90
    problems = compile_for_sm90()
    print("\n".join(problems) or "the kernels compile for sm_90")
    raise SystemExit(1 if problems else 0)
