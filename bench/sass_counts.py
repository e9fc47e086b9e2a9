"""Static SASS of the depthwise kernels compiled for sm_90, without a GPU: instructions and
load instructions per output and registers per thread, counted in the unrolled row loop of
each kernel (the forward, its fused gate, the weight gradient): the steady state. A proxy for the issue and L1 cost of these memory-streaming kernels where no GPU
is at hand to time them.

    python bench/sass_counts.py [--size 512x512]

Uses the nvdisasm and cuobjdump that ship with Triton; compiles as Triton's launcher would
specialise a contiguous float32 map whose width is a multiple of 16 (unit column stride,
16-byte aligned pointers, strides and width; a strip's height need not be).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # the compiler, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from sipl_fast.kernels import depthwise3x3 as dw  # noqa: E402

_ADDRESS = re.compile(r"/\*([0-9a-f]{4})\*/")
_OPCODE = re.compile(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def sass(kernel, constants: dict, warps: int) -> tuple[list[tuple[int, str]], int]:
    """((address, instruction) of ``kernel`` compiled for sm_90 in order, registers per thread)."""
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in constants else ("*fp32" if name.endswith("_ptr") else "i32")
                 for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name not in constants and (name.endswith("_ptr") or name[1:3] in ("x_", "o_", "d_") or name == "width")}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=target,
                              options=backend.parse_options({"num_warps": warps, "num_stages": 1}).__dict__)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        listing = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True).stdout
    return instructions(listing), int(re.search(r"REG:(\d+)", usage).group(1))


def instructions(listing: str) -> list[tuple[int, str]]:
    """(address, text) of each instruction of an nvdisasm listing; labels become ("label", name)."""
    out = []
    for line in listing.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        address = _ADDRESS.search(line)
        if label:
            out.append((-1, label.group(1)))
        elif address and _OPCODE.search(line):
            out.append((int(address.group(1), 16), line))
    return out


def opcodes(code: list[tuple[int, str]]) -> collections.Counter:
    return collections.Counter(_OPCODE.search(text).group(2).split(".")[0] for address, text in code if address >= 0)


def longest_loop(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of the longest backward branch's loop (the unrolled row loop), or []."""
    labels, best = {}, []
    for index, (address, text) in enumerate(code):
        if address < 0:
            labels[text] = index
            continue
        target = re.search(r"BRA `\(\.(L_x_\d+)\)", text)
        if target and labels.get(target.group(1)) is not None:
            body = [entry for entry in code[labels[target.group(1)]:index + 1] if entry[0] >= 0]
            best = max(best, body, key=len)
    return best


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
