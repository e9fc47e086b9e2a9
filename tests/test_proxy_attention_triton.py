"""The Triton proxy (cosine cross-) attention against the float64 reference, forward and all grads.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py, with bf16 computed
on values by tests/interpreter_bf16.py), so the shapes are tiny. Every comparison follows
FlashAttention's rule: the kernel's error against float64 is at most twice that of the
reference formulation run in the same dtype, plus a small floor (FLOORS: 2e-6 for fp32 in the
interpreter, where dots are exact; 1e-5 for fp32 on the GPU; 1e-3 for bf16).
Errors are measured per token, against the size of the terms each gradient sums (see
term_scales). Tests marked ``gpu`` run the real SIPL shapes; test_configs_compile_for_sm90
(slow) compiles every GPU config ahead of time.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sipl_fast
from sipl_fast import ops
from sipl_fast.kernels import proxy_attention as kernels
from sipl_fast.ops import reference

from kernel_checks import compiled_proxy_configs, loop_wgmma, ptxas_usage, run_compiled


@pytest.fixture(autouse=True)
def _kernel_on_every_route(monkeypatch):
    """These tests hold the kernel to the reference: on CUDA the triton backend would route some
    16-bit calls to the torch formulation (ops.PROXY_ATTENTION_KERNEL_WINS)."""
    monkeypatch.setenv("SIPL_FAST_KERNELS", "proxy_attention")


# --------------------------------------------------------------------------------------------
# inputs, runs and error measures
# --------------------------------------------------------------------------------------------

def make_inputs(batch_q, batch_kv, channels, q_hw, kv_hw, num_heads, tau, dtype=torch.float32,
                device="cpu", zero_tokens=True):
    """Random q, k, v (NCHW) and temperature; with ``zero_tokens`` a few q and k pixels are exactly 0."""
    q = torch.randn(batch_q, channels, *q_hw, device=device)
    k = torch.randn(batch_kv, channels, *kv_hw, device=device)
    v = torch.randn(batch_kv, channels, *kv_hw, device=device)
    if zero_tokens:
        q[:, :, 0, 0] = 0        # the first q token of every head
        k[:, :, -1, -1] = 0      # the last key token
        k[0, :, 0, min(1, kv_hw[1] - 1)] = 0
    temperature = torch.as_tensor(tau, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    temperature = temperature.expand(num_heads, 1, 1).clone() if temperature.numel() == 1 else temperature
    return q.to(dtype), k.to(dtype), v.to(dtype), temperature


def run_reference(q, k, v, temperature, num_heads, grad_out, dtype=torch.float64):
    """Output and (dq, dk, dv, dtemperature) of sipl_fast.ops.reference in ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, temperature)]
    out = reference.proxy_attention(*leaves, num_heads)
    out.backward(grad_out.to(dtype))
    return out.detach(), tuple(x.grad for x in leaves)


def run_triton(q, k, v, temperature, num_heads, grad_out, splits=None):
    """Output and gradients of the triton backend.

    splits=None goes through ops.proxy_attention (validation, custom op, autograd, the split
    heuristics); a (forward, dk/dv, dq) tuple calls the launchers with those split counts.
    """
    if splits is None:
        leaves = [x.detach().requires_grad_() for x in (q, k, v, temperature)]
        with sipl_fast.use_backend("triton"):
            out = ops.proxy_attention(*leaves, num_heads)
        out.backward(grad_out)
        return out.detach(), tuple(x.grad for x in leaves)
    fwd_splits, kv_splits, q_splits = splits
    out, lse, q_rnorm, k_rnorm = kernels.proxy_attention_forward(q, k, v, temperature, num_heads,
                                                                 num_splits=fwd_splits)
    grads = kernels.proxy_attention_backward(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
                                             num_heads, kv_splits=kv_splits, q_splits=q_splits)
    return out, grads


