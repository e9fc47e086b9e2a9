"""GPU table: refinement with steps=2 of the full model, the authors' loop on the reference
backend vs sipl_fast's Refiner (auto backend: the Triton kernels), time and peak memory.

    python bench/refine_table.py OUT.json

Targets (issue 5): at 512x512 >= 2.5x faster and <= 0.25x peak memory; 1280x720 within 8 GB.
"""
from __future__ import annotations

import json
import sys
import time

import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import authors_loop

from peak_memory import peak_extra_bytes


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after the caller's warm-up), CUDA-synchronised."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(out_path: str) -> None:
    torch.manual_seed(0)
    model = SIPLPromptIR().eval().cuda()
    with torch.no_grad():  # random dictionaries: the trained model's are not zeros
        for k in (1, 2, 3):
            getattr(model, f"privileged_dictionary{k}").normal_()
    weights = torch.cuda.memory_allocated()
    cases = [
        ("512x512", (512, 512), "reference", 1),
        ("512x512", (512, 512), "torch", 2),
        ("512x512", (512, 512), "sipl_fast", 3),
        ("1280x720", (720, 1280), "sipl_fast", 2),
    ]
    rows = []
    for label, size, provider, repeats in cases:
        x = torch.rand(1, 3, *size, device="cuda")
        if provider == "reference":
            def run():
                with sipl_fast.use_backend("reference"):
                    return authors_loop(model, x, steps=2)
        elif provider == "torch":
            def run():
                with sipl_fast.use_backend("torch"):
                    return model.refine(x, steps=2)
        else:
            def run():
                return model.refine(x, steps=2)
        peak = peak_extra_bytes(run, "cuda")  # also the warm-up (compilation, autotuning)
        seconds = _timed(run, repeats)
        rows.append(dict(size=label, provider=provider, seconds=seconds, peak_extra_gib=peak / 2**30))
        print(f"refine steps=2 {label:>9} {provider:>10}: {seconds * 1e3:9.1f} ms  "
              f"peak beyond weights {peak / 2**30:6.2f} GiB", flush=True)
        del x
        torch.cuda.empty_cache()
    by = {(r["size"], r["provider"]): r for r in rows}
    ref, ours = by[("512x512", "reference")], by[("512x512", "sipl_fast")]
    summary = dict(speedup_512=ref["seconds"] / ours["seconds"],
                   memory_ratio_512=ours["peak_extra_gib"] / ref["peak_extra_gib"],
                   peak_720p_gib=by[("1280x720", "sipl_fast")]["peak_extra_gib"] + weights / 2**30)
    print(f"refine: 512x512 speedup vs reference {summary['speedup_512']:.2f}x (target >= 2.5), "
          f"peak memory ratio {summary['memory_ratio_512']:.3f} (target <= 0.25); 1280x720 total "
          f"{summary['peak_720p_gib']:.2f} GiB (target <= 8)")
    with open(out_path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                       summary=summary), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "refine_table.json")
