"""Export a model's whole T-step refinement as one graph: ONNX, or a torch.export program.

The graph computes what ``model.refine(x, steps=T)`` computes, for float32 images of any
batch, height and width (at least MIN_SIDE = 9 pixels a side):

    x0 = pad(x)   (bottom/right to a multiple of 8: reflect, or replicate where reflect cannot)
    per step:     y0 = f(x_prev); pf = encode(y0); y = f(x_prev, pf); x_prev = y
    output = x_T cropped back to the input's size  (steps=0: the plain pass f(x0), cropped)

The loop is unrolled (T steps, 2 decoder passes each). It is traced on the ``reference``
backend: whole maps, plain matmul / softmax attention, no Triton kernels, no C++ extension, no
dictionary cache, no row strips and no in-place updates (``sipl_fast.modules.streaming`` is
false on that backend whatever the tracer), so the graph holds only standard operators.

Any model with SIPL's API exports: ``forward(x)``, ``forward(x, privileged_features=pf)`` and
``encode(x)``. A model that also has ``encode_all(x)`` and ``decode(x, encoded, pf)``
(SIPLPromptIR, SIPLAdaIR) runs its encoder once per step, shared by both passes, as
:class:`sipl_fast.refine.Refiner` does; the outputs are the same.

docs/export.md shows how to run the exported files.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .backends import use_backend

FORMATS = ("onnx", "torch-export")
PAD_TO = 8  # three 2x downsamplings
# The smallest side of the exported graphs: at 8 pixels or fewer the 1/8-resolution maps are
# 1 pixel wide, a size the tracer specialises (broadcasting), so one graph cannot cover both.
MIN_SIDE = 9
DEFAULT_OPSET = 18  # the opset of torch.onnx's dynamo exporter (its torchlib)


class ExportError(ValueError):
    """An export that cannot be done as asked (format, steps, model, output path)."""


def _scalar(value, device) -> torch.Tensor:
    """An int (or a traced symbolic size) as a 0-d int64 tensor."""
    return torch.zeros((), dtype=torch.int64, device=device) + value


def padding_indices(size, multiple: int, reflect: torch.Tensor, device) -> torch.Tensor:
    """Source indices that pad a side of length ``size`` at its end to a multiple: reflected
    (index 2(size-1) - i past the end, as ``F.pad(mode="reflect")``) where ``reflect`` is true,
    else replicated (the last index). Built from sizes with tensor ops, so a traced graph keeps
    ``size`` symbolic."""
    padded = (size + multiple - 1) // multiple * multiple
    index = torch.arange(padded, device=device)
    reflected = torch.where(index < size, index, 2 * (size - 1) - index)
    replicated = index.clamp(max=size - 1)
    return torch.where(reflect, reflected, replicated)


def pad_bottom_right(x: torch.Tensor, multiple: int = PAD_TO) -> torch.Tensor:
    """``sipl_fast.refine.pad_to_multiple`` written with gathers, for symbolic H and W: reflect
    when both pads are shorter than their sides, else replicate (both sides alike)."""
    h, w = x.shape[-2:]
    pad_h = (h + multiple - 1) // multiple * multiple - h
    pad_w = (w + multiple - 1) // multiple * multiple - w
    # The rule as a tensor: a Python bool here would fix H and W in the traced graph.
    reflect = (_scalar(pad_h, x.device) < h) & (_scalar(pad_w, x.device) < w)
    rows = padding_indices(h, multiple, reflect, x.device)
    cols = padding_indices(w, multiple, reflect, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def shares_encoder(model: nn.Module) -> bool:
    """Whether the model exposes its encoder and decoder separately (encode_all / decode)."""
    return callable(getattr(model, "encode_all", None)) and callable(getattr(model, "decode", None))


class RefinementGraph(nn.Module):
    """``model.refine(x, steps)`` unrolled into one traceable forward: pad, T steps, crop.

    Build it on the model to export; its forward runs the model on whatever backend is active
    (the export functions trace it on ``reference``). ``share_encoder`` (default: where the
    model exposes encode_all / decode) runs the encoder of x_prev once per step for both passes.
    """

    def __init__(self, model: nn.Module, refine_steps: int, share_encoder: bool | None = None):
        super().__init__()
        _check_steps(refine_steps)
        _check_model(model)
        if refine_steps and getattr(model, "proxy_fusion", True) is False:
            raise ExportError(f"{type(model).__name__} has no Proxy Fusion: refine_steps must be 0, got {refine_steps}")
        if share_encoder and not shares_encoder(model):
            raise ExportError(f"{type(model).__name__} has no encode_all/decode to share the encoder with")
        self.model = model
        self.refine_steps = refine_steps
        self.share_encoder = shares_encoder(model) if share_encoder is None else share_encoder

    def step(self, current: torch.Tensor) -> torch.Tensor:
        """One refinement step: plain pass, privileged features of its output, privileged pass."""
        if self.share_encoder:
            encoded = self.model.encode_all(current)
            initial = self.model.decode(current, encoded)
            return self.model.decode(current, encoded, self.model.encode(initial))
        initial = self.model(current)
        return self.model(current, privileged_features=self.model.encode(initial))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        current = pad_bottom_right(x, PAD_TO)
        if self.refine_steps == 0:
            current = self.model(current)
        for _ in range(self.refine_steps):
            current = self.step(current)
        # Crop with gathers: a slice [:h] would make the tracer prove h <= the padded size.
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        return current.index_select(-2, rows).index_select(-1, cols)


# --------------------------------------------------------------------------- checks
def _check_steps(refine_steps) -> None:
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ExportError(f"refine_steps must be a non-negative int, got {refine_steps!r}")


def _check_format(fmt) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_model(model) -> None:
    missing = [name for name in ("forward", "encode") if not callable(getattr(model, name, None))]
    if not isinstance(model, nn.Module) or missing:
        raise ExportError(f"can only export an nn.Module with forward(x), forward(x, privileged_features=pf) "
                          f"and encode(x); got {type(model).__name__}")


def _check_output(path) -> Path:
    """The output file as a Path: its folder exists and is writable and it is no folder itself."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; name the file to write")
    if not folder.is_dir():
        raise ExportError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"{path}: the folder {folder} is not writable")
    return path


