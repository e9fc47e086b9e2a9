"""Export of the whole refinement (sipl_fast.export): the exported files reproduce refine().

Each steps value is traced once (tracing, loading and converting the program are the slow
parts: seconds per pass of the network) and written in both formats by save_torch and save_onnx
(export_torch and export_onnx are a check of their arguments, the trace and one of those).
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.export import (MIN_SIDE, ExportError, RefinementGraph, export, export_onnx, export_torch,
                              pad_bottom_right, refinement_program, save_onnx, save_torch)
from sipl_fast.refine import authors_loop, pad_to_multiple

from test_model import _randomised

# T = 2 unrolls 4 encoder and 4 decoder passes: its trace, load and ONNX conversion take minutes
# on two CPU cores (T = 0: one pass), hence slow; the eager tests below check
# T = 2's unrolled loop against the authors' loop on every run.
STEPS = (0, pytest.param(2, marks=pytest.mark.slow))
# Neither side a multiple of 8, batches of 1 and 2; then the smallest sides the files accept.
SIZES = ((1, 37, 45), (2, 64, 56), (1, MIN_SIDE, MIN_SIDE + 6))
TOLERANCE = 1e-4   # max abs against refine(), float32

needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                       reason="onnxruntime is not installed (pip install 'sipl_fast[export]')")


@pytest.fixture(scope="module")
def model():
    return _randomised(SIPLPromptIR.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(b, 3, h, w, generator=g) for b, h, w in SIZES]


@pytest.fixture(scope="module")
def expected(model, images):
    return functools.cache(lambda steps: [model.refine(x, steps=steps) for x in images])


class Exported:
    """Each steps value's program, traced on first use, and its files in both formats."""

    def __init__(self, model, folder):
        self.model, self.folder = model, folder

    @functools.cache
    def program(self, steps: int):
        return refinement_program(self.model, steps)

    @functools.cache
    def torch_file(self, steps: int):
        return save_torch(self.program(steps), self.folder / f"refine{steps}.pt2")

    @functools.cache
    def onnx_file(self, steps: int):
        return save_onnx(self.program(steps), self.folder / f"refine{steps}.onnx")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return Exported(model, tmp_path_factory.mktemp("export"))


# --------------------------------------------------------------------------- exported files
@pytest.mark.parametrize("steps", STEPS)
def test_torch_export_reproduces_refine(steps, exported, images, expected):
    restore = torch.export.load(exported.torch_file(steps)).module()
    for x, want in zip(images, expected(steps)):
        got = restore(x)
        assert got.shape == x.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() < TOLERANCE, tuple(x.shape)


@needs_onnxruntime
@pytest.mark.parametrize("steps", STEPS)
def test_onnx_reproduces_refine(steps, exported, images, expected):
    import onnxruntime

    runner = onnxruntime.InferenceSession(str(exported.onnx_file(steps)), providers=["CPUExecutionProvider"])
    (image,), (restored,) = runner.get_inputs(), runner.get_outputs()
    assert (image.name, restored.name) == ("image", "restored")
    assert all(isinstance(side, str) for side in (image.shape[0], *image.shape[2:])), "dynamic B, H, W"
    for x, want in zip(images, expected(steps)):
        got = torch.from_numpy(runner.run(None, {"image": x.numpy()})[0])
        assert got.shape == x.shape
        assert (got - want).abs().max().item() < TOLERANCE, tuple(x.shape)


@pytest.mark.parametrize("steps", STEPS)
def test_exported_graph_holds_only_aten_operators(steps, exported):
    program = exported.program(steps)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    foreign = sorted(t for t in targets if not t.startswith(("aten.", "<built-in function")))
    assert not foreign, foreign   # no Triton kernel, no extension op, no custom op
    assert not [t for t in targets if t.endswith("_.default")], "no in-place update"


# --------------------------------------------------------------------------- the graph, eagerly
def test_padding_matches_refine_padding():
    for h in range(1, 20):
        for w in (1, 2, 3, 7, 8, 9, 15, 17):
            x = torch.randn(2, 3, h, w)
            assert torch.equal(pad_bottom_right(x), pad_to_multiple(x, 8)), (h, w)


