"""Where the GPU time goes: kernel-time breakdowns of the training step, refinement and the kernels.

    python bench/profile_gpu.py [--json OUT.json] [--top 12]

For each case: the wall time of one call, the summed time of the GPU kernels it launched
(torch.profiler), their ratio (how busy the GPU was: well below 1 means the CPU issuing
kernels is the bottleneck, and CUDA graphs pay), the kernels with the most GPU time, and the
functions with the most CPU time of one call (cProfile).
Cases: the training step (base preset, 128x128, batch 8, bf16 autocast) with the providers of
train_step_table.py, refinement with steps=2 at 512x512 (also the authors' loop, replayed from a CUDA graph with
its graph kernels, "graph", eagerly with the depthwise kernels, "dwk", and on the torch backend), and the MDTA and proxy-attention kernels (fwd+bwd) at their 512x512 shapes. CUDA only.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import sys
import time
from collections import defaultdict

os.environ.setdefault("SIPL_FAST_ALL_KERNELS", "1")  # the kernels, not the torch routes

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_attention_table  # noqa: E402
import refine_table  # noqa: E402
import transposed_attention_table  # noqa: E402
from train_step_table import make_step  # noqa: E402


def kernel_breakdown(fn, warmup: int = 3) -> dict:
    """Wall time of one call of ``fn``, its GPU kernels' total time and the kernels by time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name[event.name]
            entry[0] += event.device_time / 1e3  # ms
            entry[1] += 1
    kernels = sorted(([name, ms, count] for name, (ms, count) in by_name.items()), key=lambda e: -e[1])
    gpu = sum(ms for _, ms, _ in kernels)
    return {"wall_ms": wall * 1e3, "gpu_ms": gpu, "busy": gpu / (wall * 1e3),
            "launches": sum(count for _, _, count in kernels), "kernels": kernels, "cpu": cpu_breakdown(fn)}


def cpu_breakdown(fn, top: int = 40) -> list:
    """Where the CPU time of one call goes, by function (cProfile's own time: Python code, and
    the torch, Triton and extension calls it makes, which include their launches), for the
    cases where issuing kernels bounds the wall time: [[function, own ms, calls], ...]."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, cumulative s, callers)}
    rows = [[f"{os.path.basename(file)}:{line}({name})", own * 1e3, calls]
            for (file, line, name), (calls, _, own, _, _) in stats.items()]
    return sorted(rows, key=lambda row: -row[1])[:top]


def _default_routing(fn):
    """fn run with the triton backend's default routing (torch formulations where they won),
    not every kernel as the kernel cases below."""
    def run():
        forced = os.environ.pop("SIPL_FAST_ALL_KERNELS", None)
        try:
            return fn()
        finally:
            if forced is not None:
                os.environ["SIPL_FAST_ALL_KERNELS"] = forced
    return run


def cases():
    """(name, make): make() builds the case and returns the function to profile (only cases
    that are profiled get built)."""
    device = torch.device("cuda")

    def refinement(provider: str):
        """refine_table.py's provider at 512x512 (a graph Refiner's warm-up call captures)."""
        return _default_routing(refine_table.make_runner(refine_table.make_model(device),
                                                         torch.rand(1, 3, 512, 512, device=device), provider))

    # Refinement first: issue 5's open target (the train-step cases take longest to build).
    yield "refine 512x512 steps=2 eager", lambda: refinement("sipl_fast")
    yield "refine 512x512 steps=2 reference (authors' loop)", lambda: refinement("reference")
    yield "refine 512x512 steps=2 graph", lambda: refinement("sipl_fast+graph")
    yield "refine 512x512 steps=2 dwk", lambda: refinement("sipl_fast+dwk")
    yield "refine 512x512 steps=2 torch backend", lambda: refinement("torch")

    shape = dict(preset="base", batch=8, patch=128)
    for provider in ("reference", "auto", "auto+graph", "auto+graph+nhwc", "auto+graph+aten"):
        yield f"train step bf16 {provider}", lambda provider=provider: _default_routing(
            make_step(provider, device, amp=True, **shape)[0])

    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        mdta = transposed_attention_table.SHAPES[0]  # dec1 512x512
        for mode in ("fwd", "fwd+bwd"):
            yield f"MDTA {mode} {mdta.name} {name}", lambda mode=mode, dtype=dtype: \
                transposed_attention_table.make_runner(mdta, dtype, mode, "triton", "cuda")[0]
        for proxy in proxy_attention_table.SHAPES[1:3]:  # p1_cross and cross_p1 at 512px
            yield f"proxy fwd+bwd {proxy.name} {name}", lambda proxy=proxy, dtype=dtype: \
                proxy_attention_table.make_runner(proxy, dtype, "fwd+bwd", "triton", "cuda")[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--only", default="", help="regular expression: profile only the cases whose name it matches")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu.py needs CUDA")
        return 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for name, make in cases():
        if args.only and not re.search(args.only, name):
            continue
        result = kernel_breakdown(make())
        report["cases"][name] = result
        print(f"\n== {name}: wall {result['wall_ms']:.2f} ms, kernels {result['gpu_ms']:.2f} ms "
              f"(GPU busy {100 * result['busy']:.0f}%), {result['launches']} launches", flush=True)
        for kernel, ms, count in result["kernels"][:args.top]:
            print(f"  {ms:9.3f} ms {count:6d}x  {kernel[:110]}")
        print("  CPU, own time per function (cProfile, one call):")
        for function, ms, count in result["cpu"][:args.top]:
            print(f"  {ms:9.3f} ms {count:6d}x  {function[:110]}")
        torch.cuda.empty_cache()
        if args.json:  # after every case: a run cut short by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
