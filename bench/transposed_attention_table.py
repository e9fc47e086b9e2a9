"""MDTA (transposed attention): the fused Triton kernels against PyTorch. One table and a JSON file.

    python bench/transposed_attention_table.py OUT.json [--dtypes bf16,fp32] [--budget-s 85] [--tf32]
    python bench/transposed_attention_table.py OUT.json --smoke     # tiny shapes on CPU: checks the script

Providers: ``triton`` (sipl_fast's fused kernels), ``reference`` (the authors' eager math:
F.normalize copies, two matmuls), ``torch`` (sipl_fast.ops.torch_impl: the Gram matrix of the
raw q and k, scaled by the norms afterwards) and ``compile`` (torch.compile of the reference,
one static compile per case). Modes: ``fwd`` (under no_grad, as at inference) and
``fwd+bwd`` (gradients of q, k, v and the temperature). Shapes: the MDTA blocks at full
resolution, where the time goes: enc1 (48 channels, 1 head) and dec1 / refinement (96
channels, 1 head; the same shape) for a 128x128 batch-8 training step, a 512x512 image and
a 1280x720 image.

Each cell: median time (triton.testing.do_bench), GB/s, and the peak memory allocated above
the inputs. GB/s counts the bytes a perfect implementation must move, the same for every
provider: the forward reads q, k, v and writes out (4 tensors); forward and backward also
read dO, q, k, v and write dq, dk, dv (11 tensors). The card's device-to-device copy
bandwidth (y.copy_(x) of 1 GiB, 2 bytes moved per byte copied) is measured first for the
target "triton forward at 512x512 dec1 >= 70% of copy bandwidth". Other targets, fwd+bwd:
triton >= 2.5x faster than reference and >= 1.3x faster than compile.

Time budget: the whole run should stay under ~90 s on an H100. torch.compile cases stop once
--compile-budget-s of compilation is spent and every measurement stops once --budget-s is
spent; the rows are ordered so the target shapes come first, and skipped cells say so.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

# The triton provider is the kernels, also where the triton backend routes 16-bit MDTA to torch.
os.environ.setdefault("SIPL_FAST_ALL_KERNELS", "1")
if not torch.cuda.is_available():  # the triton provider runs on CPU only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sipl_fast  # noqa: E402
from sipl_fast import ops  # noqa: E402
from sipl_fast.ops import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import table_harness as harness  # noqa: E402

PROVIDERS = ("triton", "reference", "torch", "compile")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 11}
TARGET_VS_REFERENCE, TARGET_VS_COMPILE, TARGET_COPY_FRACTION = 2.5, 1.3, 0.7
SPEEDUP_TARGETS = harness.with_graph_targets({"vs_reference": TARGET_VS_REFERENCE, "vs_compile": TARGET_VS_COMPILE})  # fwd+bwd


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    heads: int
    hw: tuple[int, int]

    def stream_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one (B, C, H, W) tensor."""
        return self.batch * self.channels * self.hw[0] * self.hw[1] * dtype.itemsize


SHAPES = (  # the bandwidth target first, so a tight budget still measures it
    Shape("dec1 512x512", 1, 96, 1, (512, 512)),
    Shape("enc1 512x512", 1, 48, 1, (512, 512)),
    Shape("dec1 128x128 B8", 8, 96, 1, (128, 128)),
    Shape("enc1 128x128 B8", 8, 48, 1, (128, 128)),
    Shape("dec1 1280x720", 1, 96, 1, (720, 1280)),
    Shape("enc1 1280x720", 1, 48, 1, (720, 1280)),
)
SMOKE_SHAPES = (
    Shape("smoke", 1, 32, 2, (6, 7)),
)
COPY_TARGET_CASE = "dec1 512x512"


def attention_function(provider: str):
    """f(q, k, v, temperature, heads) for a provider; ``compile`` gets a fresh static compile."""
    if provider == "compile":
        return torch.compile(reference.transposed_attention, dynamic=False)

    def run(q, k, v, temperature, heads):
        with sipl_fast.use_backend(provider):
            return ops.transposed_attention(q, k, v, temperature, heads)
    return run


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, requires_grad: bool):
    """q, k, v as channel chunks of one qkv tensor (as in the model), and the temperature."""
    qkv = torch.randn(shape.batch, 3 * shape.channels, *shape.hw, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in qkv.chunk(3, dim=1))
    # One dtype for all four: the reference formulation does not mix a float32 temperature in.
    temperature = torch.linspace(1.0, 4.0, shape.heads, device=device, dtype=dtype).reshape(-1, 1, 1)
    return [q, k, v, temperature.requires_grad_(requires_grad)]


def make_runner(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str):
    """(a zero-argument callable running one call in ``mode``, the input tensors it uses)."""
    fn = attention_function(provider)
    inputs = make_inputs(shape, dtype, device, requires_grad=mode != "fwd")
    out_shape = (shape.batch, shape.channels, *shape.hw)
    grad_out = None if mode == "fwd" else torch.randn(out_shape, device=device, dtype=dtype)
    return harness.runner(lambda: fn(*inputs, shape.heads), inputs, grad_out), inputs


def measure(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str) -> dict:
    run, _ = make_runner(shape, dtype, mode, provider, device)
    moved = TENSORS_MOVED[mode] * shape.stream_bytes(dtype)
    return harness.measured(run, device, "GBs", moved / 1e6)


