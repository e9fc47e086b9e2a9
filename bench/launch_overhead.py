"""Host time per call of the attention ops, eagerly: where the CPU goes when a call's kernels
take microseconds (the H200 ran MDTA's bf16 fwd+bwd at enc1 512x512 in 1.11 ms eagerly against
0.19 ms of kernels, bench/results/h200_2026-11-27f.md).

    python bench/launch_overhead.py OUT.json            # CUDA
    python bench/launch_overhead.py OUT.json --smoke    # CPU: host code only, launches stubbed

Each row times n calls issued back to back at a small shape (the GPU work of a call is a few
microseconds, so the wall time is the host's) and reports microseconds per call:
- MDTA and proxy-attention fwd+bwd by the eager route (sipl_fast.ops.eager's autograd.Function),
  for MDTA also with its launches through kernels/launch_cache.py ("eager+cache", off by
  default: bench/decide_defaults.py says whether to turn it on),
  by the torch.library custom ops, and by the torch formulation (cuBLAS/SDPA), with bf16 maps
  and a float32 temperature as under autocast (the reference backend takes one dtype only);
- one launch of each Triton kernel of an MDTA forward + backward, through Triton's JIT
  launcher (argument binding, specialisation, cache lookup) and through kernels/launch_cache.py
  (the compiled kernel's own launcher with the same bound arguments);
- a torch.empty and a one-element pointwise kernel, for scale.
On the CPU (--smoke) only the op rows run, under the Triton interpreter with every launch
replaced by a no-op: the host code around the launches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from unittest import mock

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

import sipl_fast  # noqa: E402
from sipl_fast import ops  # noqa: E402
from sipl_fast.kernels import launch_cache  # noqa: E402
from sipl_fast.ops import proxy_attention_triton, transposed_attention_triton  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_us(call, device: str, calls: int, rounds: int = 5) -> float:
    """Microseconds per call: the fastest of ``rounds`` rounds of ``calls`` calls issued back to back."""
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


@contextmanager
def route(module, name: str):
    """The op's route within the block: "eager" (its autograd.Function), "eager+cache" (that,
    launching through kernels/launch_cache.py), "custom op" (the torch.library ops), or the
    "torch" backend."""
    if name == "torch":
        with sipl_fast.use_backend(name):
            yield
        return
    eager = name.startswith("eager")
    with sipl_fast.use_backend("triton"), mock.patch.object(module, "plain_eager", lambda x: eager), \
            mock.patch.object(launch_cache, "_ENABLED", name == "eager+cache"):
        yield


def _inputs(shape, device, dtype, generator):
    return torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()


def op_cases(device: str, dtype: torch.dtype):
    """{name: (triton module, a fwd+bwd call)} at small shapes (odd where it costs nothing)."""
    g = torch.Generator().manual_seed(0)
    temperature = torch.rand(2, 1, 1, generator=g).add(0.5).to(device).requires_grad_()
    mq, mk, mv = (_inputs((1, 96, 32, 48), device, dtype, g) for _ in range(3))
    pq, pk, pv = (_inputs((1, 96, 16, 24), device, dtype, g) for _ in range(3))

    def fwd_bwd(op, q, k, v):
        def call():
            out = op(q, k, v, temperature, 2)
            torch.autograd.grad(out, (q, k, v, temperature), torch.ones_like(out))
        return call

    return {"MDTA": (transposed_attention_triton, fwd_bwd(ops.transposed_attention, mq, mk, mv)),
            "proxy attention": (proxy_attention_triton, fwd_bwd(ops.proxy_attention, pq, pk, pv))}


@contextmanager
def recorded_launches():
    """Records the first launch of each Triton kernel made in the block: {name: (jit function,
    grid, args, kwargs)}."""
    from triton.runtime.jit import JITFunction
    seen = {}
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.setdefault(self.fn.__name__, (self, grid, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    with mock.patch.object(JITFunction, "run", run):
        yield seen


def _cached_us(jit_fn, grid, args, kwargs, device: str, calls: int) -> float | None:
    """Host microseconds of the launch through kernels/launch_cache.py (the compiled kernel's
    own launcher once the first call has been through Triton's), or None where it falls back."""
    with mock.patch.object(launch_cache, "_ENABLED", True), mock.patch.object(launch_cache, "_runners", {}), \
            mock.patch.object(launch_cache, "stats", dict.fromkeys(launch_cache.stats, 0)):
        us = host_us(lambda: launch_cache.launch(jit_fn, grid, args, kwargs), device, calls)
        return None if launch_cache.stats["fallbacks"] else us


def launch_rows(device: str, calls: int) -> list[dict]:
    """Per Triton kernel of an MDTA fwd+bwd: host microseconds of one launch, Triton's launcher
    vs the launch cache."""
    module, call = op_cases(device, torch.bfloat16)["MDTA"]
    with route(module, "eager"), recorded_launches() as seen:
        call()
    rows = []
    for name, (jit_fn, grid, args, kwargs) in seen.items():
        jit_call = lambda jit_fn=jit_fn, grid=grid, args=args, kwargs=kwargs: jit_fn[grid](*args, **kwargs)  # noqa: E731
        row = {"kernel": name, "arguments": len(args) + len(kwargs), "jit_us": host_us(jit_call, device, calls),
               "cached_us": _cached_us(jit_fn, grid, args, kwargs, device, calls)}
        rows.append(row)
        print(f"launch {name:32s} {row['arguments']:3d} args  JIT {row['jit_us']:6.1f} us"
              + (f"  launch cache {row['cached_us']:6.1f} us" if row["cached_us"] else "  (launch cache falls back)"))
    return rows


def scale_rows(device: str, calls: int) -> list[dict]:
    x = torch.ones(1, device=device)
    rows = [{"what": "torch.empty 1 MiB", "us": host_us(lambda: torch.empty(1 << 18, device=device), device, calls)},
            {"what": "one-element add_", "us": host_us(lambda: x.add_(1), device, calls)}]
    for row in rows:
        print(f"{row['what']:40s} {row['us']:6.1f} us")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU: host code only, launches stubbed")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing round")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("launch_overhead.py: needs a CUDA device (use --smoke for the CPU's host code)")
        return 0
    dtype = torch.float32 if args.smoke else torch.bfloat16
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (launches stubbed)",
              "torch": torch.__version__, "triton": triton.__version__, "ops": []}
    stub = (mock.patch("triton.runtime.interpreter.InterpretedFunction.run", lambda *a, **k: None) if args.smoke
            else mock.patch.dict(os.environ))
    with stub:
        for op, (module, call) in op_cases(device, dtype).items():
            gpu_routes = ("eager+cache", "torch") if op == "MDTA" else ("torch",)
            for name in ("eager", "custom op") + (() if args.smoke else gpu_routes):
                with route(module, name):
                    us = host_us(call, device, args.calls)
                report["ops"].append({"op": op, "route": name, "us": us})
                print(f"{op} fwd+bwd, {name:11s} {us:7.1f} us per call")
    if device == "cuda":
        report["launches"] = launch_rows(device, args.calls)
        report["scale"] = scale_rows(device, args.calls)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
