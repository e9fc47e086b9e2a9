"""Static SASS of the depthwise kernels compiled for sm_90, without a GPU: instructions and
load instructions per output and registers per thread, counted in the unrolled row loop of
each kernel (the forward, its fused gate, the weight gradient): the steady state. A proxy for the instruction-issue and L1 cost of these memory-streaming kernels where no GPU
is at hand to time them.

    python dev/sass_counts.py [--size 512x512]

Uses the nvdisasm and ptxas that ship with Triton (through tests/kernel_checks.py); compiles
as Triton's launcher would specialise a contiguous float32 map whose width is a multiple of 16
(unit column stride, 16-byte aligned pointers, strides and width; a strip's height need not be).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the compiler, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import triton.language as tl  # noqa: E402

import kernel_checks  # noqa: E402
from kernel_checks import compile_sm90, longest_loop, opcode, ptxas_usage  # noqa: E402
from sipl_fast.kernels import depthwise3x3 as dw  # noqa: E402


def sass(kernel, constants: dict, warps: int) -> tuple[list[tuple[int, str]], int]:
    """((address, instruction) of ``kernel`` compiled for sm_90 in order, registers per thread)."""
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    aligned = [name for name in kernel.arg_names
               if name not in constants and (name.endswith("_ptr") or name[1:3] in ("x_", "o_", "d_") or name == "width")]
    compiled = compile_sm90(kernel, constants, lambda name: "*fp32", warps, aligned=aligned)
    return kernel_checks.sass(compiled), ptxas_usage(compiled)["registers"]


def opcodes(code: list[tuple[int, str]]) -> collections.Counter:
    return collections.Counter(opcode(text) for address, text in code if address >= 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="512x512", help="HxW of the planes (picks the configs)")
    args = parser.parse_args(argv)
    height, width = map(int, args.size.split("x"))
    common = dict(COMPUTE=tl.float32, HAS_BIAS=True, FLIP=False, WIDE=False, sx_w=1, sd_w=1)
    block_c, rows, block_w, warps = dw.stream_config(height, width)
    step = block_c * block_w / (warps * 32)  # outputs per thread and row
    streams = dict(BLOCK_C=block_c, BLOCK_R=rows, BLOCK_W=block_w, **common)
    print(f"{block_c}x{block_w} columns per row step, {rows} rows, {warps} warps: "
          f"{step:.0f} outputs per thread and row; row loops unrolled {dw._UNROLL.value}x")
    for name, kernel, gate in (("forward", dw.depthwise3x3_fwd_kernel, 0), ("gate", dw.depthwise3x3_fwd_kernel, 1),
                               ("weight gradient", dw.depthwise3x3_wgrad_kernel, None)):
        code, registers = sass(kernel, {**streams, "GATE": gate}, warps)
        loop = opcodes(longest_loop(code))
        outputs = step * dw._UNROLL.value
        print(f"{name:16} {sum(loop.values()) / outputs:6.1f} per output, {loop['LDG'] / outputs:5.2f} loads per "
              f"output, {registers:3d} registers; loop: " + ", ".join(f"{op} {n}" for op, n in loop.most_common(6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
