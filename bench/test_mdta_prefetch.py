"""bench/mdta_prefetch.py on the CPU (Triton interpreter, tiny shapes): both variants run, in
the interpreter (one tile length) with identical results, the plans restored afterwards, and
decide_defaults reads the report."""
import json

import decide_defaults
import mdta_prefetch


def test_smoke_run_compares_both_variants(tmp_path, capsys):
    out = tmp_path / "prefetch.json"
    before = mdta_prefetch.kernels._PREFETCH
    assert mdta_prefetch.main([str(out), "--smoke"]) == 0
    assert mdta_prefetch.kernels._PREFETCH == before
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert set(result["modes"]) == {"fwd", "fwd+bwd"}
    for row in result["modes"].values():
        assert row["prefetch"]["ms"] > 0 and row["plain"]["ms"] > 0 and row["speedup"] > 0
        assert row["max_rel_diff"] == 0.0
    assert "MDTA prefetch (kernels._PREFETCH)" in capsys.readouterr().out


def test_the_verdict_follows_the_geometric_mean():
    def report(*speedups):
        row = lambda s: {"speedup": s, "prefetch": {"ms": 1.0, "copy_share": 0.5}, "plain": {"ms": s}}  # noqa: E731
        return {"results": [{"case": {"name": "dec1 512x512", "dtype": "bf16"},
                             "modes": {"fwd": row(speedups[0]), "fwd+bwd": row(speedups[1])}}]}
    lines = decide_defaults.mdta_prefetch_verdict(report(1.5, 0.9))
    assert lines[0] == "MDTA dec1 512x512 bf16 fwd: prefetch 1.50x (1.000 vs 1.500 ms, 50% of copy bandwidth)"
    assert lines[-1] == "MDTA prefetch (kernels._PREFETCH): 1.162x in geometric mean, keep"
    assert "TURN OFF" in decide_defaults.mdta_prefetch_verdict(report(0.9, 0.95))[-1]
    assert decide_defaults.mdta_prefetch_verdict(None)[-1].startswith("MDTA prefetch: no measurement")
