"""dev/precision_quality.py: the fp32-vs-bf16 PSNR table on a small random checkpoint."""
import json

import torch

import precision_quality
from sipl_fast import SIPLPromptIR
from sipl_fast.checkpoint import save_weights


def test_table_of_both_precisions(tmp_path, capsys):
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny")
    save_weights(tmp_path / "model.safetensors", model.state_dict(), model.config)
    assert precision_quality.main(["--checkpoint", str(tmp_path / "model.safetensors"), "--tasks", "noise25",
                                   "--size", "32", "--steps", "1", "--json", str(tmp_path / "table.json")]) == 0
    printed = capsys.readouterr().out
    assert "| noise25 | 1 |" in printed and "mean change over tasks and steps" in printed
    table = json.loads((tmp_path / "table.json").read_text())
    scores = table["psnr"]["noise25"]
    assert len(scores["fp32"]) == len(scores["bf16"]) == 2
    assert abs(table["mean_change_db"]) < 0.5   # bf16 rounding, not a different computation
