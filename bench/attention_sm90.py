"""Static sm_90 report on the attention kernels, without a GPU: each launch plan (MDTA) and
autotune config (proxy attention) compiled for sm_90 as Triton would on an H100/H200, with its
registers per thread, spilled bytes, shared memory, programs that fit on one multiprocessor,
and whether ptxas serialises its tensor-core products (C7515: each wgmma then waits for the
one before it). For the MDTA streams, which are memory-bound, also the bytes of loads a
multiprocessor keeps in flight: by Little's law a card sustains about (bytes in flight per
SM x SMs) / memory latency, so 12 KB per SM at ~1 us on 132 SMs caps the streams near
1.6 TB/s whatever the card's bandwidth.

    python bench/attention_sm90.py [--only mdta|proxy]   # a minute or two (Triton caches compiles)

Uses the ptxas and cuobjdump that ship with Triton (its version compiles; the GPU machine's
Triton may schedule differently).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the compiler, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernel_checks import compile_sm90, ptxas_info  # noqa: E402
from sipl_fast.kernels import proxy_attention as proxy  # noqa: E402
from sipl_fast.kernels import transposed_attention as mdta  # noqa: E402

REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64
SIPL_WIDTHS = {64: 48, 128: 96, 256: 176}  # padded head width: SIPL's channels per head there


def usage(compiled, warps: int) -> dict:
    """Registers, spilled bytes, shared memory, programs per SM, C7515 of a compiled kernel."""
    info = ptxas_info(compiled)
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    stack = re.search(r"(\d+) bytes cumulative stack size", info)
    shared = compiled.metadata.shared
    fits = min(REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * warps), SHARED_PER_SM // max(shared + 1024, 1),
               WARPS_PER_SM // warps)
    return {"registers": registers, "spilled": int(stack.group(1)) if stack else 0, "shared": shared,
            "per_sm": fits, "serialised": "C7515" in info}


def _cell(row: dict) -> str:
    return (f"{row['registers']:3d} regs {row['spilled']:4d} B spilled {row['shared'] // 1024:4d} KB shared "
            f"{row['per_sm']} per SM" + ("  WGMMA SERIALISED (C7515)" if row["serialised"] else ""))


def mdta_rows():
    """Each MDTA stream plan: 16-bit at prefetch depths 1 and 2, float32 (pipelined)."""
    seen = set()
    for c_pad, (pointer, size, precision), depth in itertools.product(
            SIPL_WIDTHS, (("*bf16", 2, "ieee"), ("*fp32", 4, "tf32x3")), (1, 2)):
        plans = [("gram", mdta._gram_partials_kernel, mdta._gram_plan(c_pad, size, precision, depth), {}, 2, 1)]
        for streams in (1, 2):
            plan = mdta._mix_plan(c_pad, size, streams, precision, depth)
            if plan is not None:
                plans.append((f"mix{streams}", mdta._channel_mix_kernel, plan,
                              dict(DIAG=streams == 2, DUAL=streams == 2, SCALE_ROWS=size == 2, BLOCK_K=c_pad),
                              streams, 2))
        for name, kernel, plan, flags, streams, waves in plans:
            key = (name, c_pad, pointer, tuple(sorted(plan.items())))
            if key in seen:  # a depth the registers do not allow gives the shallower plan
                continue
            seen.add(key)
            constants = dict(flags, PRECISION=precision, ACC=tl.float32, BLOCK_N=plan["BLOCK_N"],
                             PREFETCH=plan["PREFETCH"], **{k: plan[k] for k in ("BLOCK_C", "BLOCK_I") if k in plan})
            small = ("m_ptr", "diag1_ptr", "diag2_ptr", "partials_ptr")
            aligned = [n for n in kernel.arg_names if n not in constants
                       and (n.endswith("_ptr") or "stride" in n or n in ("N", "CHUNK", "PIXELS_PER_PROGRAM"))]
            compiled = compile_sm90(kernel, constants, lambda n: "*fp32" if n in small else pointer,
                                    plan["num_warps"], plan["num_stages"], aligned)
            row = usage(compiled, plan["num_warps"])
            # tiles of loads in flight while a program multiplies: its prefetched ones, or the
            # software pipeline's stages ahead; the grid puts `waves` programs on each SM
            tiles = plan["PREFETCH"] or plan["num_stages"] - 1
            programs = min(row["per_sm"], waves)
            in_flight = programs * tiles * streams * SIPL_WIDTHS[c_pad] * plan["BLOCK_N"] * size
            yield (f"MDTA {name:4} c={SIPL_WIDTHS[c_pad]:3d} {pointer[1:]:4} depth {plan['PREFETCH']} "
                   f"stages {plan['num_stages']} BLOCK_N {plan['BLOCK_N']:3d} {plan['num_warps']} warps: {_cell(row)}; "
                   f"{in_flight / 1024:4.0f} KB of loads in flight per SM ({programs} program(s))")


def proxy_rows():
    """Each proxy-attention autotune config of SIPL's head sizes, bf16 and float32."""
    stats = {"temp_ptr", "rq_ptr", "rk_ptr", "lse_ptr", "delta_ptr", "dtau_ptr"}
    counts = {"NUM_HEADS", "NUM_SPLITS", "BATCHES_PER_KV", "BATCHES_PER_Q"}
    for (kernel, shapes, owned, loop), head_dim, dtype in itertools.product(
            ((proxy._forward_kernel, proxy._FORWARD_SHAPES, "BLOCK_M", "BLOCK_N"),
             (proxy._backward_dkdv_kernel, proxy._DKDV_SHAPES, "BLOCK_N", "BLOCK_M"),
             (proxy._backward_dq_kernel, proxy._DQ_SHAPES, "BLOCK_M", "BLOCK_N")),
            (96, 384), ("bf16", "fp32")):
        fn = kernel.fn
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        da, db = proxy.head_chunks(head_dim)
        for m, n, warps, stages in shapes[proxy._tile_class(head_dim, torch_dtype)]:
            constants = dict(D=head_dim, DA=da, DB=db, DOT_PRECISION=proxy._dot_precision(torch_dtype, False),
                             FULL_Q=True, FULL_KV=True,  # SIPL's token counts fill every block
                             **{owned: m, loop: n}, **{a: 1 for a in fn.arg_names if a.endswith("_st")})
            if "FINAL" in fn.arg_names:
                constants["FINAL"] = True
            aligned = [a for a in fn.arg_names if a not in constants and a not in counts]
            compiled = compile_sm90(fn, constants, lambda a: "*fp32" if a in stats else f"*{dtype}", warps, stages,
                                    aligned)
            name = fn.__name__.strip("_").replace("_kernel", "").replace("backward_", "")
            yield f"proxy {name:7} d={head_dim:3d} {dtype} {(m, n, warps, stages)}: {_cell(usage(compiled, warps))}"


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
