"""bench/refine_table.py: CPU providers of one size are timed in turn (round robin),
so that a drifting machine slows each alike; a GPU's cases stay one group each; the runners."""
import refine_table


def test_cpu_cases_of_one_size_form_one_group_and_gpu_cases_stay_single():
    cases = [((128, 128), "reference", 3), ((128, 128), "sipl_fast", 3), ((256, 256), "reference", 1)]
    assert [[c[2] for c in g] for g in refine_table._groups(cases, interleave=True)] == \
        [["reference", "sipl_fast"], ["reference"]]
    assert [[c[0] for c in g] for g in refine_table._groups(cases, interleave=False)] == [[0], [1], [2]]


def test_runs_are_timed_in_turn_with_their_own_repeat_counts():
    calls = []
    runs = [(lambda: calls.append("a"), 3), (lambda: calls.append("b"), 1), (lambda: calls.append("c"), 2)]
    medians = refine_table._median_seconds(runs, "cpu")
    assert calls == ["a", "b", "c", "a", "c", "a"]
    assert len(medians) == 3 and all(m >= 0 for m in medians)


def test_runners_refine_as_their_provider_names_say():
    """The reference runner is the authors' loop on the reference backend, sipl_fast's the
    Refiner; "+tf32" allows TF32 products, "+fp32mix" keeps the mixes in float32, "+aten"
    routes the depthwise ops to ATen and "+dwk" to the kernels only while it runs."""
    import torch

    import sipl_fast
    from sipl_fast import SIPLPromptIR
    from sipl_fast.refine import authors_loop

    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny").eval()
    x = torch.rand(1, 3, 24, 32)
    with sipl_fast.use_backend("reference"):
        expected = authors_loop(model, x, steps=2)
    before, precision = torch.backends.cuda.matmul.allow_tf32, sipl_fast.modules.convolution_precision
    rules = dict(sipl_fast.ops._TORCH_FORMULATION_ON_CUDA)
    for provider in ("reference", "reference+tf32", "sipl_fast", "torch+s1", "sipl_fast+fp32mix",
                     "sipl_fast+gram4096", "sipl_fast+aten", "sipl_fast+dwk"):
        run = refine_table.make_runner(model, x, provider)
        for _ in range(2):  # a runner's contexts are made anew for each call
            torch.testing.assert_close(run(), expected, rtol=1e-4, atol=1e-5, msg=provider)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert sipl_fast.modules.convolution_precision is precision
    assert refine_table.torch_impl.GRAM_PIECE_CUDA == 1024
    assert sipl_fast.ops._TORCH_FORMULATION_ON_CUDA == rules


def test_dwk_rows_route_the_depthwise_ops_to_the_kernels_on_cuda(monkeypatch):
    """Eager calls run ATen's depthwise convolutions; "+dwk" measures the kernels instead (no GPU
    needed: only the dispatch is asked)."""
    import torch

    import sipl_fast
    from sipl_fast import ops
    from sipl_fast.ops import pointwise_depthwise_gate_triton, torch_impl

    monkeypatch.delenv("SIPL_FAST_ALL_KERNELS", raising=False)  # the CPU suite forces every kernel
    monkeypatch.delenv("SIPL_FAST_KERNELS", raising=False)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(1, 96, 64, 64, device="cuda")
    with sipl_fast.use_backend("triton"), torch.no_grad():
        assert all(ops.backend_module(op, x) is torch_impl for op in ops.DEPTHWISE_OPS)
        with ops.kernels_forced(*ops.DEPTHWISE_OPS):
            assert ops.backend_module("pointwise_depthwise_gate", x) is pointwise_depthwise_gate_triton
        assert all(ops.backend_module(op, x) is torch_impl for op in ops.DEPTHWISE_OPS)
