"""Launch configurations of the row-streaming depthwise forward (and its fused gate) at the
shapes that carry a 512x512 refinement's depthwise traffic: which strip width, rows per
program and warps are fastest, against the planned one (kernels/depthwise3x3.stream_config)
and ATen's depthwise convolution (+ gate). One table and a JSON file.

    python bench/depthwise_sweep.py OUT.json            # CUDA
    python bench/depthwise_sweep.py OUT.json --smoke    # CPU, Triton interpreter, tiny shapes

Every configuration computes each output with the same operations in the same order, so its
output must equal the planned configuration's bit for bit; a configuration that differs is
reported as wrong and not timed. Times: median ms (triton.testing.do_bench after the
harness's warm-up), and GB/s of the bytes the op must move (x read once, out written once).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # the kernels run on CPU only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from sipl_fast.kernels import depthwise3x3 as dw  # noqa: E402
from sipl_fast.kernels.depthwise3x3_gate import depthwise3x3_gate  # noqa: E402
from sipl_fast.ops import reference  # noqa: E402

import table_harness as harness  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    gate: bool  # the GDFN gate on 2h channels, else the plain convolution
    shape: tuple[int, int, int, int]  # x: (B, C, H, W); the gate's output has C / 2 channels
    dtype: str = "fp32"


# From a 512x512 refinement with the default strips (bench/estimate_memory.py's op shapes):
# the GDFN's depthwise + gate at full resolution (192 calls) and at 1/4, the qkv projection's
# depthwise at 1/2 and at full resolution; and one batch-8 training shape in bf16.
CASES = (
    Case("dec1 gdfn strip", True, (1, 510, 73, 512)),
    Case("enc3 gdfn", True, (1, 1020, 128, 128)),
    Case("enc2 qkv", False, (1, 288, 256, 256)),
    Case("dec1 q/k strip", False, (1, 96, 257, 512)),
    Case("train enc1 qkv", False, (8, 144, 128, 128), "bf16"),
)
SMOKE_CASES = (Case("smoke gate", True, (1, 6, 13, 40)), Case("smoke conv", False, (2, 3, 9, 21)))
# (widest strip, rows, warps): stream_config's arguments; BLOCK_C fills a row step where maps
# are narrower than the strip.
CANDIDATES = ((512, 18, 4), (512, 18, 8), (512, 9, 4), (512, 36, 4), (256, 18, 4), (256, 36, 4),
              (256, 18, 2), (128, 18, 2))
SMOKE_CANDIDATES = ((32, 8, 1), (16, 4, 1), (64, 3, 1))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(case: Case, device: str):
    torch.manual_seed(0)
    channels = case.shape[1]
    x = torch.randn(case.shape, device=device, dtype=DTYPES[case.dtype])
    weight = torch.randn(channels, 1, 3, 3, device=device) * 0.3
    bias = torch.randn(channels, device=device)
    return x, weight, bias


def kernel_call(case: Case, x, weight, bias, tile):
    if case.gate:
        return lambda: depthwise3x3_gate(x, weight, bias, False, tile=tile)
    return lambda: dw.depthwise3x3(x, weight, bias, tile=tile)


def aten_call(case: Case, x, weight, bias):
    channels = case.shape[1]
    w, b = weight.to(x.dtype), bias.to(x.dtype)
    if case.gate:
        return lambda: reference.gated_gelu(F.conv2d(x, w, b, padding=1, groups=channels), False)
    return lambda: F.conv2d(x, w, b, padding=1, groups=channels)


def sweep(case: Case, candidates, device: str) -> dict:
    x, weight, bias = make_inputs(case, device)
    out_channels = case.shape[1] // 2 if case.gate else case.shape[1]
    moved = x.numel() * x.element_size() + x.numel() // case.shape[1] * out_channels * x.element_size()
    planned = dw.stream_config(*case.shape[-2:])
    expected = kernel_call(case, x, weight, bias, planned)()
    configs = []
    # Several candidates may give one tile (maps narrower than the strip); each row names its
    # candidates, so that decide_defaults can compare one candidate across the shapes.
    tiles: dict[tuple, list] = {planned: []}
    for args in candidates:
        tiles.setdefault(dw.stream_config(*case.shape[-2:], *args), []).append(list(args))
    for tile, names in tiles.items():
        run = kernel_call(case, x, weight, bias, tile)
        exact = torch.equal(run(), expected)
        ms = harness.time_ms(run, device) if exact else None
        configs.append({"tile": list(tile), "candidates": names, "planned": tile == planned, "exact": exact,
                        "ms": ms, "GBs": moved / ms / 1e6 if ms else None})
    aten_ms = harness.time_ms(aten_call(case, x, weight, bias), device)
    timed = [row for row in configs if row["ms"]]
    best = min(timed, key=lambda row: row["ms"]) if timed else None
    planned_ms = configs[0]["ms"]
    return {"case": asdict(case), "bytes": moved, "configs": configs, "aten_ms": aten_ms,
            "best": best["tile"] if best else None,
            "planned_vs_best": planned_ms / best["ms"] if best and planned_ms else None,
            "best_vs_aten": aten_ms / best["ms"] if best else None}


def print_case(result: dict) -> None:
    case = result["case"]
    print(f"{case['name']} {tuple(case['shape'])} {case['dtype']}{' gate' if case['gate'] else ''}: "
          f"ATen {result['aten_ms']:.3f} ms")
    for row in result["configs"]:
        tile = "x".join(map(str, row["tile"][:3])) + f" {row['tile'][3]}w"
        timing = f"{row['ms']:8.3f} ms {row['GBs']:7.0f} GB/s" if row["ms"] else "  WRONG (differs from the planned)"
        print(f"  {tile:16} {timing}{'  planned' if row['planned'] else ''}")
    if result["best"]:
        print(f"  best {result['best']}: {result['planned_vs_best']:.2f}x the planned config's speed, "
              f"{result['best_vs_aten']:.2f}x ATen's")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    parser.add_argument("--budget-s", type=float, default=50.0,
                        help="start no new case after this many seconds (each compile takes about a second)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("depthwise_sweep.py: needs a CUDA device (use --smoke for a CPU check of the script)")
        return 2
    cases, candidates = (SMOKE_CASES, SMOKE_CANDIDATES) if args.smoke else (CASES, CANDIDATES)
    harness.run_cases(cases, lambda case: sweep(case, candidates, device), print_case, args.out, device,
                      args.budget_s, ("triton", "aten"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