def _input_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(config["inp_channels"]) if isinstance(config, dict) and "inp_channels" in config else 3


# --------------------------------------------------------------------------- export
def refinement_program(model: nn.Module, refine_steps: int = 2) -> torch.export.ExportedProgram:
    """The refinement graph of ``model`` (a float32 CPU copy in eval mode) traced by
    torch.export on the ``reference`` backend, with a dynamic batch (>= 1), height and width
    (>= MIN_SIDE). :func:`save_torch` and :func:`save_onnx` write it."""
    _check_model(model)
    _check_steps(refine_steps)
    graph = RefinementGraph(copy.deepcopy(model).to("cpu", torch.float32).eval(), refine_steps).eval()
    # Example sizes that are neither multiples of 8 nor 0/1 (a tracer specialises those).
    example = torch.rand(2, _input_channels(model), 13, 21)
    dims = {0: torch.export.Dim("batch", min=1),
            2: torch.export.Dim("height", min=MIN_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE)}
    with use_backend("reference"), torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes={"x": dims})


def _write_atomically(path: Path, write, suffix: str = "") -> Path:
    """Call write(temporary path) in the output's folder, then move the file into place (a
    failed export leaves no partial file)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)   # mkstemp's file is private; give the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def save_torch(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """Write a program of :func:`refinement_program` as a torch.export archive (``.pt2``)."""
    path = _check_output(path)
    # torch.export.save expects the .pt2 suffix; the temporary file has it.
    return _write_atomically(path, lambda temporary: torch.export.save(program, temporary), suffix=".pt2")


def _check_opset(opset) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ExportError(f"opset must be an int >= {DEFAULT_OPSET}, got {opset!r}")


def _check_onnx_packages() -> None:
    try:
        import onnx  # noqa: F401 - torch.onnx imports them lazily; fail early, naming them
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript "
                          f"(pip install 'sipl_fast[export]'): {exc}") from None


def save_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Write a program of :func:`refinement_program` as one ONNX file (weights inside) with
    torch.onnx's dynamo exporter: input "image", output "restored"."""
    _check_opset(opset)
    path = _check_output(path)
    _check_onnx_packages()

    def write(temporary: str) -> None:
        onnx_program = torch.onnx.export(program, f=None, dynamo=True, opset_version=opset, verbose=False,
                                         input_names=["image"], output_names=["restored"])
        onnx_program.save(temporary, external_data=False)

    return _write_atomically(path, write)


def export_torch(model: nn.Module, path: str | os.PathLike, refine_steps: int = 2) -> Path:
    """Write ``model.refine(x, steps=refine_steps)`` as a torch.export archive (``.pt2``):
    ``torch.export.load(path).module()(x)``. Returns the path written."""
    _check_steps(refine_steps)
    _check_output(path)   # before the trace, which takes a while
    return save_torch(refinement_program(model, refine_steps), path)


def export_onnx(model: nn.Module, path: str | os.PathLike, refine_steps: int = 2,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model.refine(x, steps=refine_steps)`` as one ONNX file: input "image", output
    "restored", both float32 (B, C, H, W) with dynamic B, H and W. Needs the packages onnx and
    onnxscript (the ``export`` extra). Returns the path written."""
    _check_steps(refine_steps)
    _check_opset(opset)
    _check_output(path)
    _check_onnx_packages()
    return save_onnx(refinement_program(model, refine_steps), path, opset)


def export(model: nn.Module, path: str | os.PathLike, fmt: str, refine_steps: int = 2, **options) -> Path:
    """:func:`export_onnx` or :func:`export_torch` by format name ("onnx" or "torch-export")."""
    _check_format(fmt)
    if fmt == "onnx":
        return export_onnx(model, path, refine_steps, **options)
    if options:
        raise ExportError(f"the torch-export format takes no options, got {', '.join(sorted(options))}")
    return export_torch(model, path, refine_steps)
