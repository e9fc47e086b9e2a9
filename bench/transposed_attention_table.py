"""MDTA (transposed attention): the fused Triton kernels against PyTorch. One table and a JSON file.

    python bench/transposed_attention_table.py OUT.json [--dtypes bf16,fp32] [--budget-s 85] [--tf32]
    python bench/transposed_attention_table.py OUT.json --smoke     # tiny shapes on CPU: checks the script

Providers: ``triton`` (sipl_fast's fused kernels), ``reference`` (the authors' eager math:
F.normalize copies, two matmuls), ``torch`` (sipl_fast.ops.torch_impl: the Gram matrix of the
raw q and k, scaled by the norms afterwards) and ``compile`` (torch.compile of the reference,
one static compile per case). Modes: ``fwd`` (under no_grad, as at inference) and
``fwd+bwd`` (gradients of q, k, v and the temperature). Shapes: the MDTA blocks at full
resolution, where the time goes: enc1 (48 channels, 1 head) and dec1 / refinement (96
channels, 1 head; the same shape) for a 128x128 batch-8 training step, a 512x512 image and
a 1280x720 image.

Each cell: median time (triton.testing.do_bench), GB/s, and the peak memory allocated above
the inputs. GB/s counts the bytes a perfect implementation must move, the same for every
provider: the forward reads q, k, v and writes out (4 tensors); forward and backward also
read dO, q, k, v and write dq, dk, dv (11 tensors). The card's device-to-device copy
bandwidth (y.copy_(x) of 1 GiB, 2 bytes moved per byte copied) is measured first for the
target "triton forward at 512x512 dec1 >= 70% of copy bandwidth". Other targets, fwd+bwd:
triton >= 2.5x faster than reference and >= 1.3x faster than compile.

Time budget: the whole run should stay under ~90 s on an H100. torch.compile cases stop once
--compile-budget-s of compilation is spent and every measurement stops once --budget-s is
spent; the rows are ordered so the target shapes come first, and skipped cells say so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # the triton provider runs on CPU only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sipl_fast  # noqa: E402
from sipl_fast import ops  # noqa: E402
from sipl_fast.ops import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak_memory import peak_extra_bytes  # noqa: E402

PROVIDERS = ("triton", "reference", "torch", "compile")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 11}
TARGET_VS_REFERENCE, TARGET_VS_COMPILE, TARGET_COPY_FRACTION = 2.5, 1.3, 0.7


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    heads: int
    hw: tuple[int, int]

    def stream_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one (B, C, H, W) tensor."""
        return self.batch * self.channels * self.hw[0] * self.hw[1] * dtype.itemsize


SHAPES = (  # the bandwidth target first, so a tight budget still measures it
    Shape("dec1 512x512", 1, 96, 1, (512, 512)),
    Shape("enc1 512x512", 1, 48, 1, (512, 512)),
    Shape("dec1 128x128 B8", 8, 96, 1, (128, 128)),
    Shape("enc1 128x128 B8", 8, 48, 1, (128, 128)),
    Shape("dec1 1280x720", 1, 96, 1, (720, 1280)),
    Shape("enc1 1280x720", 1, 48, 1, (720, 1280)),
)
SMOKE_SHAPES = (
    Shape("smoke", 1, 32, 2, (6, 7)),
)
COPY_TARGET_CASE = "dec1 512x512"


def attention_function(provider: str):
    """f(q, k, v, temperature, heads) for a provider; ``compile`` gets a fresh static compile."""
    if provider == "compile":
        return torch.compile(reference.transposed_attention, dynamic=False)

    def run(q, k, v, temperature, heads):
        with sipl_fast.use_backend(provider):
            return ops.transposed_attention(q, k, v, temperature, heads)
    return run


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, requires_grad: bool):
    """q, k, v as channel chunks of one qkv tensor (as in the model), and the temperature."""
    qkv = torch.randn(shape.batch, 3 * shape.channels, *shape.hw, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in qkv.chunk(3, dim=1))
    # One dtype for all four: the reference formulation does not mix a float32 temperature in.
    temperature = torch.linspace(1.0, 4.0, shape.heads, device=device, dtype=dtype).reshape(-1, 1, 1)
    return [q, k, v, temperature.requires_grad_(requires_grad)]


