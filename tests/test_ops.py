"""The public ops on the reference and torch backends against float64, and their input checks.

(The triton backend has its own files: tests/test_*_triton.py.)
"""
from __future__ import annotations

import pytest
import torch

import sipl_fast
from sipl_fast import ops
from sipl_fast.ops import reference

BACKENDS = ["reference", "torch"]


def _grads(fn, inputs, weight):
    out = fn(*inputs)
    grads = torch.autograd.grad((out * weight).sum(), [t for t in inputs if isinstance(t, torch.Tensor)])
    return out, grads


def _compare(op_name, make_inputs, backend, num_heads, tol=2e-5):
    """op on `backend` in float32 vs the reference math in float64: output and every gradient."""
    inputs64 = [t.double().requires_grad_() for t in make_inputs()]
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    ref_fn = getattr(reference, op_name)
    with torch.no_grad():
        weight = torch.randn(ref_fn(*inputs64, num_heads).shape, dtype=torch.float64)
    expected, expected_grads = _grads(lambda *a: ref_fn(*a, num_heads), inputs64, weight)
    with sipl_fast.use_backend(backend):
        got, got_grads = _grads(lambda *a: getattr(ops, op_name)(*a, num_heads), inputs32, weight.float())
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtemperature"], [got, *got_grads], [expected, *expected_grads]):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().clamp_min(1.0)
        assert (a.double() - b).abs().max() <= tol * scale, f"{name}: {(a.double() - b).abs().max():.3g}"


