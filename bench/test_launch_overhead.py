"""bench/launch_overhead.py on the CPU (--smoke): both routes of both attention ops run with
their launches stubbed and land in the JSON (timings are reported, never asserted)."""
from __future__ import annotations

import json

import launch_overhead


def test_smoke_times_both_routes_of_both_ops(tmp_path):
    out = tmp_path / "launch_overhead.json"
    assert launch_overhead.main([str(out), "--smoke", "--calls", "3"]) == 0
    report = json.loads(out.read_text())
    assert {(row["op"], row["route"]) for row in report["ops"]} == {
        (op, route) for op in ("MDTA", "proxy attention") for route in ("eager", "custom op")}
    assert all(row["us"] > 0 for row in report["ops"]) and "launches" not in report


def test_routes_reach_the_custom_op_only_when_asked(monkeypatch):
    """The "custom op" route runs the torch.library op, the "eager" route does not."""
    module, call = launch_overhead.op_cases("cpu", __import__("torch").float32)["MDTA"]
    calls = []
    original = module.transposed_attention_fwd
    monkeypatch.setattr(module, "transposed_attention_fwd", lambda *a: calls.append(1) or original(*a))
    for name, expected in (("eager", 0), ("custom op", 1)):
        with launch_overhead.route(module, name):
            call()
        assert len(calls) == expected, name