def make_runner(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str):
    """(a zero-argument callable running one call in ``mode``, the input tensors it uses)."""
    fn = attention_function(provider)
    inputs = make_inputs(shape, dtype, device, requires_grad=mode != "fwd")
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs, shape.heads)
    else:
        grad_out = torch.randn(shape.batch, shape.channels, *shape.hw, device=device, dtype=dtype)

        def run():
            return torch.autograd.grad(fn(*inputs, shape.heads), inputs, grad_out)
    return run, inputs


def time_ms(run, device: str) -> float:
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[1]


def copy_bandwidth_gbs(device: str) -> float | None:
    """The card's device-to-device copy rate: bytes read plus bytes written per second."""
    if device != "cuda":
        return None
    import triton.testing
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=10, rep=50, return_mode="median")
    return 2 * source.numel() / ms / 1e6


def measure(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str) -> dict:
    run, _ = make_runner(shape, dtype, mode, provider, device)
    start = time.perf_counter()
    run()  # compiles (torch.compile, Triton) and warms up
    if device == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    ms = time_ms(run, device)
    moved = TENSORS_MOVED[mode] * shape.stream_bytes(dtype)
    peak = peak_extra_bytes(run, device) / 2**20 if device == "cuda" else None
    return {"ms": ms, "GBs": moved / ms / 1e6, "peak_MiB": peak, "first_call_s": first_call_s}


def speedups(results: dict) -> dict:
    """triton's speed-up over reference and over compile (None where unmeasured)."""
    triton_result = results.get("triton")
    ratio = lambda other: (results[other]["ms"] / triton_result["ms"]
                           if triton_result and results.get(other) else None)
    return {"vs_reference": ratio("reference"), "vs_compile": ratio("compile"), "vs_torch": ratio("torch")}


def _cell(result) -> str:
    if result is None:
        return f"{'skipped':>25}"
    peak = "" if result["peak_MiB"] is None else f"{result['peak_MiB']:7.0f}M"
    return f"{result['ms']:9.3f}ms{result['GBs']:6.0f}G{peak:>8}"


def _ratio(value, target) -> str:
    """'2.31x+' meets the target, '1.20x!' misses it, no mark where there is no target."""
    if value is None:
        return f"{'-':>10}"
    return f"{value:8.2f}x" + (" " if target is None else ("+" if value >= target else "!"))


def format_row(row: dict, providers) -> str:
    ratios = row["speedups"]
    training = row["mode"] == "fwd+bwd"
    return (f"{row['shape']:17} {row['dtype']:5} {row['mode']:7}"
            + "".join(_cell(row["results"].get(p)) for p in providers)
            + _ratio(ratios["vs_reference"], TARGET_VS_REFERENCE if training else None)
            + _ratio(ratios["vs_compile"], TARGET_VS_COMPILE if training else None)
            + _ratio(ratios["vs_torch"], None))


def run_table(shapes, dtypes, providers, device: str, budget_s: float, compile_budget_s: float) -> list[dict]:
    """Measures every (dtype, shape, mode) row, printing each as it completes."""
    started = time.perf_counter()
    compile_left = compile_budget_s
    print(f"{'':31}" + "".join(f"{p:>25}" for p in providers) + f"{'triton speed-up vs':>26}")
    print(f"{'shape':17} {'dtype':5} {'mode':7}" + f"{'time    GB/s    peak':>25}" * len(providers)
          + f"{'reference':>10}{'compile':>10}{'torch':>10}")
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            for mode in MODES:
                results = {}
                for provider in providers:
                    over_budget = time.perf_counter() - started > budget_s
                    if over_budget or (provider == "compile" and compile_left <= 0):
                        results[provider] = None
                        continue
                    results[provider] = measure(shape, DTYPES[dtype], mode, provider, device)
                    if provider == "compile":
                        compile_left -= results[provider]["first_call_s"]
                        torch._dynamo.reset()  # one static compile per case; keep the cache small
                rows.append({"shape": shape.name, "dims": asdict(shape), "dtype": dtype, "mode": mode,
                             "results": results, "speedups": speedups(results)})
                print(format_row(rows[-1], providers), flush=True)
    return rows