@pytest.mark.parametrize("share_encoder", [True, False])
@pytest.mark.parametrize("steps", [0, 2])
def test_refinement_graph_is_the_authors_loop(model, share_encoder, steps):
    x = torch.rand(2, 3, 19, 26)
    graph = RefinementGraph(model, steps, share_encoder=share_encoder)
    with sipl_fast.use_backend("reference"), torch.no_grad():
        got, want = graph(x), authors_loop(model, x, steps=steps)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() < 1e-5


def test_refinement_graph_without_encode_all_runs_two_full_passes(model):
    class ForwardAndEncodeOnly(torch.nn.Module):   # the API every SIPL model has
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, privileged_features=None):
            return self.inner(x, privileged_features=privileged_features)

        def encode(self, x):
            return self.inner.encode(x)

    x = torch.rand(1, 3, 21, 11)
    graph = RefinementGraph(ForwardAndEncodeOnly(model), 2)
    assert not graph.share_encoder
    with sipl_fast.use_backend("reference"), torch.no_grad():
        assert (graph(x) - authors_loop(model, x, steps=2)).abs().max().item() < 1e-5
    with pytest.raises(ExportError, match="encode_all"):
        RefinementGraph(ForwardAndEncodeOnly(model), 2, share_encoder=True)


# --------------------------------------------------------------------------- errors
def test_bad_format_and_steps_fail_before_any_trace(model, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(model, tmp_path / "m.tflite", "tflite")
    for steps in (-1, 1.5, True, None):
        for function in (export_torch, export_onnx, refinement_program):
            args = (model, tmp_path / "m.out", steps) if function is not refinement_program else (model, steps)
            with pytest.raises(ExportError, match="refine_steps must be a non-negative int"):
                function(*args)
    with pytest.raises(ExportError, match="opset must be an int >= 18"):
        export_onnx(model, tmp_path / "m.onnx", 1, opset=11)
    with pytest.raises(ExportError, match="forward"):
        export_torch(torch.nn.Linear(2, 2), tmp_path / "m.pt2", 1)
    assert not list(tmp_path.iterdir())


def test_unwritable_paths_fail_before_any_trace(model, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_torch(model, tmp_path / "missing" / "m.pt2", 1)
    with pytest.raises(ExportError, match="is a folder"):
        export_onnx(model, tmp_path, 1)
    with pytest.raises(ExportError, match="does not exist"):
        export(model, tmp_path / "missing" / "m.onnx", "onnx", 1)


# --------------------------------------------------------------------------- SIPLAdaIR
@pytest.fixture(scope="module")
def adair():
    adair_module = pytest.importorskip("sipl_fast.adair")
    model = adair_module.SIPLAdaIR.from_preset("tiny").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dictionary" in name:   # zero-initialised: random, so that the privileged path matters
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_refinement_graph_runs_sipl_adair(adair):
    x = torch.rand(1, 3, 21, 30)
    with sipl_fast.use_backend("reference"), torch.no_grad():
        got, want = RefinementGraph(adair, 2)(x), authors_loop(adair, x, steps=2)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.slow
@needs_onnxruntime
def test_sipl_adair_exports_to_both_formats(adair, tmp_path):
    import onnxruntime

    # 264 pixels: the 1/2-resolution maps reach the low-frequency band's 128-pixel unit.
    images = [torch.rand(1, 3, 37, 45), torch.rand(1, 3, 264, 259)]
    program = refinement_program(adair, 1)
    restore = torch.export.load(save_torch(program, tmp_path / "adair.pt2")).module()
    runner = onnxruntime.InferenceSession(str(save_onnx(program, tmp_path / "adair.onnx")),
                                           providers=["CPUExecutionProvider"])
    for x in images:
        want = adair.refine(x, steps=1)
        assert (restore(x) - want).abs().max().item() < TOLERANCE
        got = torch.from_numpy(runner.run(None, {"image": x.numpy()})[0])
        assert (got - want).abs().max().item() < TOLERANCE


def test_network_without_proxy_fusion_exports_only_the_plain_pass(tmp_path):
    from sipl_fast.model import PromptIR

    network = PromptIR.from_preset("tiny")
    with pytest.raises(ExportError, match="no Proxy Fusion: refine_steps must be 0"):
        export_torch(network, tmp_path / "promptir.pt2", 1)
    assert isinstance(RefinementGraph(network, 0), RefinementGraph)
