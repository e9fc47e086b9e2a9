"""What a GPU run says about the defaults that wait for a measurement (run after gpu_check.sh).

    python bench/decide_defaults.py bench/results/run

Reads refine.json (bench/refine_table.py), pixel_ops.json (bench/pixel_ops_table.py),
depthwise_sweep.json (bench/depthwise_sweep.py) and mdta_prefetch.json (bench/mdta_prefetch.py)
from the directory and prints, with the numbers behind each line:
- whether CUDA graphs should keep recording the kernels of ops.graph_kernels (the depthwise
  kernels, LayerNorm2d's on every call): "sipl_fast+graph" must beat "sipl_fast+graph+aten";
- whether eager calls without autograd should take the depthwise kernels (they run ATen's):
  "sipl_fast+dwk" (the kernels) must beat "sipl_fast" and the kernels must not lose the
  per-pass total of their ops in float32 or amp;
- whether ChannelMix's GEMMs should keep following the convolutions' TF32 setting:
  "sipl_fast+graph" must beat "sipl_fast+graph+fp32mix" (the mixes in full float32);
- whether the row-streaming depthwise kernels' launch configuration (stream_config) is the
  fastest of bench/depthwise_sweep.py's candidates at the refinement's shapes;
- whether the Gram products' 1024-pixel pieces beat the former 4096 ("+gram4096");
- how many tiles the MDTA kernels' 16-bit streams should keep in flight (0, 1 or 2;
  mdta_prefetch.json, bench/mdta_prefetch.py): the depth fastest in geometric mean;
- whether the triton backend should run MDTA in each dtype by its kernels or by the torch
  formulation (transposed_attention.json, bench/transposed_attention_table.py): the kernels
  must beat the torch formulation in geometric mean over the table's shapes and modes, eager
  and replayed;
- whether the MDTA kernels should launch through kernels/launch_cache.py by default
  (launch_overhead.json, bench/launch_overhead.py): the eager fwd+bwd's host time with the
  cache must be at least 5 % under that without it (and the GPU test
  test_gpu_launch_cache_gives_the_same_bits must pass);
- the fastest strip budget ("+sN" rows, and the default) whose peak memory stays within the
  issue's 0.25x of the reference loop's, at 512x512. These rows replay a CUDA graph, whose
  peak ran 8-13 % under the eager one's (H200): the eager default row is printed too, and a
  budget near the limit needs that margin.
A missing file or row is reported as such; nothing is changed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from sipl_fast import modules, ops
from sipl_fast.kernels import transposed_attention

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


def _speedup_line(rows: dict, what: str, baseline: str, candidate: str) -> tuple[list[str], list[bool]]:
    """(["<what> <ratio>x (<candidate> vs <baseline> ms)"], [candidate faster]) where both rows exist."""
    base, new = rows.get(baseline), rows.get(candidate)
    if not (base and new):
        return [], []
    ratio = base["seconds"] / new["seconds"]
    return [f"{what} {ratio:.2f}x ({new['seconds'] * 1e3:.1f} vs {base['seconds'] * 1e3:.1f} ms)"], [ratio > 1.0]


def _replay_verdict(refine: dict | None, name: str, setting: str, what: str, baseline: str,
                    dropped: str = "DROP") -> list[str]:
    """Whether a default that the replayed 512x512 refinement ("sipl_fast+graph") runs stays:
    it must beat the ``baseline`` row, the same replay without it."""
    lines, votes = _speedup_line(_refine_rows(refine) if refine else {}, f"refinement 512x512 replayed: {what}",
                                 baseline, "sipl_fast+graph")
    if not votes:
        return [f"{name}: no measurement, keep {setting}"]
    return lines + [f"{name} ({setting}): {'keep' if votes[0] else dropped}"]


def graph_kernels_verdict(refine: dict | None) -> list[str]:
    return _replay_verdict(refine, "graph kernels", "ops.graph_kernels", "graph kernels", "sipl_fast+graph+aten")


def eager_depthwise_verdict(refine: dict | None, pixel_ops: dict | None) -> list[str]:
    lines, votes = _speedup_line(_refine_rows(refine) if refine else {}, "refinement 512x512 eager: depthwise kernels",
                                 "sipl_fast", "sipl_fast+dwk")
    for total in pixel_ops["totals"] if pixel_ops else []:
        sums = total["ms_per_pass"]
        if total["mode"] == "fwd" and sums.get("triton") and sums.get("torch"):
            ratio = sums["torch"] / sums["triton"]
            votes.append(ratio >= 1.0)
            lines.append(f"pixel ops {total['scenario']} {total['dtype']} forward, per pass: kernels "
                         f"{ratio:.2f}x the torch formulation ({sums['triton']:.2f} vs {sums['torch']:.2f} ms)")
    rule = "(sipl_fast/ops/__init__.py, the DEPTHWISE_OPS rule)"
    if not votes:
        return lines + ["depthwise kernels in eager no-grad calls: no measurement, keep ATen's"]
    verdict = "SWITCH ON" if all(votes) else "keep ATen's"
    return lines + [f"depthwise kernels in eager no-grad calls: {verdict} {rule}"]


def mix_precision_verdict(refine: dict | None) -> list[str]:
    return _replay_verdict(refine, "mix precision", "the convolutions' TF32 setting, modules.convolution_precision",
                           "TF32 mixes", "sipl_fast+graph+fp32mix")


def gram_piece_verdict(refine: dict | None) -> list[str]:
    return _replay_verdict(refine, "Gram pieces", "torch_impl.GRAM_PIECE_CUDA = 1024", "1024-pixel Gram pieces",
                           "sipl_fast+graph+gram4096", dropped="back to 4096")


def strip_verdict(refine: dict | None) -> list[str]:
    if not refine:
        return ["strip budget: no measurement"]
    rows = _refine_rows(refine)
    reference = rows.get("reference")
    if reference is None:
        return ["strip budget: no reference row"]
    candidates = {DEFAULT_STRIP_MIB: rows.get("sipl_fast+graph")}
    for provider, row in rows.items():
        suffix = provider.rsplit("+", 1)[-1]
        if provider.startswith("sipl_fast+graph+s") and suffix[1:].isdigit():
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


def _geometric_mean(values: list[float]) -> float:
    return math.prod(values) ** (1 / len(values))


def _speed_across_shapes(results: list[dict]) -> dict[tuple, float]:
    """Per sweep candidate (widest, rows, warps) timed at every shape: the geometric mean over
    the shapes of its speed relative to the planned configuration."""
    speeds: dict[tuple, list[float]] = {}
    for result in results:
        planned_ms = next((row["ms"] for row in result["configs"] if row.get("planned")), None)
        for row in result["configs"]:
            for candidate in row.get("candidates", []):
                if planned_ms and row["ms"]:
                    speeds.setdefault(tuple(candidate), []).append(planned_ms / row["ms"])
    return {candidate: _geometric_mean(ratios) for candidate, ratios in speeds.items() if len(ratios) == len(results)}


def depthwise_config_verdict(sweep: dict | None) -> list[str]:
    """The fastest launch configuration of the row-streaming depthwise kernels per shape
    (bench/depthwise_sweep.py) against the planned one (kernels/depthwise3x3.stream_config).
    One plan serves every shape, and single shapes run in ~60 us on an H200, where wave
    quantisation moves a config by +-10 %: retune only for a candidate that is > 5 % faster
    in geometric mean over the shapes."""
    if not sweep:
        return ["depthwise configs: no measurement, keep stream_config"]
    lines = []
    for result in sweep["results"]:
        if result["planned_vs_best"] is not None:
            lines.append(f"depthwise {result['case']['name']}: best {result['best']} "
                         f"{result['planned_vs_best']:.2f}x the planned config, {result['best_vs_aten']:.2f}x ATen")
    wrong = [result["case"]["name"] for result in sweep["results"]
             if not all(row["exact"] for row in result["configs"])]
    if wrong:
        lines.append(f"depthwise configs NOT EXACT at {', '.join(wrong)}: a kernel bug, fix before tuning")
    across = _speed_across_shapes(sweep["results"])
    if not across:
        return lines + ["depthwise configs: keep stream_config (no candidate timed at every shape)"]
    (widest, rows, warps), speed = max(across.items(), key=lambda item: item[1])
    best = f"widest={widest}, rows={rows}, warps={warps}: {speed:.3f}x the plan over the shapes (geometric mean)"
    if speed > 1.05:
        return lines + [f"depthwise configs: retune stream_config to {best}"]
    return lines + [f"depthwise configs: keep stream_config (best candidate {best})"]


PREFETCH_DEPTHS = {"plain": 0, "prefetch": 1, "prefetch2": 2}  # bench/mdta_prefetch.py's variants: tiles in flight


def mdta_prefetch_verdict(sweep: dict | None) -> list[str]:
    """How many tiles the MDTA kernels' 16-bit streams keep in flight (bench/mdta_prefetch.py):
    the depth fastest in geometric mean, over the cases and modes, of its speed-up on the
    plain streams, among the depths timed in every row (reports before the tenth session
    have no "prefetch2"), replaces the default if it beats the default's depth by 2 %; and
    where issue 4's bandwidth target stands."""
    if not sweep or not sweep.get("results"):
        return ["MDTA prefetch: no measurement, keep kernels.PREFETCH_DEFAULT"]
    lines, speedups, timed_rows = [], {}, 0
    for result in sweep["results"]:
        for mode, row in result["modes"].items():
            plain = row["plain"]["ms"]
            if not plain:
                continue
            timed_rows += 1
            cells = []
            for variant in PREFETCH_DEPTHS:
                cell = row.get(variant)
                if variant == "plain" or not cell or not cell["ms"]:
                    continue
                speedups.setdefault(variant, []).append(plain / cell["ms"])
                share = cell["copy_share"]
                cells.append(f"{variant} {plain / cell['ms']:.2f}x ({cell['ms']:.3f} ms"
                             + (f", {share:.0%} of copy bandwidth)" if share else ")"))
            lines.append(f"MDTA {result['case']['name']} {result['case']['dtype']} {mode}: " + ", ".join(cells)
                         + f" vs plain {plain:.3f} ms")
    means = {"plain": 1.0, **{variant: _geometric_mean(values) for variant, values in speedups.items()
                              if len(values) == timed_rows}}
    if not timed_rows or len(means) == 1:
        return lines + ["MDTA prefetch: no timing, keep kernels.PREFETCH_DEFAULT"]
    best = max(means, key=means.get)
    depth = PREFETCH_DEPTHS[best]
    default = next(variant for variant, d in PREFETCH_DEPTHS.items() if d == transposed_attention.PREFETCH_DEFAULT)
    # another depth must win by 2 % (run-to-run noise of replayed timings is ~1 %)
    verdict = ("keep" if depth == transposed_attention.PREFETCH_DEFAULT or means[best] < 1.02 * means.get(default, 0)
               else f"SET kernels.PREFETCH_DEFAULT (SIPL_FAST_MDTA_PREFETCH) to {depth}")
    summary = ", ".join(f"{variant} {mean:.3f}x" for variant, mean in means.items() if variant != "plain")
    return lines + [f"MDTA prefetch depth: {summary} the plain streams in geometric mean; fastest {best} "
                    f"(depth {depth}): {verdict}"]


