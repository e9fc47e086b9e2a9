"""Static SASS of the depthwise kernels compiled for sm_90, without a GPU: instructions per
output and registers per thread, for each kernel as shipped and for each of its two tile paths
(interior tiles unmasked, edge tiles masked). A proxy for the issue cost of these
memory-streaming kernels where no GPU is at hand to time them.

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
from sipl_fast.kernels import depthwise3x3_gate as gate  # noqa: E402


@triton.jit
def _forward_path(x_ptr, w_ptr, b_ptr, out_ptr, planes, channels, height, width, sx_b, sx_c, sx_h, sx_w,
                  so_b, so_c, so_h, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
                  MASKED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """depthwise3x3_fwd_kernel with one tile path for every tile."""
    _, batch, channel, plane_mask, rows, cols, _ = dw._tile(planes, channels, height, width, BLOCK_C, BLOCK_H, BLOCK_W)
    acc = dw._convolved(x_ptr + batch * sx_b + channel * sx_c, w_ptr, b_ptr, channel, plane_mask, rows, cols,
                        height, width, sx_h, sx_w, HAS_BIAS, False, MASKED, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    dw._store_tile(out_ptr, acc, batch, channel, plane_mask, rows, cols, height, width, so_b, so_c, so_h)


@triton.jit
def _gate_path(x_ptr, w_ptr, b_ptr, out_ptr, planes, half, height, width, sx_b, sx_c, sx_h, sx_w,
               so_b, so_c, so_h, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
               MASKED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """depthwise3x3_gate_fwd_kernel (GDFN gate) with one tile path for every tile."""
    _, batch, channel, plane_mask, rows, cols, _ = dw._tile(planes, half, height, width, BLOCK_C, BLOCK_H, BLOCK_W)
    out = gate._gated(x_ptr + batch * sx_b, w_ptr, b_ptr, channel, channel + half, plane_mask, rows, cols,
                      height, width, sx_c, sx_h, sx_w, HAS_BIAS, False, MASKED, COMPUTE, WIDE, BLOCK_C, BLOCK_H, BLOCK_W)
    dw._store_tile(out_ptr, out, batch, channel, plane_mask, rows, cols, height, width, so_b, so_c, so_h)


def sass(kernel, constants: dict, warps: int) -> tuple[collections.Counter, int]:
    """(instruction counts by opcode, registers per thread) of ``kernel`` compiled for sm_90."""
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
    opcodes = collections.Counter(match.group(2).split(".")[0] for match in
                                  re.finditer(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", listing))
    return opcodes, int(re.search(r"REG:(\d+)", usage).group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="512x512", help="HxW of the planes (picks the tile config)")
    args = parser.parse_args(argv)
    height, width = map(int, args.size.split("x"))
    block_c, block_h, block_w, warps = dw.tile_config(height, width)
    outputs_per_thread = block_c * block_h * block_w / (warps * 32)
    base = dict(BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, COMPUTE=tl.float32, HAS_BIAS=True, FLIP=False,
                DUAL=False, WIDE=False, sx_w=1, sd_w=1)
    cases = [("forward", dw.depthwise3x3_fwd_kernel, {}), ("forward, interior path", _forward_path, {"MASKED": False}),
             ("forward, edge path", _forward_path, {"MASKED": True}),
             ("gate", gate.depthwise3x3_gate_fwd_kernel, {}), ("gate, interior path", _gate_path, {"MASKED": False}),
             ("gate, edge path", _gate_path, {"MASKED": True}), ("weight gradient", dw.depthwise3x3_wgrad_kernel, {})]
    print(f"tiles of {block_c}x{block_h}x{block_w}, {warps} warps: {outputs_per_thread:.0f} outputs per thread")
    for name, kernel, extra in cases:
        opcodes, registers = sass(kernel, {**base, **extra}, warps)
        total = sum(opcodes.values())
        common = ", ".join(f"{op} {count}" for op, count in opcodes.most_common(6))
        print(f"{name:24} {total:5d} instructions, {total / outputs_per_thread:6.1f} per output, "
              f"{registers:3d} registers; {common}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
