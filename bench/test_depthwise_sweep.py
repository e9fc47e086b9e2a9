"""bench/depthwise_sweep.py on the CPU (Triton interpreter, tiny shapes): every candidate
configuration of the row-streaming forward and gate equals the planned one bit for bit, and the
report names the fastest."""
import json

import decide_defaults
import depthwise_sweep


def test_smoke_sweep_is_exact_and_reported(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert depthwise_sweep.main([str(out), "--smoke"]) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == len(depthwise_sweep.SMOKE_CASES)
    for result in report["results"]:
        assert all(row["exact"] and row["ms"] > 0 for row in result["configs"]), result
        assert sum(row["planned"] for row in result["configs"]) == 1
        assert result["best"] in [row["tile"] for row in result["configs"]]
        named = sorted(tuple(args) for row in result["configs"] for args in row["candidates"])
        assert named == sorted(depthwise_sweep.SMOKE_CANDIDATES)  # each candidate names its tile once
    assert decide_defaults.depthwise_config_verdict(report)[-1].startswith("depthwise configs: ")
    assert "planned" in capsys.readouterr().out


def test_cases_past_the_budget_are_skipped(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert depthwise_sweep.main([str(out), "--smoke", "--budget-s", "0"]) == 0
    assert "skipped" in capsys.readouterr().out and not out.exists()
