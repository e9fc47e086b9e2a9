"""decide_defaults.py on synthetic gpu_check output: the verdicts follow the numbers."""
from __future__ import annotations

import json

import decide_defaults


def _refine(graph_ms: float, budgets: dict) -> dict:
    rows = [dict(size="512x512", provider="reference", seconds=0.8, peak_extra_mib=2400.0),
            dict(size="512x512", provider="sipl_fast", seconds=0.9, peak_extra_mib=560.0),
            dict(size="512x512", provider="sipl_fast+dwk", seconds=0.85, peak_extra_mib=540.0),
            dict(size="512x512", provider="sipl_fast+graph+aten", seconds=0.5, peak_extra_mib=500.0),
            dict(size="512x512", provider="sipl_fast+graph", seconds=graph_ms / 1e3, peak_extra_mib=520.0),
            dict(size="1280x720", provider="sipl_fast", seconds=2.0, peak_extra_mib=1200.0)]
    rows += [dict(size="512x512", provider=f"sipl_fast+graph+s{mib}", seconds=s, peak_extra_mib=m)
             for mib, (s, m) in budgets.items()]
    return {"rows": rows}


def _pixel_ops(triton_ms: float, torch_ms: float) -> dict:
    return {"totals": [{"scenario": "infer512", "dtype": "fp32", "mode": "fwd",
                        "ms_per_pass": {"triton": triton_ms, "torch": torch_ms, "reference": 9.0}}]}


def test_graph_kernels_are_kept_where_the_replay_wins():
    lines = decide_defaults.graph_kernels_verdict(_refine(400, {}))
    assert "graph kernels 1.25x (400.0 vs 500.0 ms)" in lines[0] and lines[-1].endswith("keep"), lines
    assert decide_defaults.graph_kernels_verdict(_refine(600, {}))[-1].endswith("DROP")
    assert decide_defaults.graph_kernels_verdict(None)[-1].startswith("graph kernels: no measurement")


def test_tf32_mixes_are_kept_where_the_replay_wins():
    refine = _refine(400, {})
    refine["rows"].append(dict(size="512x512", provider="sipl_fast+graph+fp32mix", seconds=0.44, peak_extra_mib=520.0))
    lines = decide_defaults.mix_precision_verdict(refine)
    assert "TF32 mixes 1.10x (400.0 vs 440.0 ms)" in lines[0] and "keep" in lines[-1], lines
    refine["rows"][-1]["seconds"] = 0.39
    assert "DROP" in decide_defaults.mix_precision_verdict(refine)[-1]
    assert decide_defaults.mix_precision_verdict(_refine(400, {}))[-1].startswith("mix precision: no measurement")


def test_eager_depthwise_kernels_need_every_measurement_to_win():
    refine = _refine(400, {})
    lines = decide_defaults.eager_depthwise_verdict(refine, _pixel_ops(2.0, 5.0))
    assert "1.06x (850.0 vs 900.0 ms)" in lines[0] and "2.50x" in lines[1], lines
    assert lines[-1].startswith("depthwise kernels in eager no-grad calls: SWITCH ON"), lines
    refine["rows"][2]["seconds"] = 0.95  # the kernels' eager refinement slower than ATen's
    assert decide_defaults.eager_depthwise_verdict(refine, _pixel_ops(2.0, 5.0))[-1].startswith(
        "depthwise kernels in eager no-grad calls: keep ATen's")
    refine["rows"][2]["seconds"] = 0.85
    assert decide_defaults.eager_depthwise_verdict(refine, _pixel_ops(6.0, 5.0))[-1].startswith(
        "depthwise kernels in eager no-grad calls: keep ATen's")
    assert decide_defaults.eager_depthwise_verdict(None, None)[-1].endswith("no measurement, keep ATen's")


def test_the_fastest_budget_within_the_memory_target_wins():
    # 512 MiB strips are fastest but over 0.25x the reference's 2400 MiB; 96 beats the default.
    refine = _refine(400, {48: (0.45, 420.0), 96: (0.38, 480.0), 512: (0.30, 900.0)})
    lines = decide_defaults.strip_verdict(refine)
    assert lines[-1].startswith("strip budget: 96 MiB is the fastest"), lines
    assert any(line.startswith("strips of 512 MiB: 2.67x") for line in lines)
    assert (f"eager default ({decide_defaults.DEFAULT_STRIP_MIB} MiB strips): 0.89x the reference loop, "
            "0.233x its peak memory") in lines


def test_main_reads_the_directory(tmp_path, capsys):
    (tmp_path / "refine.json").write_text(json.dumps(_refine(450, {96: (0.5, 480.0)})))
    assert decide_defaults.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pixel_ops.json: missing" in out and f"strip budget: {decide_defaults.DEFAULT_STRIP_MIB} MiB is the fastest" in out
    assert "graph kernels (ops.graph_kernels): keep" in out


