"""Static sm_90 report on the attention kernels, without a GPU: each launch plan (MDTA) and
autotune config (proxy attention) compiled for sm_90 as Triton would on an H100/H200, with its
registers per thread, spilled bytes, shared memory, programs that fit on one multiprocessor,
and whether ptxas serialises its tensor-core products (C7515: each wgmma then waits for the
one before it). For the proxy kernels also the thread instructions per logit in the hot
(innermost) loops, a proxy for their ALU/issue cost next to the tensor work, and their wgmma
products and waits; for the MDTA streams the instructions per loaded element. For the MDTA streams, which are memory-bound, also the bytes of loads a
multiprocessor keeps in flight: by Little's law a card sustains about (bytes in flight per
SM x SMs) / memory latency, so 12 KB per SM at ~1 us on 132 SMs caps the streams near
1.6 TB/s whatever the card's bandwidth.

    python bench/attention_sm90.py [--only mdta|proxy]   # a minute or two (Triton caches compiles)

Uses the ptxas that ships with Triton (its version compiles; the GPU machine's
Triton may schedule differently).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the compiler, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import triton  # noqa: E402

from kernel_checks import (compile_mdta_plan, compiled_proxy_configs, loop_bodies,  # noqa: E402
                           longest_loop, loop_wgmma, mdta_stream_plans, ptxas_usage, sass)

REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64
SIPL_WIDTHS = {64: 48, 128: 96, 256: 176}  # padded head width: SIPL's channels per head there


def usage(compiled, warps: int) -> dict:
    """ptxas_usage plus shared memory and the programs that fit on one multiprocessor."""
    row = ptxas_usage(compiled)
    row["shared"] = shared = compiled.metadata.shared
    row["per_sm"] = min(REGISTERS_PER_SM // (-(-row["registers"] // 8) * 8 * 32 * warps),
                        SHARED_PER_SM // max(shared + 1024, 1), WARPS_PER_SM // warps)
    return row


def _cell(row: dict) -> str:
    return (f"{row['registers']:3d} regs {row['spilled']:4d} B spilled {row['shared'] // 1024:4d} KB shared "
            f"{row['per_sm']} per SM" + ("  WGMMA SERIALISED (C7515)" if row["serialised"] else ""))


def mdta_rows():
    """Each MDTA stream plan: 16-bit at prefetch depths 1 and 2, float32 (pipelined)."""
    for name, c_pad, pointer, size, plan, kernel, constants, streams in mdta_stream_plans():
        compiled = compile_mdta_plan(kernel, constants, pointer, plan)
        row = usage(compiled, plan["num_warps"])
        # tiles of loads in flight while a program multiplies: its prefetched ones, or the
        # software pipeline's stages ahead; the grid puts one (Gram) or two (mix) programs on an SM
        tiles = plan["PREFETCH"] or plan["num_stages"] - 1
        programs = min(row["per_sm"], 1 if name == "gram" else 2)
        in_flight = programs * tiles * streams * SIPL_WIDTHS[c_pad] * plan["BLOCK_N"] * size
        yield (f"MDTA {name:4} c={SIPL_WIDTHS[c_pad]:3d} {pointer[1:]:4} depth {plan['PREFETCH']} "
               f"stages {plan['num_stages']} BLOCK_N {plan['BLOCK_N']:3d} {plan['num_warps']} warps: {_cell(row)}; "
               f"{in_flight / 1024:4.0f} KB of loads in flight per SM ({programs} program(s)); "
               f"{_per_loaded_element(compiled, name, c_pad, plan, streams):4.1f} instructions per loaded element")


def _per_loaded_element(compiled, name: str, c_pad: int, plan: dict, streams: int) -> float:
    """Thread instructions of the hot loop per stream element it loads (SIPL's channels, not
    the padded ones): next to the card's bytes per clock, a proxy for whether issuing them
    keeps up with memory (an H100 SM issues 128 per clock and receives ~20 bytes per clock at
    full bandwidth: ~26 per float32 element, ~13 per 16-bit one)."""
    tiles = 2 if plan["PREFETCH"] == 2 else 1  # depth 2 takes two tiles an iteration
    loaded = (2 if name == "gram" else streams) * SIPL_WIDTHS[c_pad] * plan["BLOCK_N"] * tiles
    return len(longest_loop(sass(compiled), innermost=True)) * plan["num_warps"] * 32 / loaded


def proxy_rows():
    """Each proxy-attention autotune config of SIPL's head sizes, bf16 and float32."""
    for name, dtype, head_dim, shape, compiled in compiled_proxy_configs():
        if isinstance(compiled, Exception):
            raise compiled
        name = name.strip("_").replace("_kernel", "").replace("backward_", "")
        owned, loop, warps, _ = shape
        # each innermost loop's instructions per logit (the forward has two: fixed and running
        # softmax shift), and its wgmma products / waits
        loops = [len(body) * warps * 32 / (owned * loop) for body in loop_bodies(sass(compiled))
                 if len(body) >= 50]  # (not the short copy loops)
        waits = ", ".join(f"{products}/{count}" for products, count in loop_wgmma(compiled)) or "none"
        yield (f"proxy {name:7} d={head_dim:3d} {dtype} {shape}: {_cell(usage(compiled, warps))}; "
               f"{' / '.join(f'{x:.1f}' for x in loops)} instructions per logit, wgmma / waits {waits}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("mdta", "proxy"), help="one op's kernels")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, compiled for sm_90 (H100/H200: 132 SMs, 64k registers, 228 KB shared)")
    rows = {"mdta": mdta_rows, "proxy": proxy_rows}
    for line in itertools.chain.from_iterable(rows[op]() for op in rows if args.only in (None, op)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
