"""The main job with a tiny budget: runs end to end through the command line, writes its files."""
import json

from PIL import Image

from sipl_fast.cli import main
from sipl_fast.data.datasets import SKIMAGE_HELD_OUT
from sipl_fast.data.degradations import TASK_SETS


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--iters", "2", "--eval-size", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for task in TASK_SETS["3task"]:
        assert task in printed
    assert "step 0 (plain)" in printed and "elapsed:" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2
    assert [t["task"] for t in results["tasks"]] == list(TASK_SETS["3task"])
    for scores in results["tasks"]:
        assert scores["images"] == len(SKIMAGE_HELD_OUT)
        assert len(scores["psnr"]) == len(scores["ssim"]) == 3       # plain pass, step 1, step 2
    for name in ("grid.png", "psnr_vs_step.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert (out / "checkpoint.safetensors").exists()


def test_demo_compare_smoke(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["demo", "--compare", "--iters", "2", "--eval-size", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "PromptIR" in printed and "SIPL step 0" in printed and "SIPL step 2" in printed
    for task in list(TASK_SETS["3task"]) + ["average"]:
        assert task in printed

    results = json.loads((out / "compare.json").read_text())
    assert results["steps"] == 2
    assert len(results["promptir"]["average"]["psnr"]) == 1          # the plain pass only
    assert len(results["sipl-promptir"]["average"]["psnr"]) == 3     # plain pass, step 1, step 2
    assert results["parameters"]["promptir"] < results["parameters"]["sipl-promptir"]
    with Image.open(out / "compare_grid.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
    for arch in ("promptir", "sipl-promptir"):
        assert (out / arch / "checkpoint.safetensors").exists()


def test_demo_compare_refuses_an_arch(tmp_path, capsys):
    assert main(["demo", "--compare", "--arch", "promptir", "--out", str(tmp_path / "c")]) == 1
    assert "leave --arch out" in capsys.readouterr().err
