"""What a GPU run says about the defaults that wait for a measurement (run after gpu_check.sh).

    python bench/decide_defaults.py bench/results/run

Reads refine.json (bench/refine_table.py) and pixel_ops.json (bench/pixel_ops_table.py) from
the directory and prints, with the numbers behind each line:
- whether the depthwise kernels (ops.DEPTHWISE_OPS) should become the CUDA default: they must
  win the refinement with a CUDA graph ("sipl_fast+graph+dwk" vs "sipl_fast+graph") and not
  lose the per-pass total of their ops in float32 or amp;
- whether LayerNorm2d's kernel should also take the small calls when a CUDA graph replays
  them ("sipl_fast+graph+dwk+lnk" vs "sipl_fast+graph+dwk");
- the fastest strip budget ("+sN" rows, and the default) whose peak memory stays within the
  issue's 0.25x of the reference loop's, at 512x512. These rows replay a CUDA graph, whose
  peak ran 13 % under the eager one's at the old budget (H200, run c): the eager default row
  is printed too, and a budget near the limit needs that margin.
A missing file or row is reported as such; nothing is changed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sipl_fast import modules

MEMORY_TARGET = 0.25  # issue 5: peak memory vs the reference loop at 512x512
DEFAULT_STRIP_MIB = modules.STRIP_ELEMENTS["cuda"] >> 18  # elements of float32 -> MiB


def _load(directory: Path, name: str):
    path = directory / name
    if not path.is_file():
        print(f"{name}: missing (its gpu_check section did not finish)")
        return None
    with open(path) as f:
        return json.load(f)


def _refine_rows(refine: dict) -> dict:
    return {row["provider"]: row for row in refine["rows"] if row["size"] == "512x512"}


def depthwise_verdict(refine: dict | None, pixel_ops: dict | None) -> list[str]:
    lines, votes = [], []
    if refine:
        rows = _refine_rows(refine)
        plain, kernels = rows.get("sipl_fast+graph"), rows.get("sipl_fast+graph+dwk")
        if plain and kernels:
            ratio = plain["seconds"] / kernels["seconds"]
            votes.append(ratio > 1.0)
            lines.append(f"refinement 512x512 with a CUDA graph: depthwise kernels {ratio:.2f}x "
                         f"({kernels['seconds'] * 1e3:.1f} vs {plain['seconds'] * 1e3:.1f} ms)")
    if pixel_ops:
        for total in pixel_ops["totals"]:
            sums = total["ms_per_pass"]
            if total["mode"] == "fwd" and sums.get("triton") and sums.get("torch"):
                ratio = sums["torch"] / sums["triton"]
                votes.append(ratio >= 1.0)
                lines.append(f"pixel ops {total['scenario']} {total['dtype']} forward, per pass: kernels "
                             f"{ratio:.2f}x the torch formulation ({sums['triton']:.2f} vs {sums['torch']:.2f} ms)")
    if not votes:
        return lines + ["depthwise kernels: no measurement, keep ATen's"]
    switch = all(votes)
    return lines + [f"depthwise kernels as the CUDA default: {'YES' if switch else 'no'} "
                    "(sipl_fast/ops/__init__.py, the DEPTHWISE_OPS rule)"]


def layer_norm_verdict(refine: dict | None) -> list[str]:
    rows = _refine_rows(refine) if refine else {}
    default, kernel = rows.get("sipl_fast+graph+dwk"), rows.get("sipl_fast+graph+dwk+lnk")
    if not (default and kernel):
        return ["LayerNorm2d kernel on small calls: no measurement, keep the size rule"]
    ratio = default["seconds"] / kernel["seconds"]
    return [f"refinement 512x512 with a CUDA graph: LayerNorm2d kernel on every call {ratio:.2f}x "
            f"({kernel['seconds'] * 1e3:.1f} vs {default['seconds'] * 1e3:.1f} ms)",
            f"LayerNorm2d kernel on small calls while capturing a graph: {'YES' if ratio > 1.0 else 'no'} "
            "(sipl_fast/ops/__init__.py, the layer_norm2d rule: add torch.cuda.is_current_stream_capturing())"]


def strip_verdict(refine: dict | None) -> list[str]:
    if not refine:
        return ["strip budget: no measurement"]
    rows = _refine_rows(refine)
    reference = rows.get("reference")
    if reference is None:
        return ["strip budget: no reference row"]
    candidates = {DEFAULT_STRIP_MIB: rows.get("sipl_fast+graph+dwk")}
    for provider, row in rows.items():
        suffix = provider.rsplit("+", 1)[-1]
        if provider.startswith("sipl_fast+graph+dwk+s") and suffix[1:].isdigit():
            candidates[int(suffix[1:])] = row
    lines, fitting = [], []
    for mib, row in sorted((m, r) for m, r in candidates.items() if r):
        speedup = reference["seconds"] / row["seconds"]
        memory = row["peak_extra_mib"] / reference["peak_extra_mib"]
        lines.append(f"strips of {mib} MiB: {speedup:.2f}x the reference loop, {memory:.3f}x its peak memory")
        if memory <= MEMORY_TARGET:
            fitting.append((row["seconds"], mib))
    eager = rows.get("sipl_fast")
    if eager:
        lines.append(f"eager default ({DEFAULT_STRIP_MIB} MiB strips): {reference['seconds'] / eager['seconds']:.2f}x "
                     f"the reference loop, {eager['peak_extra_mib'] / reference['peak_extra_mib']:.3f}x its peak memory")
    if not fitting:
        return lines + [f"strip budget: none within {MEMORY_TARGET}x the reference's memory"]
    best = min(fitting)[1]
    return lines + [f"strip budget: {best} MiB is the fastest within {MEMORY_TARGET}x memory "
                    f"(modules.STRIP_ELEMENTS['cuda'] = {best << 18}; now {DEFAULT_STRIP_MIB} MiB)"]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    directory = Path(args[0])
    refine, pixel_ops = _load(directory, "refine.json"), _load(directory, "pixel_ops.json")
    for line in depthwise_verdict(refine, pixel_ops) + layer_norm_verdict(refine) + strip_verdict(refine):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