_TABLE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def mdta_route_verdict(table: dict | None) -> list[str]:
    """Per dtype of the MDTA table: do the kernels beat the torch formulation (eager and
    replayed timings of every shape and mode, geometric mean), and does the triton backend's
    rule (ops._TORCH_FORMULATION_ON_CUDA) route that dtype accordingly?"""
    speedups: dict[str, list[float]] = {}
    for row in (table or {}).get("rows", []):
        for key in ("vs_torch", "vs_torch_graph"):
            if (row.get("speedups") or {}).get(key):
                speedups.setdefault(row["dtype"], []).append(row["speedups"][key])
    if not speedups:
        return ["MDTA route: no measurement, keep ops._TORCH_FORMULATION_ON_CUDA"]
    rule = ops._TORCH_FORMULATION_ON_CUDA.get("transposed_attention", lambda x: False)
    lines = []
    for dtype, values in speedups.items():
        speed = _geometric_mean(values)
        routed_to_torch = rule(torch.empty(0, dtype=_TABLE_DTYPES[dtype], device="meta"))
        verdict = "keep" if (speed < 1.0) == routed_to_torch else "CHANGE"
        lines.append(f"MDTA {dtype}: kernels {speed:.2f}x the torch formulation ({len(values)} timings, geometric "
                     f"mean); the triton backend runs the {'torch formulation' if routed_to_torch else 'kernels'}: "
                     f"{verdict} (ops._TORCH_FORMULATION_ON_CUDA)")
    return lines