def term_scales(q, k, v, temperature, num_heads, grad_out):
    """Per token, the size of the terms each gradient sums (float64), to measure errors by.

    A softmax gradient can cancel far below its terms: in a saturated row (P = 1 - 6e-5, ...)
    dS_ij = P_ij (dP_ij - Delta_i) is ~1e-4 of either term, and dP_ij = dout_i . v_j and
    Delta_i = dout_i . out_i are d-term dot products that can cancel too. Any fp32
    implementation errs by ~1e-7 of those terms, a large part of a cancelled result; more so
    FlashAttention's Delta = dout . out, rounded apart from dP, than the reference's
    sum_j P dP. So the dq, dk and dtau errors are taken relative to the terms' size,
    sum_j P_ij |dout_i| (|v_j| + |out_i|) (times r |tau| per token), as in a backward error
    analysis. Returns (dq, dk, dtau) scales shaped for token_relative_error.
    """
    batch = max(q.shape[0], k.shape[0])

    def tokens(x):  # (B or 1, C, H, W) -> (batch, heads, N, d) float64
        b, c, h, w = x.shape
        return x.double().expand(batch, c, h, w).reshape(batch, num_heads, c // num_heads, h * w).transpose(-1, -2)

    qt, kt, vt, dout = (tokens(x) for x in (q, k, v, grad_out))
    rq = 1 / qt.norm(dim=-1, keepdim=True).clamp_min(kernels.NORMALIZE_EPS)
    rk = 1 / kt.norm(dim=-1, keepdim=True).clamp_min(kernels.NORMALIZE_EPS)
    tau = temperature.double().reshape(1, num_heads, 1, 1)
    p = torch.softmax(tau * (qt * rq) @ (kt * rk).transpose(-1, -2), dim=-1)
    out_norm = (p @ vt).norm(dim=-1, keepdim=True)
    terms = p * dout.norm(dim=-1, keepdim=True) * (vt.norm(dim=-1).unsqueeze(-2) + out_norm)
    dq = (rq * tau.abs() * terms.sum(-1, keepdim=True)).sum(0, keepdim=True) if q.shape[0] == 1 else \
        rq * tau.abs() * terms.sum(-1, keepdim=True)
    dk_terms = rk * tau.abs() * terms.sum(-2).unsqueeze(-1)
    dk = dk_terms.sum(0, keepdim=True) if k.shape[0] == 1 else dk_terms
    # (B, heads, N, 1) -> (B, heads, 1, N): broadcasts against a gradient viewed (B, heads, d, N).
    return dq.transpose(-1, -2), dk.transpose(-1, -2), terms.sum(dim=(0, 2, 3))


def token_relative_error(actual, expected, num_heads=1, floor=None):
    """max |actual - expected| / (largest |expected| of the same token, over its channels).

    Per token, because a zero token's gradient is ~1e12 times larger than the others
    (F.normalize divides it by eps): a tensor-wide scale would hide errors on normal tokens.
    ``floor`` (from term_scales) raises a token's scale to the size of the terms it sums.
    """
    actual, expected = actual.double(), expected.double()
    if expected.dim() == 4:  # (B, C, H, W) -> (B, heads, d, N): one scale per pixel and head
        b, c, h, w = expected.shape
        actual, expected = (x.reshape(b, num_heads, c // num_heads, h * w) for x in (actual, expected))
        scale = expected.abs().amax(dim=2, keepdim=True)
    else:                    # temperature: one scale per head
        actual, expected = actual.flatten(), expected.flatten()
        scale = expected.abs()
    if floor is not None:
        scale = torch.maximum(scale, floor)
    return ((actual - expected).abs() / scale.clamp_min(1e-30)).max().item()


NAMES = ("out", "dq", "dk", "dv", "dtemperature")


# FlashAttention's rule: error <= 2x that of the reference formulation run in the same dtype,
# plus a floor of a few roundings (fp32 on the CPU: the interpreter's dots are exact).
FLOORS = {("cpu", torch.float32): 2e-6, ("cuda", torch.float32): 1e-5,
          ("cpu", torch.bfloat16): 1e-3, ("cuda", torch.bfloat16): 1e-3}


def assert_matches_reference(q, k, v, temperature, num_heads, splits=None):
    """Output and gradients against float64, per token, errors measured as in term_scales:
    at most 2x those of the reference formulation run in q's dtype, plus FLOORS."""
    grad_out = torch.randn(max(q.shape[0], k.shape[0]), *q.shape[1:], dtype=q.dtype, device=q.device)
    out, grads = run_triton(q, k, v, temperature, num_heads, grad_out, splits)
    ref_out, ref_grads = run_reference(q, k, v, temperature, num_heads, grad_out)
    low_out, low_grads = run_reference(q, k, v, temperature, num_heads, grad_out, dtype=q.dtype)
    dq_scale, dk_scale, dtau_scale = term_scales(q, k, v, temperature, num_heads, grad_out)
    floors = (None, dq_scale, dk_scale, None, dtau_scale)
    assert out.dtype == q.dtype and grads[3].dtype == temperature.dtype
    for name, actual, expected, low, floor in zip(NAMES, (out, *grads), (ref_out, *ref_grads),
                                                  (low_out, *low_grads), floors):
        assert actual.shape == expected.shape, name
        assert torch.isfinite(actual).all(), f"{name} has non-finite values"
        error = token_relative_error(actual, expected, num_heads, floor)
        bound = 2 * token_relative_error(low, expected, num_heads, floor) + FLOORS[q.device.type, q.dtype]
        assert error <= bound, f"{name}: relative error {error:.2e} > {bound:.2e}"


# --------------------------------------------------------------------------------------------
# CPU (interpreter) tests: small shapes, fp32 exact dots
# --------------------------------------------------------------------------------------------

# (batch_q, batch_kv, head_dim, heads, q (H, W), kv (H, W), tau): token counts are not
# multiples of the 16-row interpreter blocks and Nq != Nkv; the SIPL head sizes, both broadcasts.
# The "full" cases have token counts that are (the kernels then drop their token masks, as at
# SIPL's sizes on the GPU): both sides, and one side only.
CASES = {
    "d96-2heads-full-blocks": (2, 1, 96, 2, (4, 8), (8, 6), [2.0, 20.0]),
    "d48-full-queries": (1, 2, 48, 1, (4, 4), (3, 5), 5.0),
    "d40-full-keys": (2, 2, 40, 1, (3, 5), (4, 8), 3.0),
    "d96-1head": (2, 2, 96, 1, (4, 5), (3, 7), 1.0),
    "d96-2heads-dictionary-query": (1, 2, 96, 2, (3, 6), (5, 4), [2.0, 0.5]),
    "d96-4heads-dictionary-kv": (2, 1, 96, 4, (3, 6), (4, 5), [1.0, 50.0, -3.0, 10.0]),
    "d384-1head": (1, 2, 384, 1, (4, 5), (3, 7), 4.0),
    "d40-4heads": (1, 2, 40, 4, (4, 5), (5, 4), [50.0, 1.0, 0.1, 7.0]),
    "d48-2heads-tau50": (2, 1, 48, 2, (3, 7), (6, 6), 50.0),
    "d40-dictionary-kv-3-query-blocks": (3, 1, 40, 1, (5, 8), (4, 4), 2.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case):
    batch_q, batch_kv, head_dim, heads, q_hw, kv_hw, tau = case
    assert_matches_reference(*make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, tau), heads)


# (case, (forward splits, dk/dv splits, dq splits)): the flash-decoding forward and the split
# backward passes with their fp32 partials and reductions.
SPLIT_CASES = {  # a split count above the loop's block count leaves empty backward splits
    "d96-full-blocks": ("d96-2heads-full-blocks", (2, 2, 3)),
    "d96-split-all": ("d96-1head", (2, 3, 3)),
    "d96-dictionary-query": ("d96-2heads-dictionary-query", (2, 2, 3)),
    "d48-dictionary-kv": ("d48-2heads-tau50", (3, 3, 2)),
    "d384": ("d384-1head", (2, 2, 2)),
    # dk/dv: 3 batches x 3 query blocks in 2 splits, the second starting mid-batch
    "d40-dictionary-kv-mid-batch": ("d40-dictionary-kv-3-query-blocks", (1, 2, 1)),
    # one key block in two forward splits: the second has no keys and must weigh nothing
    "d48-empty-forward-split": ("d48-full-queries", (2, 1, 1)),
}
# (the empty split's log2(0) = -inf warns in numpy, the interpreter's arithmetic)
EMPTY_SPLIT_WARNING = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.mark.parametrize("tau, dtype", [(27.5, torch.float32), (28.0, torch.float32), (60.0, torch.float32),
                                        (-60.0, torch.float32), (27.5, torch.bfloat16), (28.0, torch.bfloat16),
                                        (-60.0, torch.bfloat16)])
def test_every_key_anti_aligned(tau, dtype):
    """Every key points against every query (all cosines -1): the logits sit at -tau, for
    tau > 0 the far end of the forward's fixed softmax shift (p = 2^(-2 |tau| log2 e): 2^-79 at
    27.5, near the largest |tau| it is used for, still a bf16 normal where a float16-like shift
    would flush it) and beyond it, where the running maximum takes over (at tau = 60 a fixed
    shift would underflow every p to 0)."""
    assert_matches_reference(*anti_aligned_inputs(48, (4, 5), (3, 6), tau, dtype), 1, splits=(2, 1, 1))


def anti_aligned_inputs(channels, q_hw, kv_hw, tau, dtype=torch.float32, device="cpu"):
    """q (batch 2) and k (batch 1) tokens along one direction and against it, random v, and a
    float32 temperature."""
    direction = torch.nn.functional.normalize(torch.randn(channels), dim=0).reshape(1, channels, 1, 1)
    q = direction * (torch.rand(2, 1, *q_hw) + 0.5)
    k = -direction * (torch.rand(1, 1, *kv_hw) + 0.5)
    v = torch.randn(1, channels, *kv_hw)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [torch.full((1, 1, 1), tau, device=device)]


@EMPTY_SPLIT_WARNING
@pytest.mark.parametrize("case, splits", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_passes_match_reference(case, splits):
    batch_q, batch_kv, head_dim, heads, q_hw, kv_hw, tau = CASES[case]
    inputs = make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, tau)
    assert_matches_reference(*inputs, heads, splits=splits)


@pytest.mark.parametrize("splits", [(1, 1), (2, 3)], ids=["one-pass", "split"])
def test_norms_folded_into_ds_give_the_same_gradients(splits):
    """With TF32 dots allowed (and in bf16) the backward multiplies dS by the other side's
    inverse norms instead of forming q̂ and k̂; 3xTF32 forms them. The interpreter's dots are
    exact, so both give the same gradients to float32 rounding, zero-norm tokens (r = 1e12)
    included, with full blocks and with partial ones and split passes."""
    for case in ("d96-2heads-full-blocks", "d96-4heads-dictionary-kv"):
        batch_q, batch_kv, head_dim, heads, q_hw, kv_hw, tau = CASES[case]
        q, k, v, temperature = make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, tau)
        grad_out = torch.randn(max(batch_q, batch_kv), *q.shape[1:])
        results = []
        for allow_tf32 in (False, True):
            out, lse, q_rnorm, k_rnorm = kernels.proxy_attention_forward(q, k, v, temperature, heads,
                                                                          allow_tf32=allow_tf32)
            grads = kernels.proxy_attention_backward(grad_out, q, k, v, temperature, out, lse, q_rnorm, k_rnorm,
                                                     heads, allow_tf32=allow_tf32, kv_splits=splits[0],
                                                     q_splits=splits[1])
            results.append((out, *grads))
        for name, formed, folded in zip(NAMES, *results):
            torch.testing.assert_close(folded, formed, rtol=1e-4, atol=1e-5 * formed.abs().max().item(),
                                       msg=f"{case} {name}")


def test_strided_inputs_are_read_in_place():
    """Channel slices of one tensor (k, v = kv.chunk(2)) and a channels-last q, as in the model."""
    q, k, v, temperature = make_inputs(2, 2, 96, (5, 6), (4, 7), 2, [3.0, 1.0])
    q = q.contiguous(memory_format=torch.channels_last)
    kv = torch.cat([k, v], dim=1)
    k, v = kv.chunk(2, dim=1)
    assert not k.is_contiguous() and not q.is_contiguous()
    assert_matches_reference(q, k, v, temperature, 2)
    # The output comes back in q's layout, as from the torch backend.
    with sipl_fast.use_backend("triton"):
        out = ops.proxy_attention(q, k, v, temperature, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_expanded_grad_out():
    """out.sum().backward() hands the backward a grad with all strides 0."""
    q, k, v, temperature = make_inputs(1, 1, 48, (3, 5), (4, 4), 1, 2.0)
    leaves = [x.requires_grad_() for x in (q, k, v, temperature)]
    with sipl_fast.use_backend("triton"):
        ops.proxy_attention(*leaves, 1).sum().backward()
    grad_out = torch.ones(1, 48, 3, 5)
    _, ref_grads = run_reference(q, k, v, temperature, 1, grad_out)
    for name, leaf, expected in zip(NAMES[1:], leaves, ref_grads):
        assert token_relative_error(leaf.grad, expected) <= 2e-5, name


@EMPTY_SPLIT_WARNING
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    head_dim=st.integers(16, 72), heads=st.integers(1, 2),
    batches=st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1)]),
    # At least 2 keys: with one, P = 1 and every logit gradient is exactly 0 (only rounding left).
    q_hw=st.tuples(st.integers(1, 6), st.integers(1, 6)), kv_hw=st.tuples(st.integers(1, 6), st.integers(2, 6)),
    tau=st.floats(-5.0, 50.0), splits=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_random_shapes(head_dim, heads, batches, q_hw, kv_hw, tau, splits, dtype):
    """(Splits beyond a pass's block count are left empty.)"""
    batch_q, batch_kv = batches
    batch = max(batches)
    n_q, n_kv = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    torch.manual_seed(n_q * 31 + n_kv)
    inputs = make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, tau, dtype,
                         zero_tokens=n_q > 1 and n_kv > 3)
    assert_matches_reference(*inputs, heads, splits=splits if batch * n_q * n_kv % 2 else None)


