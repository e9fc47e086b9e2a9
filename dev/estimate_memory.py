"""Peak memory of a refinement or a training step, estimated on the CPU with fake CUDA tensors.

    python dev/estimate_memory.py refine --size 512x512 [--backend reference] [--top 12] [--traffic 12]
    python dev/estimate_memory.py train --batch 8 --patch 128 [--amp] [--backend reference]

No GPU is needed: the full model runs on FakeTensors that claim to be CUDA tensors, so the
dispatch takes the CUDA routes (the triton backend's custom ops run their fake kernels) and
nothing is computed. A dispatch mode counts the bytes of every storage the call creates while
it is alive; the report is the peak and the largest storages alive at the peak, with the op
and the sipl_fast lines that made them. It matched the H200's allocator within 1 % for the
reference loop at 512x512 (2348 vs 2368 MiB) and within 0.5 % for four training steps (fp32
and bf16, reference and auto backends; docs/performance.md, section "Memory estimator"),
and read 20-25 % low for the stripped refinement (allocator rounding and cuBLAS workspaces
weigh more against its small strips), so compare estimates with estimates.
"train" stops after the forward passes (the autograd engine needs a real device for the
backward): it reports what the step holds for the backward, the bulk of a training peak.
Autocast is switched on directly (torch.autocast disables itself without a GPU).

It also counts the kernels the call would launch (ops that are neither views nor no-ops) and
the bytes they read and write (each input and output once, as the op sees it: a lower bound
for convolutions and GEMMs, exact for elementwise passes); ``--traffic N`` lists the N op
kinds that move the most. Bytes over a card's copy bandwidth bound the time from below, and at
equal efficiency per byte the ratio of two calls' traffic predicts the ratio of their times.
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.refine import authors_loop


COPY_BANDWIDTH = 4.228e12  # bytes/s read + written, device-to-device copy on an H200 (docs/performance.md)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still alive; their peak and makers."""

    def __init__(self):
        super().__init__()
        self.makers = weakref.WeakKeyDictionary()  # storage -> (bytes, op, shape, call site)
        self.live = self.peak = 0
        self.ops = 0  # calls dispatched (views and metadata ops included)
        self.at_peak: list = []
        self.kernels = 0  # calls that would launch a kernel
        self.traffic = Counter()  # op kind -> bytes read and written
        self.kernels_by_kind = Counter()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        self._count_traffic(func, args, kwargs, out)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.makers:
                continue  # a view of a storage already counted
            nbytes = storage.nbytes()
            frames = [f for f in traceback.extract_stack(limit=30) if "sipl_fast" in f.filename]
            site = " < ".join(f"{f.name}:{f.lineno}" for f in frames[::-1][:3])
            self.makers[storage] = (nbytes, str(func), tuple(t.shape), site)
            weakref.finalize(storage, self._freed, nbytes)
            self.live += nbytes
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = sorted(self.makers.values(), key=lambda m: -m[0])[:64]
        return out

    def _count_traffic(self, func, args, kwargs, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs or func.__name__.startswith(("empty", "lift_fresh", "detach")):
            return
        storages = {t.untyped_storage()._cdata for t in inputs}
        if not func._schema.is_mutable and all(t.untyped_storage()._cdata in storages for t in outputs):
            return  # a view, or an op that returned its input (.to, .contiguous): no kernel
        kind = _kind(func, args)
        self.kernels += 1
        self.kernels_by_kind[kind] += 1
        self.traffic[kind] += sum(t.numel() * t.element_size() for t in inputs + outputs)


def _kind(func, args) -> str:
    """The op's name; convolutions by their kernel (1x1, depthwise 3x3, dense 3x3)."""
    name = func.__name__.split(".")[0]
    if name in ("convolution", "conv2d") and len(args) > 1:
        weight = args[1]
        depthwise = weight.shape[1] == 1 and weight.shape[0] > 1 and weight.shape[-1] > 1
        return f"{name} {'depthwise ' if depthwise else ''}{weight.shape[-2]}x{weight.shape[-1]}"
    return name


def estimate(task: str, backend: str, size=(512, 512), batch: int = 8, patch: int = 128, amp: bool = False,
             preset: str = "base") -> LiveBytes:
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # the dictionary cache's key
    with FakeTensorMode():
        with torch.device("cuda"):
            model = SIPLPromptIR.from_preset(preset)
        tracker = LiveBytes()
        if task == "refine":
            model.eval()
            x = torch.rand(1, 3, *size, device="cuda")
            with tracker, sipl_fast.use_backend(backend), torch.no_grad():
                if backend == "reference":
                    authors_loop(model, x, steps=2)
                else:
                    model.refine(x, steps=2)
            return tracker
        gt = torch.rand(batch, 3, patch, patch, device="cuda")
        lq = torch.rand(batch, 3, patch, patch, device="cuda")
        previous_dtype = torch.get_autocast_dtype("cuda")
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            with tracker, sipl_fast.use_backend(backend):
                torch.set_autocast_enabled("cuda", amp)
                with torch.no_grad():
                    privileged = model.encode(model(gt))
                restored = model(lq, privileged_features=privileged)
                torch.set_autocast_enabled("cuda", False)
                F.l1_loss(restored.float(), gt)
        finally:
            torch.set_autocast_enabled("cuda", False)
            torch.set_autocast_dtype("cuda", previous_dtype)
        return tracker


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("refine", "train"))
    parser.add_argument("--backend", default="auto", help="auto (the CUDA routes), torch or reference")
    parser.add_argument("--size", default="512x512", help="refine: HxW")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--amp", action="store_true", help="train: bf16 autocast")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--traffic", type=int, default=0, metavar="N",
                        help="also list the N op kinds that read and write the most bytes")
    args = parser.parse_args(argv)
    size = tuple(int(s) for s in args.size.split("x"))
    tracker = estimate(args.task, args.backend, size, args.batch, args.patch, args.amp, args.preset)
    what = f"refine steps=2 {args.size}" if args.task == "refine" else \
        f"training step (forward, held for the backward) batch {args.batch} {args.patch}px {'bf16' if args.amp else 'fp32'}"
    print(f"{what}, {args.preset} preset, backend {args.backend}: peak {tracker.peak / 2**20:.1f} MiB "
          f"beyond the weights (estimated on fake CUDA tensors), {tracker.ops} ops dispatched")
    for nbytes, op, shape, site in tracker.at_peak[:args.top]:
        print(f"  {nbytes / 2**20:9.1f} MiB  {op} {shape}  {site}")
    if args.traffic:
        total = sum(tracker.traffic.values())
        print(f"{tracker.kernels} kernels reading and writing {total / 1e9:.1f} GB "
              f"({1e3 * total / COPY_BANDWIDTH:.0f} ms at the H200's copy bandwidth)")
        for kind, nbytes in tracker.traffic.most_common(args.traffic):
            print(f"  {nbytes / 1e9:9.2f} GB  {tracker.kernels_by_kind[kind]:6d} kernels  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
