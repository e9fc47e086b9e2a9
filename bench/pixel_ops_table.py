"""Do sipl_fast's Triton kernels for the per-pixel ops around the attentions pay? LayerNorm2d,
the FFN gates, the projection depthwise3x3(conv1x1(x)) and the feed-forward's projection and
gate gate(depthwise3x3(conv1x1(x))), whose kernel fuses the depthwise convolution and the gate
for inference (forward only); one table and a JSON file.

    python bench/pixel_ops_table.py OUT.json [--dtypes amp,fp32] [--compile-budget-s 25] [--ops pointwise_depthwise]
    python bench/pixel_ops_table.py OUT.json --smoke      # tiny shapes on CPU: checks the script

Providers: ``triton`` (sipl_fast's kernels), ``torch`` (sipl_fast.ops.torch_impl),
``reference`` (the authors' eager math) and ``compile`` (torch.compile of the reference, one
static compile per case). Modes: forward, and forward + backward (every input gradient).
Shapes: every LayerNorm2d / gate / projection site of SIPLPromptIR's plain pass that carries
real traffic, for a 128x128 batch-8 training step (``train128``) and a 512x512 batch-1
inference (``infer512``).
Dtypes: ``amp`` is bf16 activations with float32 parameters (the model under bf16 autocast;
the projection runs under torch.autocast), ``bf16`` all bf16, ``fp32`` all float32.

Each row gives per provider the median time (triton.testing.do_bench, L2 flushed between
reps) and the effective bandwidth (the bytes the op must move at least, over the time), then
triton's speed-up and, for fwd+bwd, the peak memory above the inputs of the measured providers
in column order. The totals weight each site by its calls per
plain forward pass, i.e. the time these ops cost in one pass of the model. The card's
device-to-device copy bandwidth is measured first as the ceiling. torch.compile is slow to
compile, so its cases stop when --compile-budget-s is spent (reported as skipped).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # the triton provider runs on CPU only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sipl_fast.ops import reference, torch_impl  # noqa: E402

import table_harness as harness  # noqa: E402

PROVIDERS = ("triton", "torch", "reference", "compile")
MODES = ("fwd", "fwd+bwd")
DTYPES = {  # name: (activation dtype, norm parameter dtype)
    "amp": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, torch.float32),
}
SCENARIOS = {"train128": (8, 128), "infer512": (1, 512), "smoke": (1, 16)}  # (batch, full-res side)
EPS = 1e-5


@dataclass(frozen=True)
class Site:
    op: str        # "layer_norm2d", "gated_gelu" (GDFN), "dual_gate" (DualGate FFN), "pointwise_depthwise",
                   # "projection_gate" or "projection_dual_gate" (ops.pointwise_depthwise_gate, GDFN / DualGate)
    name: str      # where it runs in SIPLPromptIR
    channels: int  # input channels: C for the norm and the projection, 2h for the gates
    scale: int     # resolution divisor: 1 is full resolution
    calls: int     # calls per plain forward pass of the default model (SPEC 1.4)
    hidden: int = 0  # the projection's output channels


# Norm sites: two per transformer block, two per Proxy-Fusion injection block at the stream's
# resolution (its third norm sees the fixed-size proxy). Gate sites: one GDFN (hidden
# int(2.66 C)) per block, the DualGate (hidden 2C) of cross_p1. The noise-level blocks (one
# each) and the dictionary side are left out.
SITES = (
    Site("layer_norm2d", "enc1", 48, 1, 8),
    Site("layer_norm2d", "dec1+refinement", 96, 1, 16),
    Site("layer_norm2d", "enc2+dec2+cross_p1", 96, 2, 26),
    Site("layer_norm2d", "enc3+dec3+cross_p2", 192, 4, 26),
    Site("layer_norm2d", "latent+cross_p3", 384, 8, 18),
    Site("gated_gelu", "enc1", 2 * 127, 1, 4),
    Site("gated_gelu", "dec1+refinement", 2 * 255, 1, 8),
    Site("gated_gelu", "enc2+dec2", 2 * 255, 2, 12),
    Site("gated_gelu", "enc3+dec3", 2 * 510, 4, 12),
    Site("gated_gelu", "latent", 2 * 1021, 8, 8),
    Site("dual_gate", "cross_p1", 2 * 192, 2, 1),
    # Projections: the MDTA's qkv (C -> 3C) and the GDFN's input (C -> 2 int(2.66 C)) per block.
    Site("pointwise_depthwise", "enc1 qkv", 48, 1, 4, hidden=144),
    Site("pointwise_depthwise", "enc1 ffn", 48, 1, 4, hidden=254),
    Site("pointwise_depthwise", "dec1+refinement qkv", 96, 1, 8, hidden=288),
    Site("pointwise_depthwise", "dec1+refinement ffn", 96, 1, 8, hidden=510),
    Site("pointwise_depthwise", "enc2+dec2 ffn", 96, 2, 12, hidden=510),
    Site("pointwise_depthwise", "enc3+dec3 ffn", 192, 4, 12, hidden=1020),
    # The feed-forward's projection and gate without autograd (the fused kernel's use).
    Site("projection_gate", "enc1 ffn", 48, 1, 4, hidden=254),
    Site("projection_gate", "dec1+refinement ffn", 96, 1, 8, hidden=510),
    Site("projection_gate", "enc2+dec2 ffn", 96, 2, 12, hidden=510),
    Site("projection_gate", "enc3+dec3 ffn", 192, 4, 12, hidden=1020),
    Site("projection_dual_gate", "cross_p1 ffn", 96, 2, 1, hidden=384),
)
OPS = ("layer_norm2d", "gated_gelu", "dual_gate", "pointwise_depthwise", "projection_gate", "projection_dual_gate")
INFERENCE_ONLY = ("projection_gate", "projection_dual_gate")  # no kernel for a backward: forward rows only
PROJECTIONS = ("pointwise_depthwise", *INFERENCE_ONLY)


def _triton_module(op: str):
    from sipl_fast.ops import (gated_gelu_triton, layer_norm2d_triton, pointwise_depthwise_gate_triton,
                               pointwise_depthwise_triton)
    return {"layer_norm2d": layer_norm2d_triton, "pointwise_depthwise": pointwise_depthwise_triton,
            "projection_gate": pointwise_depthwise_gate_triton,
            "projection_dual_gate": pointwise_depthwise_gate_triton}.get(op, gated_gelu_triton)


def op_function(site: Site, provider: str, dtype: str):
    """The op as provider computes it, taking the tensors made by :func:`make_inputs`."""
    module = {"torch": torch_impl, "reference": reference, "compile": reference}.get(provider)
    module = module or _triton_module(site.op)
    if site.op == "layer_norm2d":
        fn = lambda x, weight, bias: module.layer_norm2d(x, weight, bias, EPS)  # noqa: E731
    elif site.op == "pointwise_depthwise":
        def fn(*tensors):
            with torch.autocast(tensors[0].device.type, torch.bfloat16, enabled=dtype == "amp"):
                return module.pointwise_depthwise(*tensors)
    elif site.op in INFERENCE_ONLY:
        dual = site.op == "projection_dual_gate"

        def fn(*tensors):
            with torch.autocast(tensors[0].device.type, torch.bfloat16, enabled=dtype == "amp"):
                return module.pointwise_depthwise_gate(*tensors, dual)
    else:
        dual = site.op == "dual_gate"
        fn = lambda x: module.gated_gelu(x, dual)  # noqa: E731
    # A fresh, static graph per case: no recompile limit, no shapes made dynamic.
    return torch.compile(fn, dynamic=False) if provider == "compile" else fn


def site_shape(site: Site, scenario: str) -> tuple[int, int, int, int]:
    batch, side = SCENARIOS[scenario]
    size = max(side // site.scale, 1)
    return batch, site.channels, size, size


def make_inputs(site: Site, scenario: str, dtype: str, device: str, requires_grad: bool):
    activation, parameter = DTYPES[dtype]
    x = torch.randn(site_shape(site, scenario), device=device, dtype=activation)
    tensors = [x]
    if site.op == "layer_norm2d":
        tensors += [torch.randn(site.channels, device=device, dtype=parameter) + 1,
                    torch.randn(site.channels, device=device, dtype=parameter)]
    elif site.op in PROJECTIONS:
        tensors += [torch.randn(site.hidden, site.channels, 1, 1, device=device, dtype=parameter) / site.channels ** 0.5,
                    torch.randn(site.hidden, device=device, dtype=parameter),
                    torch.randn(site.hidden, 1, 3, 3, device=device, dtype=parameter) / 3,
                    torch.randn(site.hidden, device=device, dtype=parameter)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def min_bytes(site: Site, inputs, mode: str) -> int:
    """Bytes the op must read and write at least (parameters and partial sums neglected)."""
    x = inputs[0]
    if site.op in PROJECTIONS:  # as one fused op would: read x, write out (and back)
        out_channels = site.hidden // 2 if site.op in INFERENCE_ONLY else site.hidden
        out_bytes = x.numel() // site.channels * out_channels * x.itemsize
        forward = x.numel() * x.itemsize + out_bytes                  # read x, write out
        backward = 2 * x.numel() * x.itemsize + out_bytes             # read x, dout; write dx
    elif site.op == "layer_norm2d":
        out_size = torch.promote_types(x.dtype, inputs[1].dtype).itemsize
        forward = x.numel() * (x.itemsize + out_size)                 # read x, write y
        backward = x.numel() * (2 * x.itemsize + out_size)            # read x, dy; write dx
    else:
        forward = x.numel() * x.itemsize * 3 // 2                     # read x1, x2; write out
        backward = x.numel() * x.itemsize * 5 // 2                    # read x, dout; write dx
    return forward if mode == "fwd" else forward + backward


def make_runner(site: Site, scenario: str, dtype: str, mode: str, provider: str, device: str):
    """(a zero-argument callable running one op call in ``mode``, the inputs it uses)."""
    fn = op_function(site, provider, dtype)
    inputs = make_inputs(site, scenario, dtype, device, requires_grad=mode != "fwd")
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:
        out_shape = fn(*inputs).shape
        grad_out = torch.randn(out_shape, device=device, dtype=inputs[0].dtype)

        def run():
            out = fn(*inputs)
            return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return run, inputs


def measure(site: Site, scenario: str, dtype: str, mode: str, provider: str, device: str) -> dict:
    run, inputs = make_runner(site, scenario, dtype, mode, provider, device)
    first_call_s = harness.first_call_s(run, device)
    if device != "cuda":
        run()  # this table's CPU timing has always begun with a second warm-up call
    ms = harness.time_ms(run, device)
    return {
        "ms": ms,
        "GBps": min_bytes(site, inputs, mode) / ms / 1e6,
        "peak_MiB": harness.peak_mib(run, device) if mode != "fwd" else None,
        "first_call_s": first_call_s,
    }


def _format_row(row: dict, providers) -> str:
    results = row["results"]
    cells = "".join(f"{'-':>16}" if not results[p] else f"{results[p]['ms']:10.3f}{results[p]['GBps']:6.0f}"
                    for p in providers)
    speedups = [f"{results[other]['ms'] / results['triton']['ms']:.2f}x"
                if results.get("triton") and results.get(other) else "-"
                for other in ("torch", "reference", "compile")]
    peaks = [r["peak_MiB"] for r in results.values() if r and r["peak_MiB"] is not None]
    site = row["site"]
    return (f"{row['scenario']:9} {site['op']:12} {site['name']:20} {str(row['shape']):18} {row['dtype']:5} "
            f"{row['mode']:7}{cells}  {' / '.join(speedups)}"
            + ("  peak MiB " + "/".join(f"{v:.0f}" for v in peaks) if peaks else ""))


def run_table(scenarios, dtypes, providers, compile_budget_s: float, device: str, ops=OPS) -> dict:
    """Measure every (scenario, dtype, site, mode) row, printing each as it completes."""
    rows = []
    budget = harness.Budget(compile_seconds=compile_budget_s)
    print(f"{'':65}" + "".join(f"{p:>16}" for p in providers) + "  triton's speed-up vs")
    print(f"{'scenario':9} {'op':12} {'site':20} {'shape':18} {'dtype':5} {'mode':7}"
          + f"{'ms':>10}{'GB/s':>6}" * len(providers) + "  torch / ref / compile")
    for scenario in scenarios:
        for dtype in dtypes:
            for site in (site for site in SITES if site.op in ops):
                for mode in MODES[:1] if site.op in INFERENCE_ONLY else MODES:
                    results = budget.measure(
                        providers, lambda provider: measure(site, scenario, dtype, mode, provider, device),
                        skip=("compile",) if dtype != dtypes[0] else ())  # compile: the first dtype only
                    rows.append({"scenario": scenario, "dtype": dtype, "mode": mode,
                                 "shape": site_shape(site, scenario), "site": asdict(site), "results": results})
                    print(_format_row(rows[-1], providers), flush=True)
    return {"rows": rows, "totals": totals(rows, providers)}


def totals(rows, providers) -> list[dict]:
    """Per scenario, dtype and mode: sum over sites of calls x time, per provider (ms per pass)."""
    groups = {}
    for row in rows:
        key = (row["scenario"], row["dtype"], row["mode"])
        group = groups.setdefault(key, {p: 0.0 for p in providers})
        for provider in providers:
            result = row["results"].get(provider)
            if group[provider] is not None:
                group[provider] = None if result is None else group[provider] + row["site"]["calls"] * result["ms"]
    out = []
    print("\nms per plain forward pass, summed over the sites above (calls x time); '-' = a case was skipped")
    for (scenario, dtype, mode), sums in groups.items():
        out.append({"scenario": scenario, "dtype": dtype, "mode": mode, "ms_per_pass": sums})
        print(f"{scenario:9} {dtype:5} {mode:8}" + "".join(
            f"  {p} {'-' if v is None else f'{v:.2f}'}" for p, v in sums.items()))
    return out


def main(argv=None) -> int:
    parser = harness.table_parser(__doc__.split("\n")[0], DTYPES, PROVIDERS, default_dtypes="amp,fp32",
                                  compile_budget_s=10.0,
                                  compile_help=harness.COMPILE_HELP + " (first dtype only)")
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {', '.join(OPS)}")
    args = parser.parse_args(argv)
    chosen = harness.choose_device("pixel_ops_table", args)
    if chosen is None:
        return 2
    device, providers, dtypes = chosen
    scenarios = ("smoke",) if args.smoke else ("train128", "infer512")

    started = time.perf_counter()
    copy_gbps = harness.copy_bandwidth_gbs(device)
    if copy_gbps:
        print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)\n")
    ops = tuple(args.ops.split(",")) if args.ops else OPS
    if set(ops) - set(OPS):
        parser.error(f"--ops: unknown {sorted(set(ops) - set(OPS))}; choose from {', '.join(OPS)}")
    report = run_table(scenarios, dtypes, providers, args.compile_budget_s, device, ops)
    report.update({**harness.environment(device), "copy_GBps": copy_gbps})
    harness.write_report(args.out, report, providers, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
