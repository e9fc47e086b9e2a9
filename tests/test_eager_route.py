"""Plain eager calls of the kernel ops run an autograd.Function over the launchers; traced,
fake or otherwise special calls run the torch.library custom ops (sipl_fast.ops.eager). Both
routes give the same bits, forward and backward (interpreter on the CPU)."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sipl_fast
from sipl_fast import ops
from sipl_fast.ops.eager import plain_eager


def test_plain_eager_means_ordinary_tensors_outside_any_tracing():
    assert plain_eager(torch.randn(2)) and plain_eager(torch.nn.Parameter(torch.randn(2)))
    with FakeTensorMode() as mode:
        fake = torch.randn(2)
        assert not plain_eager(fake)
    assert not plain_eager(mode.from_tensor(torch.randn(2)))  # a fake tensor outside its mode
    seen = []
    torch.compile(lambda x: seen.append(plain_eager(x)) or x + 1, backend="eager", fullgraph=False)(torch.randn(2))
    assert seen == [False]


def _cases():
    """(op name, triton module, its custom op, call, differentiable inputs) with odd sizes."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    temperature = (torch.rand(2, 1, 1, generator=g) * 5 + 0.5).requires_grad_()
    q, k, v = rand(1, 40, 3, 5), rand(2, 40, 4, 3), rand(2, 40, 4, 3)
    x, weight, bias = rand(2, 24, 3, 5), rand(24), rand(24)
    mq, mk, mv = (rand(2, 48, 3, 7) for _ in range(3))
    return {
        "proxy_attention": ("proxy_attention_fwd", lambda: ops.proxy_attention(q, k, v, temperature, 2),
                            (q, k, v, temperature)),
        "transposed_attention": ("transposed_attention_fwd", lambda: ops.transposed_attention(mq, mk, mv, temperature, 2),
                                 (mq, mk, mv, temperature)),
        "layer_norm2d": ("layer_norm2d_fwd", lambda: ops.layer_norm2d(x, weight, bias), (x, weight, bias)),
        "gated_gelu": ("gated_gelu_fwd", lambda: ops.gated_gelu(x, dual=True), (x,)),
    }


@pytest.mark.parametrize("op", ["proxy_attention", "transposed_attention", "layer_norm2d", "gated_gelu"])
def test_the_eager_function_equals_the_custom_op(op, monkeypatch):
    custom_op_name, call, inputs = _cases()[op]
    module = importlib.import_module(f"sipl_fast.ops.{op}_triton")
    custom_op = getattr(module, custom_op_name)
    calls = []
    monkeypatch.setattr(module, custom_op_name, lambda *a: calls.append(a) or custom_op(*a))
    results = {}
    with sipl_fast.use_backend("triton"):
        for route in ("eager", "custom op"):
            monkeypatch.setattr(module, "plain_eager", lambda x, eager=route == "eager": eager)
            out = call()
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            results[route] = (out, *torch.autograd.grad(out, inputs, cotangent))
            assert len(calls) == (route == "custom op"), route
    for eager, traced in zip(*results.values()):
        assert torch.equal(eager, traced)


@pytest.mark.parametrize("route", ["eager", "custom op"])
@pytest.mark.parametrize("op", ["proxy_attention", "transposed_attention", "layer_norm2d", "gated_gelu"])
def test_gradients_for_a_penalty_are_first_order_only_and_say_so(op, route, monkeypatch):
    """create_graph=True (a gradient penalty): the kernels' gradients are the plain ones, and
    differentiating them again raises one error naming the op. Before, the eager route
    returned gradients without a graph, so a loss of them plus out.sum() silently lost its
    second-order terms (torch's once_differentiable catches only incoming gradients that
    require grad, which out.sum()'s do not)."""
    _, call, inputs = _cases()[op]
    module = importlib.import_module(f"sipl_fast.ops.{op}_triton")
    monkeypatch.setattr(module, "plain_eager", lambda x: route == "eager")
    with sipl_fast.use_backend("triton"):
        out = call()
        plain = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
        for_penalty = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, for_penalty))
    penalty = sum(g.square().sum() for g in for_penalty) + out.sum()
    with pytest.raises(RuntimeError, match=f"^{op}: its backward is first-order only"):
        penalty.backward()


def test_the_fused_projection_backward_is_first_order_only_and_say_so():
    """pointwise_depthwise's fused backward (every backend but the reference) likewise; the
    reference backend, which the error points to, differentiates twice."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    weights = (torch.randn(6, 5, 1, 1, generator=g, dtype=torch.float64).requires_grad_(), None,
               torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(), None)
    with sipl_fast.use_backend("torch"):
        (grad_x,) = torch.autograd.grad(ops.pointwise_depthwise(x, *weights).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="^pointwise_depthwise: its backward is first-order only"):
            grad_x.square().sum().backward()
    with sipl_fast.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda x, pw, dw: ops.pointwise_depthwise(x, pw, None, dw, None),
                                            (x, weights[0], weights[2]))
