"""Run the benchmark suite on this device and write its report: bench/results/<card>.md and .csv.

    python bench/report.py                       # the whole suite, within 7 minutes (--budget-s 420)
    python bench/report.py --quick               # no torch.compile cases, no float32 op cases, 3 minutes
    python bench/report.py --gpu-tests           # first `pytest -m gpu tests`, its result in the report
    python bench/report.py --only "refine or train_step" --out /tmp/results   # a pytest -k subset
    python bench/report.py --only test_refine_cpu --run-slow --budget-s 7200  # CPU: the full model, interleaved

<card> is a slug of torch.cuda.get_device_name() ("nvidia-h200" -> "h200"), or "cpu". The
suite is bench/test_end_to_end.py then bench/test_op_benchmarks.py under ``--benchmark-only`` (the
torch.compile cases last); cases that would start after the time budget are skipped and
counted as not measured. The report has one table per benchmark: each implementation's time,
its speed-up over the authors' code path (the reference backend; for the refinement the
authors' loop on it), and its peak memory against that path's, with the card, date, commit
and command; the card's previous .md and .csv are overwritten.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ("bench/test_end_to_end.py", "bench/test_op_benchmarks.py")
TABLES = {  # in report order: benchmark -> title
    "refine": "Refinement, steps=2, the full model (baseline: the authors' loop on the reference backend)",
    "train_step": "Training step (baseline: the reference backend)",
    "proxy_attention": "Proxy attention (Proxy Fusion cross-attention)",
    "transposed_attention": "MDTA (transposed attention)",
    "layer_norm2d": "LayerNorm2d",
    "gated_gelu": "Feed-forward gates (GDFN, DualGate)",
    "pointwise_depthwise": "1x1 + depthwise 3x3 projection",
    "pointwise_depthwise_gate": "1x1 + depthwise 3x3 projection + gate (inference)",
}
TORCH_FORMULATIONS = ("torch", "compile")
CSV_FIELDS = ("table", "case", "dtype", "mode", "impl", "baseline", "ms", "speedup_vs_baseline",
              "speedup_vs_best_torch", "peak_mib", "memory_vs_baseline", "card", "date", "commit",
              "speedup_vs_fp32", "memory_vs_fp32", "calls_ms", "load")


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', 'cpu' -> 'cpu'."""
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").split("-")
    return "-".join(word for word in words if word not in ("nvidia", "geforce", "tesla")) or "cpu"


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def git_commit() -> str:
    """The short commit of the working tree, marked where it has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_streaming(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Runs ``command`` from the repository root, echoing its output; (exit status, output).
    A command still running after ``timeout_s`` is stopped (status 124)."""
    print("$ " + shlex.join(command), flush=True)
    lines = []
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
        if time.monotonic() > deadline:
            process.kill()
            break
    process.wait()
    status = 124 if time.monotonic() > deadline else process.returncode
    return status, "".join(lines)


def summary_line(output: str) -> str:
    """pytest's last '... passed ... in ...s' line, without its decoration."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?)\s*=*$", output, re.MULTILINE)
    return found[-1] if found else "no pytest summary (stopped or failed to start)"


def _results(benchmarks: list[dict]) -> list[dict]:
    """The suite's results: one per pytest-benchmark result, or its extra_info["rows"] where one
    case measured several implementations (bench/test_end_to_end.py's interleaved CPU refinement)."""
    rows = []
    for b in benchmarks:
        info = b.get("extra_info", {})
        rows += [dict(row) for row in info["rows"]] if "rows" in info else [dict(info)] if "table" in info else []
    return rows


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def rows_from(benchmarks: list[dict]) -> list[dict]:
    """One row per result, with its speed-up and memory ratio against the baseline
    implementation of its case (in the dtype ``baseline_dtype`` where a result names one, else
    its own), a 16-bit row's against the same implementation in fp32, and, for triton, its
    speed-up over the fastest torch formulation."""
    rows = _results(benchmarks)
    by_case: dict = {}
    for row in rows:
        by_case.setdefault((row["table"], row["case"], row["dtype"], row["mode"]), {})[row["impl"]] = row
    for row in rows:
        case = by_case[(row["table"], row["case"], row["dtype"], row["mode"])]
        base = by_case.get((row["table"], row["case"], row.get("baseline_dtype", row["dtype"]), row["mode"]),
                           {}).get(row["baseline"])
        row["speedup_vs_baseline"] = _ratio(base["ms"], row.get("ms")) if base else None
        row["memory_vs_baseline"] = _ratio(row.get("peak_mib"), base.get("peak_mib")) if base else None
        fp32 = by_case.get((row["table"], row["case"], "fp32", row["mode"]), {}).get(row["impl"])
        fp32 = fp32 if fp32 is not row else None
        row["speedup_vs_fp32"] = _ratio(fp32["ms"], row.get("ms")) if fp32 else None
        row["memory_vs_fp32"] = _ratio(row.get("peak_mib"), fp32.get("peak_mib")) if fp32 else None
        torch_times = [case[impl]["ms"] for impl in TORCH_FORMULATIONS if impl in case]
        row["speedup_vs_best_torch"] = (min(torch_times) / row["ms"]
                                        if row["impl"] == "triton" and torch_times else None)
    order = {table: i for i, table in enumerate(TABLES)}
    return sorted(rows, key=lambda r: order.get(r["table"], len(order)))


def _number(value, form: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{form}}{suffix}"


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# Benchmarks on {header['card']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "Speed-up and memory are against the baseline implementation of the same case, "
              "measured in the same run (the authors' code path: the reference backend; for 16-bit "
              "refinement rows the authors' float32 loop). "
              "\"vs best torch\": triton's speed-up over the faster of the torch formulation and its "
              "torch.compile. Peak memory: MiB above the inputs and weights (see bench/measure.py); "
              "'-' where not measured."]
    for table, title in TABLES.items():
        table_rows = [row for row in rows if row["table"] == table]
        if not table_rows:
            continue
        baseline = table_rows[0]["baseline"]
        lines += ["", f"## {title}", "",
                  f"| case | dtype | mode | impl | ms | speed-up vs {baseline} | vs best torch | peak MiB | "
                  f"memory vs {baseline} |", "|---|---|---|---|---|---|---|---|---|"]
        for row in table_rows:
            lines.append(f"| {row['case']} | {row['dtype']} | {row['mode']} | {row['impl']} | "
                         f"{_number(row.get('ms'), '.3f')} | {_number(row['speedup_vs_baseline'], '.2f', 'x')} | "
                         f"{_number(row['speedup_vs_best_torch'], '.2f', 'x')} | "
                         f"{_number(row.get('peak_mib'), '.1f')} | {_number(row['memory_vs_baseline'], '.3f', 'x')} |")
        lines += _against_fp32(table_rows)
    return "\n".join(lines) + "\n"


