"""What the op table scripts (bench/*_table.py) and their pytest-benchmark files share.

Each table script measures one op for several providers (``triton``, ``torch``, ``compile``,
``reference``) and writes a table and a JSON file. This module holds the common parts: the
command line, the device choice (CUDA, or a ``--smoke`` check of the script on the CPU), timing
(triton.testing.do_bench on CUDA), peak memory, the time budget with its skipped cells, the
copy bandwidth, the speed-up targets and the JSON report.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

import torch

from peak_memory import peak_extra_bytes

COMPILE_HELP = "seconds of torch.compile compilation allowed"


def table_parser(description: str, dtypes, providers, default_dtypes: str, compile_budget_s: float,
                 compile_help: str = COMPILE_HELP, budget_s: float | None = None,
                 tf32: bool = False) -> argparse.ArgumentParser:
    """The command line: OUT.json, --dtypes, --providers, --compile-budget-s, --smoke; --budget-s
    when ``budget_s`` is given (its default) and --tf32 when ``tf32``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--dtypes", default=default_dtypes, help="comma list of " + ", ".join(dtypes))
    parser.add_argument("--providers", default=",".join(providers))
    if budget_s is not None:
        parser.add_argument("--budget-s", type=float, default=budget_s,
                            help="skip the remaining measurements once this many seconds have passed")
    parser.add_argument("--compile-budget-s", type=float, default=compile_budget_s, help=compile_help)
    if tf32:
        parser.add_argument("--tf32", action="store_true",
                            help="allow TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32), all providers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on this machine's device (CPU ok)")
    return parser


def choose_device(script: str, args: argparse.Namespace):
    """(device, providers, dtypes) from the command line, or None: without CUDA only --smoke runs.

    On the CPU torch.compile is left out (a CPU compile takes minutes) and only fp32 is
    measured (the Triton interpreter has no bf16).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = tuple(args.providers.split(","))
    dtypes = tuple(args.dtypes.split(","))
    if device == "cpu":
        if not args.smoke:
            print(f"{script}: needs a CUDA device (use --smoke for a CPU check of the script)")
            return None
        providers = tuple(p for p in providers if p != "compile")
        dtypes = ("fp32",)
    return device, providers, dtypes


def runner(call, inputs, grad_out=None):
    """A zero-argument callable for the timers: ``call()`` under no_grad when ``grad_out`` is None
    (mode fwd), else the gradients of ``inputs`` for ``grad_out`` (mode fwd+bwd)."""
    if grad_out is None:
        def run():
            with torch.no_grad():
                return call()
    else:
        def run():
            return torch.autograd.grad(call(), inputs, grad_out)
    return run


def first_call_s(run, device: str) -> float:
    """Seconds of one call of ``run``: the compile (torch.compile, Triton autotuning) and warm-up."""
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# Milliseconds of calls before each CUDA timing (was 5). A table's first row moved up to 3x
# between two H200 runs in every provider that follows a first call of seconds (compile,
# autotuning: "level1 train128 B8" fwd, triton 0.47 / 0.79 ms, torch 0.50 / 0.22 ms) while
# the next row (p1_cross fwd) agreed within 1 % in all four: low clocks after the idle GPU, or the CPU still busy after a
# compile, for calls of 0.2 ms whose launches are a large share. The graph-replayed column
# (graph_time_ms) is free of the second cause.
WARMUP_MS = 100


def time_ms(run, device: str) -> float:
    """Median milliseconds of a call: triton.testing.do_bench on CUDA (after WARMUP_MS of calls),
    3 calls on the CPU."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=WARMUP_MS, rep=25, return_mode="median")
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[1]