# bf16 on the CPU: the interpreter computes bf16 through tests/interpreter_bf16.py (values in
# fp32, each result rounded to nearest even, dots of exact products summed in fp32).
BF16_CASES = {
    "d96-2heads-full-blocks": ("d96-2heads-full-blocks", None),
    "d96-4heads-dictionary-kv": ("d96-4heads-dictionary-kv", None),
    "d384-1head-split": ("d384-1head", (2, 2, 2)),
    "d40-dictionary-kv-mid-batch": ("d40-dictionary-kv-3-query-blocks", (1, 2, 1)),
    "d48-2heads-tau50-split": ("d48-2heads-tau50", (3, 3, 2)),
}


@pytest.mark.parametrize("case, splits", BF16_CASES.values(), ids=BF16_CASES.keys())
def test_bf16_within_twice_the_reference_formulation_error(case, splits):
    """bf16 with zero tokens (bf16 has float32's range): the fixed softmax shift at tau <= 27.7,
    the running maximum at 50, the norms folded into dS, the split passes."""
    batch_q, batch_kv, head_dim, heads, q_hw, kv_hw, tau = CASES[case]
    inputs = make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, tau, torch.bfloat16)
    assert_matches_reference(*inputs, heads, splits)


def test_fp16_within_twice_the_reference_formulation_error():
    """fp16: error <= 2x that of the reference math run in fp16.

    No zero tokens here: their true gradients (~1e12) overflow fp16 in any implementation.
    """
    q, k, v, temperature = make_inputs(2, 1, 96, (4, 5), (5, 5), 2, [2.0, 8.0], torch.float16, zero_tokens=False)
    grad_out = torch.randn(2, 96, 4, 5, dtype=torch.float16)
    out, grads = run_triton(q, k, v, temperature, 2, grad_out)
    ref_out, ref_grads = run_reference(q, k, v, temperature, 2, grad_out)
    low_out, low_grads = run_reference(q, k, v, temperature.half(), 2, grad_out, dtype=torch.float16)
    for name, actual, expected, low in zip(NAMES, (out, *grads), (ref_out, *ref_grads), (low_out, *low_grads)):
        error = (actual.double() - expected).abs().max().item()
        bound = 2 * (low.double() - expected).abs().max().item() + 1e-3 * expected.abs().max().item()
        assert error <= bound, f"{name}: {error:.2e} > {bound:.2e}"