def _against_fp32(table_rows: list[dict]) -> list[str]:
    """A table's 16-bit rows against the same implementation in fp32 (none where it has none);
    with each round's time where a row has them."""
    rows = [row for row in table_rows if row.get("speedup_vs_fp32") is not None]
    if not rows:
        return []
    lines = ["", "16-bit rows against the same implementation in fp32 (same run):", "",
             "| case | dtype | mode | impl | ms | speed-up vs fp32 | peak MiB | memory vs fp32 | each round, ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rounds = ", ".join(f"{ms:.0f}" for ms in row["calls_ms"]) if row.get("calls_ms") else "-"
        lines.append(f"| {row['case']} | {row['dtype']} | {row['mode']} | {row['impl']} | "
                     f"{_number(row.get('ms'), '.3f')} | {_number(row['speedup_vs_fp32'], '.2f', 'x')} | "
                     f"{_number(row.get('peak_mib'), '.1f')} | {_number(row['memory_vs_fp32'], '.3f', 'x')} | "
                     f"{rounds} |")
    return lines


def write_csv(path: Path, rows: list[dict], header: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "calls_ms": " ".join(map(str, row.get("calls_ms") or ())) or None,
                             "card": header["card"], "date": header["date"], "commit": header["commit"]})


def _loads(loads: tuple[float, float, float]) -> str:
    return "/".join(f"{load:.2f}" for load in loads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of <card>.md and <card>.csv")
    parser.add_argument("--quick", action="store_true",
                        help="leave out the torch.compile cases and the float32 op cases; 180 s budget")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole command (default 420, --quick 180); later cases are skipped")
    parser.add_argument("--gpu-tests", action="store_true", help="run `pytest -m gpu tests` first (CUDA)")
    parser.add_argument("--only", default=None, help="a pytest -k expression selecting the cases")
    parser.add_argument("--keep-json", default=None, help="also keep pytest-benchmark's JSON at this path")
    parser.add_argument("--run-slow", action="store_true",
                        help="also run the cases marked slow (on the CPU: the full model's refinement)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    budget_s = args.budget_s or (180.0 if args.quick else 420.0)
    python = sys.executable
    card = device_name()
    header = {"card": card, "date": date.today().isoformat(), "commit": git_commit(),
              "command": "`python bench/report.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:])) + "`"}
    load_at_start = os.getloadavg()

    if args.gpu_tests:
        import importlib.util
        workers = ["-n", str(min(15, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
        _, output = run_streaming([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *workers,
                                   "tests"], timeout_s=min(240.0, budget_s / 2))
        header["GPU tests"] = f"`pytest -m gpu tests`: {summary_line(output)}"

    selection = [f"({args.only})"] if args.only else []
    if args.quick:
        selection.append("not compile and not (test_op and fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(args.keep_json or Path(tmp) / "benchmarks.json")
        left = budget_s - (time.monotonic() - started)
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE, "--benchmark-only",
                   f"--benchmark-json={json_path}", f"--bench-deadline-s={max(left - 45, 1):.0f}",
                   *(["--run-slow"] if args.run_slow else []),
                   *(["-k", " and ".join(selection)] if selection else [])]
        status, output = run_streaming(command, timeout_s=left + 120)
        header["suite"] = "`" + shlex.join(["python", *command[1:]]).replace(str(json_path), "OUT.json") + "`"
        header["cases"] = summary_line(output)
        header["load"] = (f"1/5/15-minute load average {_loads(load_at_start)} at the start, "
                          f"{_loads(os.getloadavg())} at the end, on {os.cpu_count()} CPUs")
        if not json_path.exists():
            print(f"report: the suite wrote no results (exit status {status})", file=sys.stderr)
            return 1
        report = json.loads(json_path.read_text())
    import torch
    import triton
    header["software"] = (f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"
                          + (f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else
                             f", {torch.get_num_threads()} CPU threads"))
    rows = rows_from(report["benchmarks"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card_slug(card)
    (out / f"{slug}.md").write_text(markdown(rows, header))
    write_csv(out / f"{slug}.csv", rows, header)
    print(f"report: wrote {out / slug}.md and .csv ({len(rows)} results) in {time.monotonic() - started:.0f} s")
    return 0 if status in (0, 5) else status


if __name__ == "__main__":
    sys.exit(main())