PROXY_CASES = [
    # (Bq, Bk, heads, d, (Hq, Wq), (Hk, Wk))
    (2, 2, 1, 40, (3, 5), (4, 4)),
    (1, 3, 2, 48, (4, 4), (5, 3)),   # batch-1 query (the dictionary in p*_cross)
    (3, 1, 4, 96, (2, 3), (3, 3)),   # batch-1 keys (the dictionary in cross_p*)
    (2, 2, 1, 384, (2, 2), (3, 2)),  # p3_cross head dim
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bq,bk,heads,d,qhw,khw", PROXY_CASES)
def test_proxy_attention_matches_float64(backend, bq, bk, heads, d, qhw, khw):
    c = heads * d

    def make():
        return [torch.randn(bq, c, *qhw), torch.randn(bk, c, *khw), torch.randn(bk, c, *khw),
                0.5 + 3 * torch.rand(heads, 1, 1)]
    _compare("proxy_attention", make, backend, heads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,heads,hw", [(40, 1, (3, 5)), (96, 2, (4, 3)), (176, 4, (2, 3)), (48, 8, (5, 5))])
def test_transposed_attention_matches_float64(backend, c, heads, hw):
    def make():
        return [torch.randn(2, c, *hw), torch.randn(2, c, *hw), torch.randn(2, c, *hw),
                0.5 + 3 * torch.rand(heads, 1, 1)]
    _compare("transposed_attention", make, backend, heads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_temperature(backend):
    def make():
        return [torch.randn(1, 48, 4, 4), torch.randn(2, 48, 3, 3), torch.randn(2, 48, 3, 3),
                torch.full((1, 1, 1), 50.0)]
    _compare("proxy_attention", make, backend, 1, tol=1e-4)

    def make_t():
        return [torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4),
                torch.full((2, 1, 1), 50.0)]
    _compare("transposed_attention", make_t, backend, 2, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_tokens_are_finite_and_match(backend):
    """Zero dictionaries (the authors' initialisation) give zero q: finite output and gradients."""
    def make():
        q = torch.randn(1, 96, 4, 4)
        q[..., 0, :] = 0          # some zero query tokens
        k = torch.randn(2, 96, 3, 3)
        k[..., 1, 1] = 0          # a zero key token
        return [q, k, torch.randn(2, 96, 3, 3), torch.rand(1, 1, 1) + 0.5]
    _compare("proxy_attention", make, backend, 1)

    def make_t():
        q = torch.randn(1, 48, 4, 4)
        q[:, 3] = 0               # a zero channel (a zero-norm row of the c x c problem)
        return [q, torch.randn(1, 48, 4, 4), torch.randn(1, 48, 4, 4), torch.rand(1, 1, 1) + 0.5]
    _compare("transposed_attention", make_t, backend, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_transposed_attention_with_a_zero_channel(backend):
    """Channels-last maps (the CPU's training and refinement layout) with a zero-norm row:
    finite output and gradients equal to float64 (F.normalize's eps semantics)."""
    def make():
        q = torch.randn(2, 48, 5, 4)
        q[:, 7] = 0
        return [t.contiguous(memory_format=torch.channels_last) for t in
                (q, torch.randn(2, 48, 5, 4), torch.randn(2, 48, 5, 4))] + [torch.rand(2, 1, 1) + 0.5]
    _compare("transposed_attention", make, backend, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_and_gate_match_float64(backend):
    x64 = (torch.randn(2, 7, 3, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    w64 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    for bias64, bias32 in ((b64, b32), (None, None)):
        expected = reference.layer_norm2d(x64, w64, bias64, 1e-5)
        with sipl_fast.use_backend(backend):
            got = ops.layer_norm2d(x32, w32, bias32, 1e-5)
        wanted = [x64, w64] + ([bias64] if bias64 is not None else [])
        given = [x32, w32] + ([bias32] if bias32 is not None else [])
        g = torch.randn_like(expected)
        for a, b in zip(torch.autograd.grad((got * g.float()).sum(), given),
                        torch.autograd.grad((expected * g).sum(), wanted)):
            assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    for dual in (False, True):
        h64 = torch.randn(2, 10, 3, 4, dtype=torch.float64, requires_grad=True)
        h32 = h64.detach().float().requires_grad_()
        expected = reference.gated_gelu(h64, dual)
        with sipl_fast.use_backend(backend):
            got = ops.gated_gelu(h32, dual)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        g = torch.randn_like(expected)
        (grad32,) = torch.autograd.grad((got * g.float()).sum(), h32)
        (grad64,) = torch.autograd.grad((expected * g).sum(), h64)
        assert (grad32.double() - grad64).abs().max() <= 1e-5 * grad64.abs().max()


@pytest.mark.parametrize("dual", [False, True])
def test_torch_gate_keeps_only_its_input_and_is_accurate_in_bf16(dual):
    """The torch backend's gate saves x alone for the backward (autograd of the plain
    expression also keeps gelu(a)); in bf16 its errors stay within 2x the reference's."""
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with sipl_fast.use_backend("torch"):
            ops.gated_gelu(x * 1.0, dual)
    assert sum(saved) == x.numel()
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    truth = torch.autograd.grad((reference.gated_gelu(x, dual) * g).sum(), x)[0]
    errors = {}
    for backend in ("torch", "reference"):
        x16 = x.detach().bfloat16().requires_grad_()
        with sipl_fast.use_backend(backend):
            out = ops.gated_gelu(x16, dual)
        grad = torch.autograd.grad((out * g.bfloat16()).sum(), x16)[0]
        errors[backend] = (grad.double() - truth).abs().max()
    assert errors["torch"] <= 2 * errors["reference"] + 1e-3 * truth.abs().max()


def test_bad_inputs_raise_one_clear_error():
    q = torch.randn(2, 8, 4, 4)
    t = torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match="4-D"):
        ops.proxy_attention(q[0], q, q, t, 2)
    with pytest.raises(ValueError, match="channel counts differ"):
        ops.proxy_attention(q, torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4), t, 2)
    with pytest.raises(TypeError, match="share dtype and device"):
        ops.proxy_attention(q, q.double(), q, t, 2)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        ops.transposed_attention(q, q, q, torch.ones(3, 1, 1), 3)
    with pytest.raises(ValueError, match="one value per head"):
        ops.transposed_attention(q, q, q, torch.ones(3, 1, 1), 2)
    with pytest.raises(ValueError, match="batch sizes 2 .* and 3"):
        ops.proxy_attention(q, torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), t, 2)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        ops.proxy_attention(q, q, torch.randn(2, 8, 3, 4), t, 2)
    with pytest.raises(ValueError, match="one shape"):
        ops.transposed_attention(q, q, torch.randn(2, 8, 3, 4), t, 2)
    with pytest.raises(TypeError, match="floating"):
        ops.transposed_attention(q.long(), q.long(), q.long(), t, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        with sipl_fast.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="weight must be"):
        ops.layer_norm2d(q, torch.ones(3), None)
    with pytest.raises(ValueError, match="gated_gelu"):
        ops.gated_gelu(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_empty_attention_inputs_raise_one_clear_error(backend):
    """No images, no query pixels or no keys (a softmax over nothing): the same ValueError on
    every backend, where they used to fail each their own way (a segfault in the interpreter)."""
    t = torch.ones(1, 1, 1)
    full, no_batch, no_pixels = torch.randn(1, 8, 2, 2), torch.randn(0, 8, 2, 2), torch.randn(1, 8, 0, 3)
    with sipl_fast.use_backend(backend):
        for q, kv in ((no_batch, full), (full, no_batch), (no_pixels, full), (full, no_pixels)):
            with pytest.raises(ValueError, match="proxy_attention: q, k and v need at least one image"):
                ops.proxy_attention(q, kv, kv, t, 1)
        for x in (no_batch, no_pixels):
            with pytest.raises(ValueError, match="transposed_attention: q, k and v need at least one image"):
                ops.transposed_attention(x, x, x, t, 1)


def test_backend_selection(monkeypatch):
    from sipl_fast.backends import resolve_backend
    cpu = torch.device("cpu")
    assert resolve_backend(cpu) == "torch"
    with sipl_fast.use_backend("reference"):
        assert resolve_backend(cpu) == "reference"
        with sipl_fast.use_backend("torch"):
            assert resolve_backend(cpu) == "torch"
        assert resolve_backend(cpu) == "reference"
    monkeypatch.setenv("SIPL_FAST_BACKEND", "reference")
    assert resolve_backend(cpu) == "reference"
    monkeypatch.setenv("SIPL_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(cpu)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 2, 2)
    with sipl_fast.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.transposed_attention(q, q, q, torch.ones(1, 1, 1), 1)


def test_cuda_routes_and_forced_kernels(monkeypatch):
    """On CUDA the triton backend runs the torch formulation where its kernel lost or is
    unmeasured; kernels_forced and SIPL_FAST_KERNELS pick the named ops' kernels (no GPU needed:
    only the dispatch is asked, about fake tensors that claim CUDA)."""
    from sipl_fast.ops import (layer_norm2d_triton, pointwise_depthwise_triton, torch_impl,
                               transposed_attention_triton)
    monkeypatch.setenv("SIPL_FAST_KERNELS", "auto")
    with torch._subclasses.fake_tensor.FakeTensorMode():  # 16k and 64k pixels
        small, large = torch.empty(1, 96, 128, 128, device="cuda"), torch.empty(1, 96, 256, 256, device="cuda")
        large_bf16 = large.to(torch.bfloat16)
    route = ops.backend_module
    with sipl_fast.use_backend("triton"):
        assert route("pointwise_depthwise", large) is torch_impl
        # MDTA: the kernels in every dtype
        assert route("transposed_attention", large) is route("transposed_attention", large_bf16) \
            is transposed_attention_triton
        # LayerNorm2d: the kernel's forward where nothing records gradients and the call is large;
        # the depthwise convolutions by ATen in every eager call (graphs record the kernels).
        assert route("layer_norm2d", large) is torch_impl
        with torch.no_grad():
            assert route("layer_norm2d", large) is layer_norm2d_triton
            assert route("layer_norm2d", small) is torch_impl
            assert route("pointwise_depthwise", small) is torch_impl
        with torch.inference_mode():
            assert route("pointwise_depthwise_gate", large) is torch_impl
        with ops.kernels_forced("pointwise_depthwise"):
            assert route("pointwise_depthwise", large) is pointwise_depthwise_triton
            assert route("layer_norm2d", large) is torch_impl
        assert route("pointwise_depthwise", large) is torch_impl
        monkeypatch.setenv("SIPL_FAST_KERNELS", "layer_norm2d,pointwise_depthwise")
        assert route("pointwise_depthwise", large) is pointwise_depthwise_triton
        assert route("layer_norm2d", small) is layer_norm2d_triton
        assert route("gated_gelu", small) is torch_impl
        monkeypatch.setenv("SIPL_FAST_KERNELS", "all")  # read on every call, not at import
        assert route("gated_gelu", small).__name__ == "sipl_fast.ops.gated_gelu_triton"
        monkeypatch.setenv("SIPL_FAST_KERNELS", "auto")
        with ops.kernels_forced("all"):
            assert route("gated_gelu", small).__name__ == "sipl_fast.ops.gated_gelu_triton"
            assert route("pointwise_depthwise_gate", small).__name__ == "sipl_fast.ops.pointwise_depthwise_gate_triton"
        assert route("gated_gelu", small) is torch_impl
        monkeypatch.setenv("SIPL_FAST_KERNELS", "layer_norm2d,conv2d")
        with pytest.raises(ValueError, match="SIPL_FAST_KERNELS='layer_norm2d,conv2d': no kernels for \\['conv2d'\\]"):
            route("layer_norm2d", small)
    with pytest.raises(ValueError, match="no kernels for \\['conv2d'\\]"):
        with ops.kernels_forced("conv2d"):
            pass


def test_proxy_attention_routes_by_the_measured_table(monkeypatch):
    """On CUDA, 16-bit proxy attention runs the kernel or the torch formulation (normalise + SDPA)
    per PROXY_ATTENTION_KERNEL_WINS: without autograd the kernel takes the dictionary side (few
    queries, many keys) and head dim 384, with autograd the many-query and square calls; float32
    always runs the kernel; SIPL_FAST_KERNELS and kernels_forced override the table."""
    from sipl_fast.ops import proxy_attention_triton, torch_impl
    monkeypatch.setenv("SIPL_FAST_KERNELS", "auto")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        dictionary = torch.empty(1, 96, 64, 64, device="cuda", dtype=torch.bfloat16)   # 4096 tokens
        level1 = torch.empty(1, 96, 256, 256, device="cuda", dtype=torch.bfloat16)     # 65536 tokens
        wide_q = torch.empty(1, 384, 16, 16, device="cuda", dtype=torch.float16)
        wide_k = torch.empty(1, 384, 64, 64, device="cuda", dtype=torch.float16)
        level1_fp32 = level1.float()

    def route(q, k, heads):
        return ops.backend_module("proxy_attention", q, k, heads)

    assert ops.proxy_attention_shape(dictionary, level1, 1) == "keys"
    assert ops.proxy_attention_shape(level1, dictionary, 1) == "queries"
    assert ops.proxy_attention_shape(dictionary, dictionary, 1) == "square"
    assert ops.proxy_attention_shape(wide_q, wide_k, 1) == "wide"
    assert ops.proxy_attention_shape(wide_q, wide_k, 4) == "keys"  # 96 per head
    with sipl_fast.use_backend("triton"):
        with torch.no_grad():
            assert route(dictionary, level1, 1) is proxy_attention_triton
            assert route(level1, dictionary, 1) is torch_impl
            assert route(dictionary, dictionary, 1) is torch_impl
            assert route(wide_q, wide_k, 1) is proxy_attention_triton
            assert route(level1_fp32, dictionary, 1) is proxy_attention_triton
        assert route(dictionary, level1, 1) is torch_impl
        assert route(level1, dictionary, 1) is proxy_attention_triton
        assert route(dictionary, dictionary, 1) is proxy_attention_triton
        assert route(wide_q, wide_k, 1) is torch_impl
        assert route(dictionary, level1_fp32.bfloat16(), 1) is torch_impl
        assert route(level1_fp32, level1_fp32, 1) is proxy_attention_triton
        with ops.kernels_forced("proxy_attention"):
            assert route(dictionary, level1, 1) is proxy_attention_triton
        monkeypatch.setenv("SIPL_FAST_KERNELS", "proxy_attention")
        assert route(wide_q, wide_k, 1) is proxy_attention_triton
    assert set(ops.PROXY_ATTENTION_KERNEL_WINS) == {(grad, shape) for grad in (False, True)
                                                    for shape in ("keys", "queries", "square", "wide")}


def test_backend_variable_is_read_on_each_call_and_checked(monkeypatch):
    """SIPL_FAST_BACKEND takes effect without a re-import; a bad value is one clear error;
    use_backend wins inside its block."""
    x = torch.randn(1, 4, 3, 3)
    monkeypatch.setenv("SIPL_FAST_BACKEND", "reference")
    assert ops.backend_module("layer_norm2d", x) is ops.reference
    monkeypatch.setenv("SIPL_FAST_BACKEND", "torch")
    assert ops.backend_module("layer_norm2d", x) is ops.torch_impl
    with sipl_fast.use_backend("reference"):
        assert ops.backend_module("layer_norm2d", x) is ops.reference
    monkeypatch.setenv("SIPL_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SIPL_FAST_BACKEND: unknown backend 'cuda'; choose one of "
                                         "reference, torch, triton, auto"):
        ops.backend_module("layer_norm2d", x)
    with pytest.raises(ValueError, match="use_backend: unknown backend 'fast'"):
        with sipl_fast.use_backend("fast"):
            pass


def test_graph_kernels_name_what_a_cuda_graph_records(monkeypatch):
    """Graphs record the depthwise kernels (training and refinement) and LayerNorm2d's kernel on
    every call (refinement, NCHW maps: its kernel would copy channels-last ones). Forced, they
    route every call."""
    from sipl_fast.ops import layer_norm2d_triton, pointwise_depthwise_gate_triton
    monkeypatch.setenv("SIPL_FAST_KERNELS", "auto")
    assert ops.graph_kernels("train") == ops.DEPTHWISE_OPS
    assert ops.graph_kernels("refine") == ops.DEPTHWISE_OPS + ("layer_norm2d",)
    assert ops.graph_kernels("refine", channels_last=True) == ops.DEPTHWISE_OPS
    with torch._subclasses.fake_tensor.FakeTensorMode():
        small = torch.empty(1, 96, 40, 56, device="cuda")
    with sipl_fast.use_backend("triton"), torch.no_grad(), ops.kernels_forced(*ops.graph_kernels("refine")):
        assert ops.backend_module("layer_norm2d", small) is layer_norm2d_triton
        assert ops.backend_module("pointwise_depthwise_gate", small) is pointwise_depthwise_gate_triton
    with pytest.raises(ValueError, match="site must be 'refine' or 'train'"):
        ops.graph_kernels("eval")


def test_info_reports_the_build():
    report = sipl_fast.info()
    for key in ("extension_loaded", "cuda_kernels_compiled", "arch_list", "triton_available", "backends"):
        assert key in report
    assert report["backends"] == ["reference", "torch", "triton"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bias,channels_last", [(True, False), (False, True)])
def test_pointwise_depthwise_matches_float64_and_keeps_only_its_input(backend, bias, channels_last):
    torch.manual_seed(0)
    x64 = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    if channels_last:
        x64 = x64.contiguous(memory_format=torch.channels_last)
    params64 = [torch.randn(10, 6, 1, 1, dtype=torch.float64), torch.randn(10, dtype=torch.float64) if bias else None,
                torch.randn(10, 1, 3, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64) if bias else None]
    inputs64 = [t.requires_grad_() if t is not None else None for t in [x64, *params64]]
    inputs32 = [t.detach().float().requires_grad_() if t is not None else None for t in inputs64]
    expected = reference.pointwise_depthwise(*inputs64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with sipl_fast.use_backend(backend):
            got = ops.pointwise_depthwise(*inputs32)
    if backend == "torch":  # x and the weights; no 1x1 output
        assert all(t.numel() <= x64.numel() for t in saved) and sum(t.numel() == x64.numel() for t in saved) == 1
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    g = torch.randn_like(expected)
    wanted = [t for t in inputs64 if t is not None]
    given = [t for t in inputs32 if t is not None]
    for a, b in zip(torch.autograd.grad((got * g.float()).sum(), given), torch.autograd.grad((expected * g).sum(), wanted)):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_pointwise_depthwise_under_autocast_gives_parameter_dtype_gradients():
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    weights = [torch.randn(8, 4, 1, 1, requires_grad=True), None, torch.randn(8, 1, 3, 3, requires_grad=True),
               torch.randn(8, requires_grad=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16), sipl_fast.use_backend("torch"):
        out = ops.pointwise_depthwise(x, *weights)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), [x, weights[0], weights[2], weights[3]])
    assert all(g.dtype == torch.float32 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16), sipl_fast.use_backend("reference"):
        expected = torch.autograd.grad(ops.pointwise_depthwise(x, *weights).float().sum(),
                                       [x, weights[0], weights[2], weights[3]])
    for a, b in zip(grads, expected):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_layer_norm2d_keeps_a_16_bit_map_16_bit_under_autocast():
    """Autocast would run F.layer_norm in float32; the torch formulation switches it off for
    the call (and only enters that context where autocast is on)."""
    x = torch.randn(2, 6, 5, 7).bfloat16()
    weight, bias = torch.randn(6), torch.randn(6)
    with sipl_fast.use_backend("torch"):
        plain = ops.layer_norm2d(x, weight, bias, 1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = ops.layer_norm2d(x, weight, bias, 1e-5)
    assert plain.dtype == autocast.dtype == torch.bfloat16
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_pointwise_depthwise_rejects_bad_weights():
    with pytest.raises(ValueError, match="pointwise_depthwise: weights must be"):
        ops.pointwise_depthwise(torch.randn(1, 4, 5, 5), torch.randn(8, 3, 1, 1), None, torch.randn(8, 1, 3, 3), None)


@pytest.mark.parametrize("route", ["eager", "custom op"])
@pytest.mark.parametrize("op", ["proxy_attention", "transposed_attention"])
def test_saved_state_outputs_get_no_zero_filled_gradients(op, route, monkeypatch):
    """The attention custom ops' extra outputs (statistics for their own backward) are never
    differentiated: the backward allocates no zero gradients for them (a fill kernel each on
    CUDA), and the gradients are still those of the torch backend. (Plain eager calls return
    no such outputs: sipl_fast.ops.eager.)"""
    import importlib

    from torch.profiler import ProfilerActivity, profile
    module = importlib.import_module(f"sipl_fast.ops.{op}_triton")
    monkeypatch.setattr(module, "plain_eager", lambda x: route == "eager")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 5, 6, requires_grad=True) for _ in range(3))
    temperature = torch.tensor([1.5, 3.0]).reshape(2, 1, 1).requires_grad_()
    cotangent = torch.randn(1, 32, 5, 6)
    grads = {}
    for backend in ("triton", "torch"):
        with sipl_fast.use_backend(backend):
            out = getattr(ops, op)(q, k, v, temperature, 2)
            with profile(activities=[ProfilerActivity.CPU]) as backward:
                grads[backend] = torch.autograd.grad(out, (q, k, v, temperature), cotangent)
        if backend == "triton":
            names = {event.name for event in backward.events()}
            assert not names & {"aten::zeros", "aten::zeros_like", "aten::zero_"}, sorted(names)
    for ours, theirs in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