def launch_cache_verdict(overhead: dict | None) -> list[str]:
    """Whether MDTA's launches should go through kernels/launch_cache.py by default."""
    host = {row["route"]: row["us"] for row in (overhead or {}).get("ops", []) if row["op"] == "MDTA"}
    if not (host.get("eager") and host.get("eager+cache")):
        return ["launch cache: no measurement, keep it off (SIPL_FAST_LAUNCH_CACHE=1 turns it on)"]
    ratio = host["eager"] / host["eager+cache"]
    verdict = "TURN ON (kernels/launch_cache.py's default)" if ratio >= 1.05 else "keep it off"
    return [f"MDTA eager fwd+bwd host time: {host['eager+cache']:.0f} us with the launch cache, "
            f"{host['eager']:.0f} us without ({ratio:.2f}x): {verdict}"]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    directory = Path(args[0])
    refine, pixel_ops = _load(directory, "refine.json"), _load(directory, "pixel_ops.json")
    sweep, prefetch = _load(directory, "depthwise_sweep.json"), _load(directory, "mdta_prefetch.json")
    mdta, overhead = _load(directory, "transposed_attention.json"), _load(directory, "launch_overhead.json")
    verdicts = (graph_kernels_verdict(refine) + mix_precision_verdict(refine) + gram_piece_verdict(refine)
                + eager_depthwise_verdict(refine, pixel_ops) + depthwise_config_verdict(sweep) + strip_verdict(refine)
                + mdta_prefetch_verdict(prefetch) + mdta_route_verdict(mdta) + launch_cache_verdict(overhead))
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
