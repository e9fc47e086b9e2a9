"""Refinement with steps=2 of the full model: the authors' loop on the reference backend vs
sipl_fast's Refiner (default backend; "+graph": a step captured in a CUDA graph and replayed,
which records the kernels of ops.graph_kernels("refine"); "+aten": the graph records what
eager calls run instead (SIPL_FAST_GRAPH_KERNELS=0); "+nhwc": on channels-last activations;
"+dwk": the depthwise convolutions, and the feed-forward's depthwise convolution + gate, by
sipl_fast's Triton kernels in eager calls too, ``ops.kernels_forced``; "+sN": strips of N MiB
instead of modules.STRIP_ELEMENTS's; "+tf32": float32 matrix products in TF32,
torch.backends.cuda.matmul.allow_tf32, for the reference loop too; "+fp32mix": the 1x1
mixes that ChannelMix runs as cuBLAS GEMMs in full float32, as before they followed the
convolutions' TF32 setting, modules.convolution_precision; "+gram4096": streamed MDTA's Gram
products in 4096-pixel pieces, as before torch_impl.GRAM_PIECE_CUDA), time and peak memory
beyond the resident weights.

    python bench/refine_table.py OUT.json                 # CUDA: 512x512 and 1280x720
    python bench/refine_table.py OUT.json --device cpu    # CPU: 128x128 and 256x256

Targets (issue 5): CPU 128x128 >= 1.5x faster and <= 0.5x activation memory; CUDA 512x512
>= 2.5x faster and <= 0.25x peak memory; 1280x720 within 8 GB.
On the CPU, peak memory is the resident-set high-water mark; glibc would keep freed blocks
resident and blur it, so the peaks come from a child process run with MALLOC_MMAP_THRESHOLD_
set (large blocks are then returned to the system when freed and the RSS follows live
memory), the timings from this process (glibc's defaults, as users run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

import sipl_fast
from sipl_fast import SIPLPromptIR, modules, ops
from sipl_fast.ops import torch_impl
from sipl_fast.refine import Refiner, authors_loop

from peak_memory import peak_extra_bytes

CASES = {
    "cuda": [((512, 512), "reference", 1), ((512, 512), "torch", 2), ((512, 512), "sipl_fast", 3),
             ((512, 512), "sipl_fast+dwk", 3), ((512, 512), "sipl_fast+graph", 3),
             ((512, 512), "sipl_fast+graph+aten", 3), ((512, 512), "sipl_fast+graph+nhwc", 3),
             ((512, 512), "sipl_fast+graph+s144", 3), ((512, 512), "sipl_fast+graph+s256", 3),
             ((512, 512), "sipl_fast+graph+s512", 3),
             ((512, 512), "sipl_fast+graph+fp32mix", 3), ((512, 512), "sipl_fast+graph+gram4096", 3),
             ((512, 512), "reference+tf32", 1), ((512, 512), "sipl_fast+graph+tf32", 3),
             ((720, 1280), "sipl_fast", 2), ((720, 1280), "sipl_fast+graph", 2)],
    "cpu": [((128, 128), "reference", 3), ((128, 128), "sipl_fast", 3),
            ((256, 256), "reference", 2), ((256, 256), "sipl_fast", 2)],
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(runs: list, device: str) -> list:
    """Median wall time of each (fn, repeats), the fns timed in turn (round robin), so that a
    machine whose speed drifts (shared CPUs) slows every provider of a group alike."""
    times = [[] for _ in runs]
    for turn in range(max(repeats for _, repeats in runs)):
        for (fn, repeats), taken in zip(runs, times):
            if turn >= repeats:
                continue
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            taken.append(time.perf_counter() - start)
    return [sorted(taken)[len(taken) // 2] for taken in times]


def _groups(cases: list, interleave: bool) -> list:
    """[(index, size, provider, repeats), ...] per timing group: the cases of one size together
    where ``interleave`` (the CPU), else one case each (a GPU's timings are steady, and a run cut
    short by gpu_check's time limit keeps every finished row)."""
    groups: dict = {}
    for index, (size, provider, repeats) in enumerate(cases):
        groups.setdefault(size if interleave else index, []).append((index, size, provider, repeats))
    return list(groups.values())


def make_model(device) -> SIPLPromptIR:
    """The full model in eval mode, seeded, its dictionaries random (trained ones are not zeros)."""
    torch.manual_seed(0)
    model = SIPLPromptIR().eval().to(device)
    with torch.no_grad():
        for k in (1, 2, 3):
            getattr(model, f"privileged_dictionary{k}").normal_()
    return model


def make_runner(model, x, provider: str):
    """A zero-argument callable refining x with steps=2 as ``provider`` does (see the docstring)."""
    name, *extras = provider.split("+")
    if name == "reference":
        refiner = lambda image: authors_loop(model, image, steps=2)  # noqa: E731
    elif "graph" in extras:  # one Refiner kept: its first call captures, later ones replay
        refiner = Refiner(model, steps=2, cuda_graph=True, channels_last=True if "nhwc" in extras else None)
    else:  # as a user calls it; channels_last None: the device default
        refiner = lambda image: model.refine(image, steps=2, channels_last=True if "nhwc" in extras else None)  # noqa: E731
    backend = {"reference": "reference", "torch": "torch"}.get(name)
    forced = ops.DEPTHWISE_OPS if "dwk" in extras else ()
    graph_kernels = {"SIPL_FAST_GRAPH_KERNELS": "0" if "aten" in extras else "1"}
    strip_mib = next((int(e[1:]) for e in extras if e.startswith("s") and e[1:].isdigit()), None)

    def run():
        with sipl_fast.use_backend(backend) if backend else contextlib.nullcontext(), ops.kernels_forced(*forced), \
                _strip_budget(x.device.type, strip_mib), mock.patch.dict(os.environ, graph_kernels), \
                _product_variant(extras):
            return refiner(x)
    return run


def _product_variant(extras: list) -> contextlib.AbstractContextManager:
    """How the row's matrix products run. "+tf32": float32 matrix products (cuBLAS and the
    proxy-attention kernel) in TF32, as cuDNN's convolutions are by default; "+fp32mix":
    ChannelMix's GEMMs in full float32; "+gram4096": the Gram products' former pieces."""
    if "tf32" in extras:
        return modules.matmul_tf32(True)
    if "fp32mix" in extras:
        return mock.patch.object(modules, "convolution_precision", lambda x: contextlib.nullcontext())
    if "gram4096" in extras:
        return mock.patch.object(torch_impl, "GRAM_PIECE_CUDA", 4096)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _strip_budget(device: str, mib: int | None):
    """Strips of ``mib`` MiB of float32 on ``device`` within the block (None: the default)."""
    previous = modules.STRIP_ELEMENTS[device]
    if mib is not None:
        modules.STRIP_ELEMENTS[device] = mib << 18
    try:
        yield
    finally:
        modules.STRIP_ELEMENTS[device] = previous


def _cpu_peaks(argv) -> dict:
    """{case index: peak bytes} from a child process run with glibc returning large freed
    blocks to the system (MALLOC_MMAP_THRESHOLD_), where the RSS follows live memory. The
    timings stay in this process: that setting makes every large allocation a fresh mmap,
    which slowed the reference loop 3.3x and the engine 2.4x at 128x128."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peaks.json")
        subprocess.run([sys.executable, __file__, *argv, "--peaks-to", out], env=env, check=True)
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peaks-to", default=None, help=argparse.SUPPRESS)  # the CPU's memory child
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cpu_peaks = _cpu_peaks(argv) if args.device == "cpu" and args.peaks_to is None else None
    model = make_model(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, peaks = [], {}
    for group in _groups(CASES[args.device], interleave=args.device == "cpu"):
        runs = []
        for index, size, provider, repeats in group:
            x = torch.rand(1, 3, *size, device=args.device)
            run = make_runner(model, x, provider)
            if cpu_peaks is None:
                peaks[index] = peak_extra_bytes(run, args.device)  # doubles as the warm-up
            else:
                run()  # warm-up
            runs.append((run, repeats))
        if args.peaks_to:
            continue
        for (index, size, provider, _), seconds in zip(group, _median_seconds(runs, args.device)):
            peak = peaks[index] if cpu_peaks is None else cpu_peaks[index]
            label = f"{size[1]}x{size[0]}"
            rows.append(dict(size=label, provider=provider, seconds=seconds, peak_extra_mib=peak / 2**20))
            print(f"refine steps=2 {label:>9} {provider:>10}: {seconds * 1e3:10.1f} ms   "
                  f"peak beyond weights {peak / 2**20:9.1f} MiB", flush=True)
        _write(args, rows, {})  # after every group: a run cut short by a time limit keeps its rows
        del runs
    if args.peaks_to:
        with open(args.peaks_to, "w") as f:
            json.dump(peaks, f)
        return 0
    by = {(r["size"], r["provider"]): r for r in rows}
    summary = {}
    for (size, provider), row in by.items():
        baseline = "reference+tf32" if "tf32" in provider.split("+") else "reference"  # the same arithmetic
        ref = by.get((size, baseline))
        if not provider.startswith("reference") and ref:
            summary[f"{size} {provider}"] = dict(speedup=ref["seconds"] / row["seconds"],
                                                 memory_ratio=row["peak_extra_mib"] / ref["peak_extra_mib"])
            print(f"refine {size} {provider}: {ref['seconds'] / row['seconds']:.2f}x faster than the "
                  f"{baseline} loop, {row['peak_extra_mib'] / ref['peak_extra_mib']:.3f}x its peak memory")
    if ("1280x720", "sipl_fast") in by:
        total = by[("1280x720", "sipl_fast")]["peak_extra_mib"] + weight_bytes / 2**20
        summary["1280x720 total GiB"] = total / 1024
        print(f"refine 1280x720 sipl_fast: {total / 1024:.2f} GiB with the weights (target <= 8)")
    _write(args, rows, summary)
    return 0


def _write(args, rows: list, summary: dict) -> None:
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with open(args.out, "w") as f:
        json.dump(dict(device=device_name, threads=torch.get_num_threads(), torch=torch.__version__,
                       rows=rows, summary=summary), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
