"""The whole network on the triton backend (interpreter on CPU, kernels on GPU) equals the
reference backend: outputs of both passes and every parameter gradient."""
from __future__ import annotations

import copy

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR

from test_model import _randomised, _relative_error

# Small enough for the interpreter: every kernel still runs with several heads, odd widths,
# Nq != Nkv in the proxy attention and broadcast dictionaries.
MICRO = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4),
             prompt_dims=(4, 8, 12), train_patch=16)


def _run(model, x, pf):
    out = model(x, privileged_features=pf)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("privileged", [False, True])
def test_triton_backend_equals_reference(privileged):
    model = _randomised(SIPLPromptIR(**MICRO))
    x = torch.rand(2, 3, 16, 24)
    pf = tuple(t.detach() for t in model.encode(torch.rand(2, 3, 16, 24))) if privileged else None
    with sipl_fast.use_backend("reference"):
        expected, expected_grads = _run(model, x, pf)
    with sipl_fast.use_backend("triton"):
        got, got_grads = _run(model, x, pf)
    assert _relative_error(got, expected) <= 1e-4
    assert got_grads.keys() == expected_grads.keys()
    assert any(name.startswith("p1_cross") for name in got_grads) == privileged
    for name, g in expected_grads.items():
        assert _relative_error(got_grads[name], g) <= 1e-3, name


def _gradient_error(grads, exact) -> float:
    """|g - g64| / |g64| over every parameter gradient at once (one small gradient's rounding
    would dominate a per-tensor maximum in bf16)."""
    error = sum(((grads[name].double() - g) ** 2).sum() for name, g in exact.items()) ** 0.5
    return (error / sum((g ** 2).sum() for g in exact.values()) ** 0.5).item()


def test_triton_backend_under_bf16_autocast(monkeypatch):
    """The privileged pass under bf16 autocast, as training with --amp runs it: the proxy and
    MDTA kernels take bf16 maps (computed on values by tests/interpreter_bf16.py), and output
    and gradients stay within 2x the error of the reference backend under the same autocast,
    both against the float64 model (FlashAttention's rule). This checks the bf16 plumbing (which
    launchers get which dtypes, the casts around them): at this size bf16 rounding hides even a
    halved proxy temperature, which the float32 tests above catch; the kernel tests hold the
    kernels' bf16 math."""
    from sipl_fast.kernels import proxy_attention, transposed_attention
    kernel_dtypes = set()
    for module, name in ((proxy_attention, "proxy_attention_forward"), (proxy_attention, "proxy_attention_backward"),
                         (transposed_attention, "forward"), (transposed_attention, "backward")):
        def spy(*args, launcher=getattr(module, name), **kwargs):
            kernel_dtypes.add(args[0].dtype)
            return launcher(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    model = _randomised(SIPLPromptIR(**MICRO))
    x = torch.rand(2, 3, 16, 24)
    pf = tuple(t.detach() for t in model.encode(torch.rand(2, 3, 16, 24)))
    with sipl_fast.use_backend("reference"):
        exact, exact_grads = _run(copy.deepcopy(model).double(), x.double(), tuple(t.double() for t in pf))
    errors = {}
    for backend in ("reference", "triton"):
        with sipl_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _run(model, x, pf)
        errors[backend] = (_relative_error(out.double(), exact), _gradient_error(grads, exact_grads))
    assert kernel_dtypes == {torch.bfloat16}
    for name, ours, reference in zip(("out", "gradients"), errors["triton"], errors["reference"]):
        assert ours <= 2 * reference + 1e-3, f"{name}: {ours:.2e} vs the reference's {reference:.2e}"


@pytest.mark.gpu
def test_full_model_on_cuda_triton_equals_reference():
    """The authors' configuration on the GPU: default (triton) backend vs reference, fp32."""
    torch.manual_seed(0)
    model = _randomised(SIPLPromptIR()).cuda()
    x = torch.rand(2, 3, 64, 96, device="cuda")
    pf = tuple(t.detach() for t in model.encode(torch.rand(2, 3, 64, 96, device="cuda")))
    with sipl_fast.use_backend("reference"):
        expected, expected_grads = _run(model, x, pf)
    got, got_grads = _run(model, x, pf)  # auto: triton on CUDA
    assert _relative_error(got, expected) <= 1e-3
    worst = max(_relative_error(got_grads[n], g) for n, g in expected_grads.items())
    assert worst <= 1e-2, worst


def _inference_passes(model, x, pf_image, backend):
    """The plain and the privileged pass without autograd on ``backend``, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad(), sipl_fast.use_backend(backend):
        pf = model.encode(pf_image.to(dtype))
        return [model(x.to(dtype)), model(x.to(dtype), privileged_features=pf)]


def test_triton_inference_equals_reference(monkeypatch):
    """Without autograd every block runs its inference route on the kernels (the fused
    depthwise gate, LayerNorm2d, MDTA, proxy attention) and, with a small strip budget, the
    streamed strips too: outputs of both passes equal the reference backend's."""
    from sipl_fast import modules
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cpu", 20000)
    model = _randomised(SIPLPromptIR(**MICRO)).eval()
    x, pf_image = torch.rand(2, 3, 16, 24), torch.rand(2, 3, 16, 24)
    expected = _inference_passes(model, x, pf_image, "reference")
    for g, e in zip(_inference_passes(model, x, pf_image, "triton"), expected):
        assert _relative_error(g, e) <= 1e-4


def test_triton_inference_of_a_bf16_model(monkeypatch):
    """The same routes with bf16 weights and maps (the kernels computing bf16 through
    tests/interpreter_bf16.py): both passes within 2x the reference backend's bf16 error, both
    against the float64 model."""
    from sipl_fast import modules
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cpu", 20000)
    model = _randomised(SIPLPromptIR(**MICRO)).eval()
    x, pf_image = torch.rand(2, 3, 16, 24), torch.rand(2, 3, 16, 24)
    exact = _inference_passes(copy.deepcopy(model).double(), x, pf_image, "reference")
    model = model.bfloat16()
    low = _inference_passes(model, x, pf_image, "reference")
    got = _inference_passes(model, x, pf_image, "triton")
    for name, g, l, e in zip(("plain", "privileged"), got, low, exact):
        assert g.dtype == torch.bfloat16
        ours, reference = _relative_error(g.double(), e), _relative_error(l.double(), e)
        assert ours <= 2 * reference + 1e-3, f"{name}: {ours:.2e} vs the reference's {reference:.2e}"


@pytest.mark.gpu
def test_cuda_refinement_on_every_kernel_equals_the_authors_loop(monkeypatch):
    """The full model's refinement on CUDA with every kernel forced (the depthwise and fused
    gate kernels included) and strips of a few rows, eager and replayed from a CUDA graph,
    against the authors' loop on the reference backend, in float32 without TF32."""
    from sipl_fast import modules
    from sipl_fast.refine import Refiner, authors_loop
    monkeypatch.setenv("SIPL_FAST_KERNELS", "all")
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cuda", 1 << 20)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = _randomised(SIPLPromptIR()).cuda().eval()
    x = torch.rand(1, 3, 96, 128, device="cuda")
    with torch.no_grad():
        with sipl_fast.use_backend("reference"):
            expected = authors_loop(model, x, steps=2)
        got = model.refine(x, steps=2)
        replayed = Refiner(model, steps=2, cuda_graph=True)
        replayed(x)  # captures
        again = replayed(x)
    assert _relative_error(got, expected) <= 1e-3
    assert _relative_error(again, expected) <= 1e-3
