"""bench/report.py: the card's slug, the tables built from pytest-benchmark results, and a run of
the command on a tiny subset of the suite (on the CPU in CI) writing <card>.md and <card>.csv."""
from __future__ import annotations

import csv

import report


def test_card_slugs():
    assert report.card_slug("NVIDIA H200") == "h200"
    assert report.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.card_slug("cpu") == "cpu"


def _result(table, impl, ms, peak, baseline="reference", case="c", dtype="bf16", mode="fwd"):
    return {"extra_info": dict(table=table, case=case, dtype=dtype, mode=mode, impl=impl, baseline=baseline,
                               ms=ms, peak_mib=peak)}


def test_rows_compare_each_case_with_its_baseline_and_triton_with_the_best_torch_formulation(tmp_path):
    results = [_result("proxy_attention", "triton", 1.0, 10.0), _result("proxy_attention", "reference", 3.0, 40.0),
               _result("proxy_attention", "torch", 2.0, 20.0), _result("proxy_attention", "compile", 1.5, None),
               _result("proxy_attention", "reference", 5.0, 8.0, mode="fwd+bwd"),
               _result("refine", "authors", 600.0, 2000.0, baseline="authors", case="512x512 base"),
               _result("refine", "graph", 200.0, 500.0, baseline="authors", case="512x512 base"),
               {"extra_info": {}}]  # not a suite result: left out
    rows = report.rows_from(results)
    assert [row["table"] for row in rows] == ["refine"] * 2 + ["proxy_attention"] * 5  # report order
    by = {(row["table"], row["impl"], row["mode"]): row for row in rows}
    triton = by["proxy_attention", "triton", "fwd"]
    assert triton["speedup_vs_baseline"] == 3.0 and triton["memory_vs_baseline"] == 0.25
    assert triton["speedup_vs_best_torch"] == 1.5  # compile's 1.5 ms is the faster formulation
    assert by["proxy_attention", "torch", "fwd"]["speedup_vs_best_torch"] is None
    assert by["proxy_attention", "compile", "fwd"]["memory_vs_baseline"] is None  # no peak measured
    assert by["proxy_attention", "reference", "fwd+bwd"]["speedup_vs_baseline"] == 1.0
    assert by["refine", "graph", "fwd"]["speedup_vs_baseline"] == 3.0

    header = {"card": "NVIDIA H200", "date": "2026-01-02", "commit": "abc1234", "command": "`python bench/report.py`"}
    text = report.markdown(rows, header)
    assert "| 512x512 base | bf16 | fwd | graph | 200.000 | 3.00x | - | 500.0 | 0.250x |" in text
    assert "| c | bf16 | fwd | triton | 1.000 | 3.00x | 1.50x | 10.0 | 0.250x |" in text
    assert text.index("## Refinement") < text.index("## Proxy attention")
    report.write_csv(tmp_path / "h200.csv", rows, header)
    with open(tmp_path / "h200.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 7 and written[0]["card"] == "NVIDIA H200" and written[0]["commit"] == "abc1234"


def test_the_command_runs_a_subset_and_writes_the_cards_files(tmp_path):
    status = report.main(["--out", str(tmp_path), "--budget-s", "120",
                          "--only", "layer_norm2d and dec1_train128_B8_smoke and fp32 and reference"])
    assert status == 0
    slug = report.card_slug(report.device_name())
    text = (tmp_path / f"{slug}.md").read_text()
    for field in ("- card: ", "- date: ", "- commit: ", "- command: `python bench/report.py", "- suite: ",
                  "- cases: 2 passed", "## LayerNorm2d", "| dec1 train128 B8 smoke | fp32 | fwd+bwd | reference |"):
        assert field in text, field
    with open(tmp_path / f"{slug}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(row["mode"], row["impl"]) for row in rows} == {("fwd", "reference"), ("fwd+bwd", "reference")}
    assert all(float(row["ms"]) > 0 and row["speedup_vs_baseline"] == "1.0" for row in rows)