def graph_time_ms(run) -> float | None:
    """Median milliseconds of a call replayed from a CUDA graph (triton.testing.do_bench_cudagraph):
    the kernels' time without the CPU's launch gaps; None where the call cannot be captured."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(run, rep=25, return_mode="median")
    except Exception as error:  # noqa: BLE001 - a capture failure is reported, not fatal
        print(f"(CUDA-graph timing failed: {type(error).__name__}: {str(error)[:200]})")
        return None


def peak_mib(run, device: str) -> float | None:
    """MiB allocated at the peak of one call above what was allocated before it (CUDA only)."""
    return peak_extra_bytes(run, device) / 2**20 if device == "cuda" else None


def measured(run, device: str, rate_key: str, rate_per_ms: float) -> dict:
    """One table cell: first-call seconds, median ms, the rate (``rate_per_ms`` / ms, stored
    under ``rate_key``), the peak memory above the inputs and, on CUDA, the same call replayed
    from a CUDA graph ("graph_ms", "<rate_key>_graph"): the kernels' time without the CPU's
    launch cost, which bounds the eager time of small calls (the H200's do_bench medians of
    the fused ops were up to 4x their kernels' time) and differs between providers."""
    first_call = first_call_s(run, device)
    ms = time_ms(run, device)
    graph_ms = graph_time_ms(run) if device == "cuda" else None
    return {"ms": ms, rate_key: rate_per_ms / ms, "graph_ms": graph_ms,
            f"{rate_key}_graph": rate_per_ms / graph_ms if graph_ms else None,
            "peak_MiB": peak_mib(run, device), "first_call_s": first_call}


def speedup(results: dict, baselines, key: str = "ms") -> float | None:
    """triton's speed-up over the fastest of ``baselines`` by ``key`` ("ms" or "graph_ms"),
    None where triton or every baseline is unmeasured."""
    ours = (results.get("triton") or {}).get(key)
    times = [results[p][key] for p in baselines if results.get(p) and results[p].get(key)]
    return min(times) / ours if ours and times else None


def with_graph_targets(targets: dict) -> dict:
    """The speed-up targets, each also for the graph-replayed times ("<name>_graph")."""
    return {**targets, **{f"{name}_graph": target for name, target in targets.items()}}


def cell_text(result: dict | None, rate_key: str, unit: str, rate_width: int, width: int) -> str:
    """A cell of the printed table: time, rate and peak, or "skipped"."""
    if result is None:
        return f"{'skipped':>{width}}"
    peak = "" if result["peak_MiB"] is None else f"{result['peak_MiB']:7.0f}M"
    return f"{result['ms']:9.3f}ms{result[rate_key]:{rate_width}.0f}{unit}{peak:>8}"


def copy_bandwidth_gbs(device: str) -> float | None:
    """The card's device-to-device copy rate (y.copy_(x) of 1 GiB): bytes read plus written per second."""
    if device != "cuda":
        return None
    import triton.testing
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=10, rep=50, return_mode="median")
    return 2 * source.numel() / ms / 1e6


class Budget:
    """Skips measurements: all of them once ``seconds`` have passed since it was made, and the
    ``compile`` provider's once ``compile_seconds`` of its first calls (compilation) are spent."""

    def __init__(self, seconds: float = math.inf, compile_seconds: float = math.inf):
        self.started = time.perf_counter()
        self.seconds = seconds
        self.compile_left = compile_seconds

    def measure(self, providers, measure, skip=()) -> dict:
        """{provider: measure(provider)} in ``providers`` order; None for a skipped provider
        (over budget, or in ``skip``). ``measure`` returns a dict with "first_call_s"."""
        results = {}
        for provider in providers:
            over_budget = time.perf_counter() - self.started > self.seconds
            if over_budget or provider in skip or (provider == "compile" and self.compile_left <= 0):
                results[provider] = None
                continue
            results[provider] = measure(provider)
            if provider == "compile":
                self.compile_left -= results[provider]["first_call_s"]
                torch._dynamo.reset()  # one static compile per case; keep the cache small
        return results


def measure_rows(shapes, dtypes, modes, providers, budget: Budget, speedups, format_row, measure) -> list[dict]:
    """Every (dtype, shape, mode) row, printed by ``format_row(row, providers)`` as it completes.

    A row holds the shape's name and fields, the dtype's and mode's names, the results of
    ``measure(shape, dtype, mode, provider)`` per provider (None where skipped) and ``speedups(results)``.
    """
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            for mode in modes:
                results = budget.measure(providers, lambda provider: measure(shape, dtype, mode, provider))
                rows.append({"shape": shape.name, "dims": asdict(shape), "dtype": dtype, "mode": mode,
                             "results": results, "speedups": speedups(results)})
                print(format_row(rows[-1], providers), flush=True)
    return rows


def fwd_bwd_speedups(rows: list[dict], names) -> dict:
    """Per speed-up name (a key of each row's "speedups"): its minimum over the fwd+bwd rows,
    as "min_fwd_bwd_speedup_<name>", then the count of unmeasured ones (skipped cells)."""
    training = [row for row in rows if row["mode"] == "fwd+bwd"]
    out, unmeasured = {}, 0
    for name in names:
        values = [row["speedups"][name] for row in training]
        out[f"min_fwd_bwd_speedup_{name}"] = min((x for x in values if x), default=None)
        unmeasured += sum(x is None for x in values)
    out["unmeasured_fwd_bwd_comparisons"] = unmeasured
    return out