def test_head_chunks_cover_every_head_size():
    for head_dim in range(1, 513):
        da, db = kernels.head_chunks(head_dim)
        assert da + db >= head_dim and da >= 16 and (db == 0 or db >= 16)
        assert da & (da - 1) == 0 and db & (db - 1) == 0
        # Masked (computed but unused) channels only in chunk b, fewer than its used ones.
        assert da >= head_dim or db == 16 or db < 2 * (head_dim - da)
    sipl_sizes = {d: kernels.head_chunks(d) for d in (40, 48, 96, 384)}
    assert sipl_sizes == {40: (32, 16), 48: (32, 16), 96: (64, 32), 384: (256, 128)}


def test_opcheck_forward():
    q, k, v, temperature = make_inputs(2, 1, 32, (2, 3), (3, 3), 2, [1.5, 4.0])
    args = tuple(x.requires_grad_() for x in (q, k, v, temperature)) + (2,)
    torch.library.opcheck(torch.ops.sipl_fast.proxy_attention_fwd.default, args)


def test_opcheck_backward():
    q, k, v, temperature = make_inputs(1, 2, 32, (3, 2), (2, 3), 2, [1.5, 4.0])
    saved = torch.ops.sipl_fast.proxy_attention_fwd(q, k, v, temperature, 2)
    grad_out = torch.randn_like(saved[0])
    args = (grad_out, q, k, v, temperature, *saved, 2)
    torch.library.opcheck(torch.ops.sipl_fast.proxy_attention_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


class _ProxyBlock(torch.nn.Module):
    """A 1x1 projection of the attention plus a residual, as in the Proxy Fusion blocks."""

    def __init__(self, channels, num_heads, attention):
        super().__init__()
        self.num_heads, self.attention = num_heads, attention
        self.temperature = torch.nn.Parameter(torch.linspace(1.0, 3.0, num_heads).reshape(-1, 1, 1))
        self.proj = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x, dictionary):
        return self.proj(self.attention(x, dictionary, dictionary, self.temperature, self.num_heads)) + x


