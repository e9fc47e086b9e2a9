"""bench/mdta_prefetch.py on the CPU (Triton interpreter, tiny shapes): the three depths run,
in the interpreter (one tile length) with identical results, the plans restored afterwards,
and decide_defaults reads the report."""
import json

import decide_defaults
import mdta_prefetch


def test_smoke_run_compares_the_three_depths(tmp_path, capsys):
    out = tmp_path / "prefetch.json"
    before = mdta_prefetch.kernels._PREFETCH
    assert mdta_prefetch.main([str(out), "--smoke"]) == 0
    assert mdta_prefetch.kernels._PREFETCH == before
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert set(result["modes"]) == {"fwd", "fwd+bwd"}
    for row in result["modes"].values():
        assert set(row) == {"plain", "prefetch", "prefetch2"}
        for cell in row.values():
            assert cell["ms"] > 0 and cell["max_rel_diff"] == 0.0
    assert "MDTA prefetch depth: prefetch " in capsys.readouterr().out


def _report(prefetch, prefetch2):
    """A sweep of one case whose fwd and fwd+bwd rows ran the depths at these speed-ups on
    plain's 1 ms (prefetch2 None: a report from before depth 2)."""
    def row(one, two):
        cells = {"plain": {"ms": 1.0, "copy_share": 0.3}, "prefetch": {"ms": 1.0 / one, "copy_share": 0.5}}
        if two is not None:
            cells["prefetch2"] = {"ms": 1.0 / two, "copy_share": None}
        return cells
    return {"results": [{"case": {"name": "dec1 512x512", "dtype": "bf16"},
                         "modes": {"fwd": row(prefetch[0], prefetch2[0]), "fwd+bwd": row(prefetch[1], prefetch2[1])}}]}


def test_the_verdict_picks_the_depth_fastest_in_geometric_mean():
    lines = decide_defaults.mdta_prefetch_verdict(_report((2.0, 1.0), (4.0, 0.5)))
    assert lines[0] == ("MDTA dec1 512x512 bf16 fwd: prefetch 2.00x (0.500 ms, 50% of copy bandwidth), "
                        "prefetch2 4.00x (0.250 ms) vs plain 1.000 ms"), lines
    assert lines[-1].startswith("MDTA prefetch depth: prefetch 1.414x, prefetch2 1.414x the plain streams in "
                                "geometric mean; fastest "), lines
    assert lines[-1].endswith("keep") and mdta_prefetch.kernels.PREFETCH_DEFAULT == 1  # a tie keeps the default
    assert decide_defaults.mdta_prefetch_verdict(_report((1.1, 1.1), (1.11, 1.11)))[-1].endswith(
        "fastest prefetch2 (depth 2): keep")  # within 2 %
    deeper = decide_defaults.mdta_prefetch_verdict(_report((1.1, 1.1), (1.5, 1.4)))[-1]
    assert deeper.endswith("fastest prefetch2 (depth 2): SET kernels.PREFETCH_DEFAULT (SIPL_FAST_MDTA_PREFETCH) to 2")
    plain = decide_defaults.mdta_prefetch_verdict(_report((0.9, 0.95), (0.8, 0.9)))[-1]
    assert plain.endswith("fastest plain (depth 0): SET kernels.PREFETCH_DEFAULT (SIPL_FAST_MDTA_PREFETCH) to 0")


def test_a_report_without_depth_2_compares_depths_0_and_1():
    lines = decide_defaults.mdta_prefetch_verdict(_report((1.5, 0.9), (None, None)))
    assert lines[-1] == ("MDTA prefetch depth: prefetch 1.162x the plain streams in geometric mean; fastest "
                         "prefetch (depth 1): keep"), lines
    assert decide_defaults.mdta_prefetch_verdict(None)[-1].startswith("MDTA prefetch: no measurement")