def print_speedup_targets(summary: dict, targets: dict) -> None:
    """Each measured minimum of :func:`fwd_bwd_speedups` against its target, then the unmeasured count."""
    for name, target in targets.items():
        key = f"min_fwd_bwd_speedup_{name}"
        if summary[key] is not None:
            print(f"{key}: {summary[key]:.2f}x (target >= {target}x)")
    if summary["unmeasured_fwd_bwd_comparisons"]:
        print(f"{summary['unmeasured_fwd_bwd_comparisons']} fwd+bwd comparisons unmeasured (skipped cells)")


def ratio_cell(value: float | None, target: float | None, width: int) -> str:
    """A speed-up in ``width`` characters: '2.31x+' meets the target, '1.20x!' misses it, no mark
    without a target, '-' when unmeasured."""
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:{width - 2}.2f}x" + (" " if target is None else ("+" if value >= target else "!"))


def attention_table_main(argv, *, doc: str, script: str, dtypes, providers, shapes, smoke_shapes,
                         budget_s: float, compile_budget_s: float, card_rate, run_table, summary,
                         extra_report=lambda args: {}) -> int:
    """main() of the attention tables: command line, device, the card's own rate (``card_rate``:
    matmul TFLOP/s or copy GB/s, measured first), the table, its ``summary(rows, rate)``, the report."""
    parser = table_parser(doc.split("\n")[0], dtypes, providers, default_dtypes="bf16,fp32",
                          budget_s=budget_s, compile_budget_s=compile_budget_s, tf32=True)
    parser.add_argument("--shapes", help="comma list of the shapes to measure (default: all): "
                        + ", ".join(shape.name for shape in shapes))
    args = parser.parse_args(argv)
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {shape.name for shape in shapes})
        if unknown:
            parser.error(f"unknown shapes {unknown}; choose from {[shape.name for shape in shapes]}")
        shapes = [shape for shape in shapes if shape.name in wanted]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    chosen = choose_device(script, args)
    if chosen is None:
        return 2
    device, providers, dtypes = chosen
    started = time.perf_counter()
    rate = card_rate(device)
    rows = run_table(smoke_shapes if args.smoke else shapes, dtypes, providers, device, args.budget_s,
                     args.compile_budget_s)
    report = {
        "rows": rows,
        "summary": summary(rows, rate),
        **environment(device),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        **extra_report(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_report(args.out, report, providers, started)
    return 0


def environment(device: str) -> dict:
    """The report's record of where it ran."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
    }


def write_report(path: str, report: dict, providers, started: float) -> None:
    """Adds the providers and the seconds since ``started`` to ``report``, and writes it as JSON."""
    report.update(providers=providers, elapsed_s=time.perf_counter() - started)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path} in {report['elapsed_s']:.0f} s")


def run_cases(cases, measure, show, out: str, device: str, budget_s: float, providers) -> list[dict]:
    """The sweeps' loop: ``measure(case)`` for each case (``case.name``) until ``budget_s`` have
    passed, ``show(result)`` after each, and the JSON report rewritten after every case, so that
    a run stopped by its time limit keeps what it measured."""
    started = time.perf_counter()
    results = []
    for case in cases:
        if time.perf_counter() - started > budget_s:
            print(f"{case.name}: skipped (--budget-s {budget_s:.0f} spent)")
            continue
        results.append(measure(case))
        show(results[-1])
        write_report(out, {"results": results, **environment(device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
                     providers, started)
    return results


# ---------------------------------------------------------------- the pytest-benchmark files

def synchronised(run, device: str):
    """``run`` followed, on CUDA, by a synchronise, so that a timer sees the kernels finish."""
    def run_synchronised():
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return result
    return run_synchronised


def benchmark_calls(benchmark, run_synchronised, device: str) -> None:
    """pytest-benchmark's calibrated rounds on CUDA; on the CPU 5 fixed rounds instead of its
    second of calibration per case."""
    if device == "cuda":
        benchmark(run_synchronised)
    else:
        benchmark.pedantic(run_synchronised, rounds=5, iterations=1)