def check_compiled_matches_eager(attention, device, backend, tol):
    torch.manual_seed(0)
    block = _ProxyBlock(32, 2, attention).to(device)
    x = torch.randn(2, 32, 3, 5, device=device, requires_grad=True)
    dictionary = torch.randn(1, 32, 4, 4, device=device, requires_grad=True)
    leaves = (x, dictionary, block.temperature)
    results = []
    for module in (block, torch.compile(block, fullgraph=True, backend=backend)):
        out = module(x, dictionary)
        grads = torch.autograd.grad(out.square().mean(), leaves)
        results.append((out, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


def test_compile_fullgraph_traces_the_custom_ops():
    """torch.compile(fullgraph=True) sees the ops through their fake kernels (aot_eager on CPU)."""
    from sipl_fast.ops.proxy_attention_triton import proxy_attention
    check_compiled_matches_eager(proxy_attention, "cpu", "aot_eager", tol=1e-5)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile check: every GPU autotune config, for sm_90, on any machine
# --------------------------------------------------------------------------------------------

SM90_SHARED_BYTES = 232448


def compile_gpu_configs_for_sm90(head_dims=(96, 384), dtypes=("bf16", "fp32")) -> list[str]:
    """Compiles each attention kernel with each config of its tile class for sm_90 (no GPU
    needed) and returns the failures: compile errors, shared memory over the H100's limit, or
    tensor-core products that wait for each other: serialised by ptxas (C7515: e.g. a forward
    that scales its q tile in registers) or with a wait after each in the loop.

    The interpreter catches none of these (tl.dot shapes, shared memory, register limits). Needs
    TRITON_INTERPRET unset before the kernels are imported, hence its own process.
    """
    failures = []
    for name, dtype, head_dim, shape, compiled in compiled_proxy_configs(head_dims, dtypes):
        label = f"{name} {dtype} d={head_dim} {shape}"
        if isinstance(compiled, Exception):
            failures.append(f"{label}: {type(compiled).__name__}: {str(compiled)[:500]}")
            continue
        if compiled.metadata.shared > SM90_SHARED_BYTES:
            failures.append(f"{label}: {compiled.metadata.shared} bytes of shared memory")
        if ptxas_usage(compiled)["serialised"]:
            failures.append(f"{label}: ptxas serialises its wgmma instructions (C7515)")
        for products, waits in loop_wgmma(compiled):
            if 2 * waits > products:  # e.g. issuing the next block's logits early made Triton 3.8 do so
                failures.append(f"{label}: a loop waits {waits} times for {products} wgmma products")
    return failures


@pytest.mark.slow
def test_configs_compile_for_sm90():
    """Every GPU config compiles for sm_90 within shared memory, its wgmma pipelined (about 3
    minutes on 2 cores)."""
    result = run_compiled(__file__, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_hot_path_configs_compile_with_pipelined_wgmma():
    """The configs SIPL trains and refines with (bf16, d = 96): as above, in CI."""
    result = run_compiled(__file__, timeout=900, args=["hot"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# --------------------------------------------------------------------------------------------
# GPU tests: the SIPL shapes
# --------------------------------------------------------------------------------------------

# (batch_q, batch_kv, head_dim, heads, q (H, W), kv (H, W))
GPU_SHAPES = {
    "level1-train-128px-B8": (8, 8, 96, 1, (64, 64), (64, 64)),
    "p1-512px-4096x65536": (1, 1, 96, 1, (64, 64), (256, 256)),
    "cross_p1-512px-65536x4096": (1, 1, 96, 1, (256, 256), (64, 64)),
    "p3_cross-512px-256x4096-d384": (1, 1, 384, 1, (16, 16), (64, 64)),
    "cross_p3-512px-4096x256-4heads": (1, 1, 96, 4, (64, 64), (16, 16)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_gpu_real_shapes(shape, dtype):
    batch_q, batch_kv, head_dim, heads, q_hw, kv_hw = shape
    inputs = make_inputs(batch_q, batch_kv, head_dim * heads, q_hw, kv_hw, heads, [1.0, 4.0, 0.5, 12.0][:heads],
                         dtype, device="cuda", zero_tokens=False)
    assert_matches_reference(*inputs, heads)


AUTOTUNED = {"forward": kernels._forward_kernel, "dkdv": kernels._backward_dkdv_kernel,
             "dq": kernels._backward_dq_kernel}


@contextlib.contextmanager
def only_config(kernel: str, shape: tuple):
    """Within the block, the autotuned ``kernel`` ("forward", "dkdv", "dq") runs the one config
    ``shape`` = (owned rows, loop rows, warps, stages) of its shape table, whatever its timings
    would pick; under the interpreter too, whose one small config it replaces (warps and stages
    then mean nothing, the block sizes are what run)."""
    tuned = AUTOTUNED[kernel]
    assert any(shape in shapes for shapes in tuned.shapes.values()), f"{shape} is not a config of the {kernel} kernel"
    owned, loop = tuned.tile_names
    configs, cache = tuned.configs, dict(tuned.cache)
    tuned.configs = [triton.Config({owned: shape[0], loop: shape[1]}, num_warps=shape[2], num_stages=shape[3])]
    tuned.cache.clear()
    try:
        yield
    finally:
        tuned.configs = configs
        tuned.cache.clear()
        tuned.cache.update(cache)


def config_cases(head_dims) -> dict:
    """Every config the autotuner may pick at these head sizes, in bf16 and float32 (by time,
    so which one runs depends on the shape and the card: a config that computed wrong results
    would go unnoticed until some user's shape picked it)."""
    return {f"{kernel}-d{head_dim}-{dtype_name}-{'x'.join(map(str, shape))}": (kernel, head_dim, dtype, shape)
            for kernel, tuned in AUTOTUNED.items() for head_dim in head_dims
            for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
            for shape in tuned.shapes[kernels._tile_class(head_dim, dtype)]}


def test_only_config_runs_the_chosen_config():
    """A config of the table, forced, runs alone; an unknown one is refused."""
    tuned = AUTOTUNED["dkdv"]
    configs = list(tuned.configs)
    with only_config("dkdv", (64, 32, 4, 3)):
        assert [kernels._config_shape(c, *tuned.tile_names) for c in tuned.configs] == [(64, 32, 4, 3)]
    assert tuned.configs == configs
    with pytest.raises(AssertionError, match="not a config"), only_config("dq", (128, 16, 8, 3)):
        pass


INTERPRETER_CONFIG_CASES = config_cases((96, 384))


@EMPTY_SPLIT_WARNING
@pytest.mark.parametrize("kernel, head_dim, dtype, shape", INTERPRETER_CONFIG_CASES.values(),
                         ids=INTERPRETER_CONFIG_CASES.keys())
def test_every_gpu_config_in_the_interpreter(kernel, head_dim, dtype, shape):
    """The GPU's block sizes on the CPU: 135 queries (two query blocks of 128 rows, the second
    partial) against 77 keys, a batch-1 key side, zero-norm tokens, every pass split in 3
    (splits of the larger blocks get no blocks at all). The other two kernels run their first
    config (fewer, larger blocks: faster here)."""
    with contextlib.ExitStack() as forced:
        for name, tuned in AUTOTUNED.items():
            forced.enter_context(only_config(name, shape if name == kernel else
                                             tuned.shapes[kernels._tile_class(head_dim, dtype)][0]))
        assert_matches_reference(*make_inputs(2, 1, head_dim, (5, 27), (7, 11), 1, 8.0, dtype), 1, splits=(3, 3, 3))


# At d = 96, SIPL's main head size, the same on the GPU, where the configs' warps and
# pipeline stages also run.
CONFIG_CASES = {name: (kernel, dtype, shape) for name, (kernel, _, dtype, shape) in config_cases((96,)).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, dtype, shape", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_gpu_every_d96_config(kernel, dtype, shape):
    """Zero-norm tokens, a batch-1 key side, and partial blocks on either side in turn."""
    with only_config(kernel, shape):
        for q_hw, kv_hw in (((25, 40), (32, 32)), ((32, 32), (24, 40))):
            inputs = make_inputs(2, 1, 96, q_hw, kv_hw, 1, 8.0, dtype, device="cuda")
            assert_matches_reference(*inputs, 1)


@pytest.mark.gpu
def test_gpu_zero_tokens_broadcast_and_large_temperature():
    inputs = make_inputs(2, 1, 96, (32, 32), (48, 48), 1, 50.0, torch.bfloat16, device="cuda")
    assert_matches_reference(*inputs, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tau", [27.5, 28.0])
def test_gpu_every_key_anti_aligned(tau):
    """bf16 on the tensor cores at the far end of the forward's fixed softmax shift (p = 2^-79)
    and just beyond it (running maximum)."""
    inputs = anti_aligned_inputs(96, (32, 32), (40, 24), tau, torch.bfloat16, "cuda")
    assert_matches_reference(*inputs, 1)


@pytest.mark.gpu
def test_gpu_deterministic_with_splits():
    """Split forward and split dq (few queries, many keys, batch-1 dictionary query): bitwise repeatable."""
    q, k, v, temperature = make_inputs(1, 4, 96, (32, 32), (128, 128), 1, 3.0, torch.bfloat16, device="cuda",
                                       zero_tokens=False)
    grad_out = torch.randn(4, 96, 32, 32, device="cuda", dtype=torch.bfloat16)
    first = run_triton(q, k, v, temperature, 1, grad_out)
    second = run_triton(q, k, v, temperature, 1, grad_out)
    for name, a, b in zip(NAMES, (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_tokens():
    """fwd+bwd at 4096 x 65536 allocates far less than one Nq x Nkv bf16 matrix (512 MiB)."""
    q, k, v, temperature = make_inputs(1, 1, 96, (64, 64), (256, 256), 1, 2.0, torch.bfloat16, device="cuda",
                                       zero_tokens=False)
    grad_out = torch.randn(1, 96, 64, 64, device="cuda", dtype=torch.bfloat16)
    run_triton(q, k, v, temperature, 1, grad_out)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_triton(q, k, v, temperature, 1, grad_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 128 * 2**20, f"{extra / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """The public op (dispatch included) inside a compiled module, inductor on CUDA."""
    with sipl_fast.use_backend("triton"):
        # cuDNN may pick another (TF32) algorithm for the compiled 1x1 conv: a looser tolerance.
        check_compiled_matches_eager(ops.proxy_attention, "cuda", "inductor", tol=2e-3)


if __name__ == "__main__":  # the subprocess of the two compile tests ("hot": bf16, d = 96 only)
    import sys
    hot = sys.argv[1:] == ["hot"]
    problems = compile_gpu_configs_for_sm90(*(((96,), ("bf16",)) if hot else ()))
    print("\n".join(problems) or "every config compiles for sm_90 within shared memory")
    raise SystemExit(1 if problems else 0)