def speedups(results: dict) -> dict:
    """triton's speed-up over reference, compile and torch, eager and replayed from CUDA graphs
    ("_graph"; the bandwidth target is the kernels'); None where unmeasured."""
    return {f"vs_{other}{suffix}": harness.speedup(results, (other,), key)
            for suffix, key in (("", "ms"), ("_graph", "graph_ms")) for other in ("reference", "compile", "torch")}


def _cell(result) -> str:
    return harness.cell_text(result, "GBs", "G", 6, 25)


def format_row(row: dict, providers) -> str:
    ratios = row["speedups"]
    training = row["mode"] == "fwd+bwd"
    return (f"{row['shape']:17} {row['dtype']:5} {row['mode']:7}"
            + "".join(_cell(row["results"].get(p)) for p in providers)
            + "".join(harness.ratio_cell(ratios[f"vs_reference{suffix}"], TARGET_VS_REFERENCE if training else None, 10)
                      + harness.ratio_cell(ratios[f"vs_compile{suffix}"], TARGET_VS_COMPILE if training else None, 10)
                      + harness.ratio_cell(ratios[f"vs_torch{suffix}"], None, 10) for suffix in ("", "_graph")))


def run_table(shapes, dtypes, providers, device: str, budget_s: float, compile_budget_s: float) -> list[dict]:
    """Measures every (dtype, shape, mode) row, printing each as it completes."""
    budget = harness.Budget(budget_s, compile_budget_s)
    print(f"{'':31}" + "".join(f"{p:>25}" for p in providers) + f"{'triton speed-up vs':>26}"
          + f"{'replayed (CUDA graphs)':>30}")
    print(f"{'shape':17} {'dtype':5} {'mode':7}" + f"{'time    GB/s    peak':>25}" * len(providers)
          + f"{'reference':>10}{'compile':>10}{'torch':>10}" * 2)
    return harness.measure_rows(
        shapes, dtypes, MODES, providers, budget, speedups, format_row,
        lambda shape, dtype, mode, provider: measure(shape, DTYPES[dtype], mode, provider, device))


def summary(rows: list[dict], copy_gbs: float | None) -> dict:
    """The issue's targets: fwd+bwd speed-ups at every measured row, forward vs copy bandwidth."""
    forward = {r["dtype"]: r["results"].get("triton") for r in rows
               if r["shape"] == COPY_TARGET_CASE and r["mode"] == "fwd"}
    out = {
        "copy_GBs": copy_gbs,
        "fwd_dec1_512_GBs": {dtype: result["GBs"] if result else None for dtype, result in forward.items()},
        "fwd_dec1_512_fraction_of_copy": {dtype: result["GBs"] / copy_gbs if result and copy_gbs else None
                                          for dtype, result in forward.items()},
        "fwd_dec1_512_graph_fraction_of_copy": {
            dtype: result["GBs_graph"] / copy_gbs if result and result.get("GBs_graph") and copy_gbs else None
            for dtype, result in forward.items()},
        **harness.fwd_bwd_speedups(rows, SPEEDUP_TARGETS),
    }
    print()
    if copy_gbs:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    for dtype, fraction in out["fwd_dec1_512_fraction_of_copy"].items():
        if fraction is not None:
            print(f"triton forward {COPY_TARGET_CASE} {dtype}: {out['fwd_dec1_512_GBs'][dtype]:.0f} GB/s = "
                  f"{100 * fraction:.0f}% of copy bandwidth (target >= {100 * TARGET_COPY_FRACTION:.0f}%)")
        graph = out["fwd_dec1_512_graph_fraction_of_copy"][dtype]
        if graph is not None:
            print(f"triton forward {COPY_TARGET_CASE} {dtype}, replayed from a CUDA graph: "
                  f"{100 * graph:.0f}% of copy bandwidth")
    harness.print_speedup_targets(out, SPEEDUP_TARGETS)
    return out


def _autotuned_configs() -> dict:
    """{kernel: {autotuning key: the config it picked}} after a run with
    SIPL_FAST_TRITON_AUTOTUNE=1 (the picks to compare with the launchers' plans); {} otherwise."""
    if os.environ.get("SIPL_FAST_TRITON_AUTOTUNE", "0") != "1" or not torch.cuda.is_available():
        return {}
    from sipl_fast.kernels import transposed_attention as kernels
    picked = {name: {str(key): str(config) for key, config in tuned.cache.items()}
              for name, tuned in (("gram_partials", kernels._gram_partials_tuned),
                                  ("channel_mix", kernels._channel_mix_tuned))}
    for name, configs in picked.items():
        for key, config in configs.items():
            print(f"autotuned {name} {key}: {config}")
    return {"autotuned": picked}


def main(argv=None) -> int:
    return harness.attention_table_main(
        argv, doc=__doc__, script="transposed_attention_table", dtypes=DTYPES, providers=PROVIDERS, shapes=SHAPES,
        smoke_shapes=SMOKE_SHAPES, budget_s=85.0, compile_budget_s=30.0, card_rate=harness.copy_bandwidth_gbs,
        run_table=run_table, summary=summary,
        extra_report=lambda args: {"fp32_triton_precision": "tf32" if args.tf32 else "3xTF32", **_autotuned_configs()})


if __name__ == "__main__":
    sys.exit(main())