def _sweep(*speeds_of_36_rows, exact=True):
    """A sweep of shapes where the candidate of 36 rows runs at the given speeds relative to the
    plan, and the candidate of 8 warps (a tile of its own only at the first shape) at 1.3x there."""
    results = []
    for index, speed in enumerate(speeds_of_36_rows):
        configs = [{"tile": [1, 18, 512, 4], "candidates": [[512, 18, 4]], "planned": True, "exact": exact, "ms": 1.0},
                   {"tile": [1, 36, 512, 4], "candidates": [[512, 36, 4]], "planned": False, "exact": True,
                    "ms": 1.0 / speed}]
        if index == 0:
            configs.append({"tile": [1, 18, 512, 8], "candidates": [[512, 18, 8]], "planned": False, "exact": True,
                            "ms": 1.0 / 1.3})
        best = max(speed, 1.3 if index == 0 else 1.0)
        results.append({"case": {"name": f"shape {index}"}, "configs": configs, "best": [1, 36, 512, 4],
                        "planned_vs_best": best, "best_vs_aten": 2.0})
    return {"results": results}


def test_depthwise_configs_are_retuned_only_for_a_candidate_faster_across_the_shapes():
    lines = decide_defaults.depthwise_config_verdict(_sweep(1.2, 1.1, 1.08))
    assert "shape 0: best [1, 36, 512, 4] 1.30x the planned config" in lines[0], lines
    assert lines[-1] == ("depthwise configs: retune stream_config to widest=512, rows=36, warps=4: "
                         "1.125x the plan over the shapes (geometric mean)"), lines
    # A shape won by 10 % and another lost by 8 % (the H200 sweep of 2026-11-27): keep the plan;
    # the candidate of 8 warps, timed at one shape only, does not count.
    kept = decide_defaults.depthwise_config_verdict(_sweep(1.10, 1 / 1.08, 1.0))
    assert kept[-1].startswith("depthwise configs: keep stream_config (best candidate widest=512, rows=36"), kept
    assert any("NOT EXACT" in line for line in decide_defaults.depthwise_config_verdict(_sweep(1.0, exact=False)))
    assert decide_defaults.depthwise_config_verdict(None)[-1].startswith("depthwise configs: no measurement")
    assert decide_defaults.depthwise_config_verdict({"results": []})[-1].endswith("(no candidate timed at every shape)")


def test_gram_pieces_are_kept_where_the_replay_wins():
    refine = _refine(400, {})
    refine["rows"].append(dict(size="512x512", provider="sipl_fast+graph+gram4096", seconds=0.42, peak_extra_mib=520.0))
    lines = decide_defaults.gram_piece_verdict(refine)
    assert "Gram pieces 1.05x (400.0 vs 420.0 ms)" in lines[0] and lines[-1].endswith("keep"), lines
    refine["rows"][-1]["seconds"] = 0.38
    assert decide_defaults.gram_piece_verdict(refine)[-1].endswith("back to 4096")
    assert decide_defaults.gram_piece_verdict(None)[-1].startswith("Gram pieces: no measurement")


def test_mdta_route_follows_the_kernels_speed_against_the_torch_formulation():
    def table(bf16_speedups, fp32_speedups):
        rows = [{"dtype": dtype, "mode": "fwd+bwd", "speedups": {"vs_torch": eager, "vs_torch_graph": replayed}}
                for dtype, pairs in (("bf16", bf16_speedups), ("fp32", fp32_speedups)) for eager, replayed in pairs]
        rows.append({"dtype": "fp32", "mode": "fwd", "speedups": {"vs_torch": None}})  # a skipped cell
        return {"rows": rows}

    lines = decide_defaults.mdta_route_verdict(table([(2.0, 2.0)], [(1.0, 0.25), (1.0, 1.0)]))
    assert lines[0] == ("MDTA bf16: kernels 2.00x the torch formulation (2 timings, geometric mean); the triton "
                        "backend runs the kernels: keep (ops._TORCH_FORMULATION_ON_CUDA)"), lines
    assert lines[1].startswith("MDTA fp32: kernels 0.71x the torch formulation (4 timings") and \
        lines[1].endswith("runs the kernels: CHANGE (ops._TORCH_FORMULATION_ON_CUDA)"), lines
    assert decide_defaults.mdta_route_verdict(None) == [
        "MDTA route: no measurement, keep ops._TORCH_FORMULATION_ON_CUDA"]


def test_launch_cache_is_turned_on_only_for_a_clear_host_time_gain():
    def overhead(with_cache, without):
        return {"ops": [{"op": "MDTA", "route": "eager", "us": without},
                        {"op": "MDTA", "route": "eager+cache", "us": with_cache},
                        {"op": "proxy attention", "route": "eager", "us": 1.0}]}

    assert decide_defaults.launch_cache_verdict(overhead(800.0, 1000.0)) == [
        "MDTA eager fwd+bwd host time: 800 us with the launch cache, 1000 us without (1.25x): "
        "TURN ON (kernels/launch_cache.py's default)"]
    assert decide_defaults.launch_cache_verdict(overhead(980.0, 1000.0))[-1].endswith("keep it off")
    assert decide_defaults.launch_cache_verdict(None)[-1].startswith("launch cache: no measurement")
