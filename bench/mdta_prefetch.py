"""The MDTA kernels' 16-bit streams with 0, 1 and 2 tiles loaded ahead
(kernels/transposed_attention._PREFETCH, 1 by default) at SIPL's shapes: the kernels' time
replayed from a CUDA graph, forward and forward + backward, their GB/s and share of the card's
copy bandwidth (issue 4's target: the forward at 512x512 dec1 >= 70 %), and how far apart
the variants' results are. One table and a JSON file.

    python bench/mdta_prefetch.py OUT.json            # CUDA
    python bench/mdta_prefetch.py OUT.json --smoke    # CPU, Triton interpreter, tiny shapes

Prefetching also halves the tiles (the tiles in flight take the registers of the one
planned), so the Gram pass sums the squared norms in another order than without it: the
results differ by rounding, which the GPU tests hold to FlashAttention's rule against float64;
"max_rel_diff" is the largest difference from the plain variant relative to the largest entry
of the tensor it is in (depths 1 and 2 share a tile length and give the same bits).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # the kernels run on CPU only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sipl_fast.kernels import transposed_attention as kernels  # noqa: E402

import decide_defaults  # noqa: E402
import table_harness as harness  # noqa: E402
import transposed_attention_table as table  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    shape: table.Shape
    dtype: str = "bf16"


CASES = tuple(Case(shape.name, shape) for shape in table.SHAPES[:4])  # 512x512 and the training shapes
SMOKE_CASES = (Case("smoke", table.Shape("smoke", 1, 96, 2, (9, 41)), "fp32"),)
VARIANTS = decide_defaults.PREFETCH_DEPTHS  # name: tiles in flight (kernels._PREFETCH)


@contextlib.contextmanager
def prefetching(depth: int):
    """kernels._PREFETCH = ``depth`` within the block (the cached launch layouts are keyed on it)."""
    previous = kernels._PREFETCH
    kernels._PREFETCH = depth
    try:
        yield
    finally:
        kernels._PREFETCH = previous


def _relative_difference(first, second) -> float:
    pairs = zip(first, second) if isinstance(first, (tuple, list)) else [(first, second)]
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in pairs)


def measure(case: Case, device: str, copy_gbs: float | None) -> dict:
    result = {"case": asdict(case), "modes": {}}
    for mode in table.MODES:
        torch.manual_seed(0)
        run, _ = table.make_runner(case.shape, table.DTYPES[case.dtype], mode, "triton", device)
        moved = table.TENSORS_MOVED[mode] * case.shape.stream_bytes(table.DTYPES[case.dtype])
        rows, outputs = {}, {}
        for variant, depth in VARIANTS.items():
            with prefetching(depth):
                outputs[variant] = run()  # the first call compiles
                ms = harness.graph_time_ms(run) if device == "cuda" else harness.time_ms(run, device)
            rows[variant] = {"ms": ms, "GBs": moved / ms / 1e6 if ms else None,
                             "copy_share": moved / ms / 1e6 / copy_gbs if ms and copy_gbs else None,
                             "max_rel_diff": _relative_difference(outputs[variant], outputs["plain"])}
        result["modes"][mode] = rows
    return result


def show(result: dict) -> None:
    case = result["case"]
    for mode, row in result["modes"].items():
        plain = row["plain"]["ms"]
        cells = "".join(f"  {variant} {row[variant]['ms']:.3f} ms {row[variant]['GBs']:6.0f} GB/s"
                        + (f" ({row[variant]['copy_share']:.0%} of copy)" if row[variant]["copy_share"] else "")
                        + (f" {plain / row[variant]['ms']:.2f}x" if variant != "plain" and plain else "")
                        for variant in VARIANTS if row[variant]["ms"])
        differences = max(row[variant]["max_rel_diff"] for variant in VARIANTS)
        print(f"{case['name']:17} {case['dtype']} {mode:7}{cells}  max rel diff {differences:.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    parser.add_argument("--budget-s", type=float, default=40.0, help="start no new case after this many seconds")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("mdta_prefetch.py: needs a CUDA device (use --smoke for a CPU check of the script)")
        return 2
    copy_gbs = harness.copy_bandwidth_gbs(device)
    if copy_gbs:
        print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    results = harness.run_cases(SMOKE_CASES if args.smoke else CASES, lambda case: measure(case, device, copy_gbs),
                                show, args.out, device, args.budget_s, tuple(VARIANTS))
    print(decide_defaults.mdta_prefetch_verdict({"results": results})[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