def summary(rows: list[dict], copy_gbs: float | None) -> dict:
    """The issue's targets: fwd+bwd speed-ups at every measured row, forward vs copy bandwidth."""
    training = [r for r in rows if r["mode"] == "fwd+bwd"]
    vs_reference = [r["speedups"]["vs_reference"] for r in training]
    vs_compile = [r["speedups"]["vs_compile"] for r in training]
    forward = {r["dtype"]: r["results"].get("triton") for r in rows
               if r["shape"] == COPY_TARGET_CASE and r["mode"] == "fwd"}
    out = {
        "copy_GBs": copy_gbs,
        "fwd_dec1_512_GBs": {dtype: result["GBs"] if result else None for dtype, result in forward.items()},
        "fwd_dec1_512_fraction_of_copy": {dtype: result["GBs"] / copy_gbs if result and copy_gbs else None
                                          for dtype, result in forward.items()},
        "min_fwd_bwd_speedup_vs_reference": min((x for x in vs_reference if x), default=None),
        "min_fwd_bwd_speedup_vs_compile": min((x for x in vs_compile if x), default=None),
        "unmeasured_fwd_bwd_comparisons": sum(x is None for x in vs_reference + vs_compile),
    }
    print()
    if copy_gbs:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    for dtype, fraction in out["fwd_dec1_512_fraction_of_copy"].items():
        if fraction is not None:
            print(f"triton forward {COPY_TARGET_CASE} {dtype}: {out['fwd_dec1_512_GBs'][dtype]:.0f} GB/s = "
                  f"{100 * fraction:.0f}% of copy bandwidth (target >= {100 * TARGET_COPY_FRACTION:.0f}%)")
    for key, target in (("min_fwd_bwd_speedup_vs_reference", TARGET_VS_REFERENCE),
                        ("min_fwd_bwd_speedup_vs_compile", TARGET_VS_COMPILE)):
        if out[key] is not None:
            print(f"{key}: {out[key]:.2f}x (target >= {target}x)")
    if out["unmeasured_fwd_bwd_comparisons"]:
        print(f"{out['unmeasured_fwd_bwd_comparisons']} fwd+bwd comparisons unmeasured (skipped cells)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of " + ", ".join(DTYPES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--budget-s", type=float, default=85.0,
                        help="skip the remaining measurements once this many seconds have passed")
    parser.add_argument("--compile-budget-s", type=float, default=30.0,
                        help="seconds of torch.compile compilation allowed")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32), all providers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on this machine's device (CPU ok)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32

    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = tuple(args.providers.split(","))
    dtypes = tuple(args.dtypes.split(","))
    if device == "cpu":
        if not args.smoke:
            print("transposed_attention_table: needs a CUDA device (use --smoke for a CPU check of the script)")
            return 2
        providers = tuple(p for p in providers if p != "compile")  # a CPU compile takes minutes
        dtypes = ("fp32",)  # the interpreter has no bf16
    shapes = SMOKE_SHAPES if args.smoke else SHAPES

    started = time.perf_counter()
    copy_gbs = copy_bandwidth_gbs(device)
    rows = run_table(shapes, dtypes, providers, device, args.budget_s, args.compile_budget_s)
    report = {
        "rows": rows,
        "summary": summary(rows, copy_gbs),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "fp32_triton_precision": "tf32" if args.tf32 else "3xTF32",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "providers": providers,
        "elapsed_s": time.perf_counter() - started,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
