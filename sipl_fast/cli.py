"""The ``sipl-fast`` command line (also ``python -m sipl_fast``).

    sipl-fast demo [--compare] [--arch ARCH] [--steps N] [--out DIR] [--seed S]
    sipl-fast train [--arch ARCH] --data skimage|DIR|paired:DEG_DIR,CLEAN_DIR --tasks 3task --config tiny|base
                    --steps N --batch B --patch P --out DIR [--resume] [--amp] [--ema 0.999] ...
    sipl-fast restore FILE|DIR|GLOB... --checkpoint CKPT --out DIR [--recursive] [--steps 2] [--tol T]
                      [--save-steps] [--format png|tiff|same] [--precision fp32|bf16|fp16] [--tile SIZE]
                      [--overwrite | --skip-existing]
    sipl-fast eval --checkpoint CKPT --data ... --tasks ... [--steps 2]
    sipl-fast export --checkpoint CKPT --format onnx|torch-export [--refine-steps T] --out FILE
    sipl-fast info

ARCH is sipl-promptir (default), sipl-adair or promptir (sipl_fast.model.ARCHITECTURES). ``eval``
and ``restore`` take the architecture from the checkpoint (``--arch`` only names it for files
that record none, such as the authors' BasicSR files); on a plain PromptIR they run the plain
pass (refinement steps need Proxy Fusion).

Problems with the user's files (a corrupted or mismatched checkpoint, an unreadable image,
missing data, an output folder that cannot be written) and a diverged training run print one
``sipl-fast: error: ...`` line on stderr and exit with status 1, without a traceback. Inputs,
options and output paths are checked before the work starts and before any output file is
written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data.datasets import DataError
from .images import ImageReadError
from .model import ARCHITECTURES, DEFAULT_ARCH, NO_PROXY_FUSION
from .train import OptionsError, TrainingDiverged, available_device, check_output_folder

USER_ERRORS = (CheckpointError, DataError, ImageReadError, OptionsError, TrainingDiverged)


class UsageError(ValueError):
    """Arguments that argparse cannot check on its own."""


def _device(option: str | None, cuda_graph: bool = False):
    """--device (train.available_device: one error for a bad name or an absent device), and
    one for --cuda-graph off CUDA."""
    device = available_device(option)
    if cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device (got {device})")
    return device


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> None:
    from .demo import run_compare, run_demo

    if args.compare:
        if args.arch is not None:
            raise UsageError("--compare trains sipl-promptir and promptir; leave --arch out")
        run_compare(steps=args.steps, out=args.out, seed=args.seed, eval_size=args.eval_size,
                    progress=not args.no_progress)
    else:
        run_demo(steps=args.steps, out=args.out, seed=args.seed, eval_size=args.eval_size,
                 progress=not args.no_progress, arch=args.arch or DEFAULT_ARCH)


def _load(args, device):
    """The checkpoint's model and metadata (architecture from the file, --arch for files that
    record none), and the refinement steps: --steps, by default 2 where the network has Proxy
    Fusion and 0 where it has none; steps > 0 on a network without Proxy Fusion are refused."""
    from .checkpoint import load_model

    model, meta = load_model(args.checkpoint, device=device, arch=args.arch)
    steps = args.steps if args.steps is not None else (2 if model.proxy_fusion else 0)
    if steps and not model.proxy_fusion:
        raise UsageError(f"{args.checkpoint}: {NO_PROXY_FUSION} (--steps {steps}; use --steps 0)")
    return model, meta, steps


def cmd_train(args) -> None:
    from .train import TrainOptions, train

    options = TrainOptions(arch=args.arch, data=args.data, tasks=args.tasks, preset=args.config, steps=args.steps,
                           batch=args.batch,
                           patch=args.patch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                           clip=args.clip, ema=args.ema, amp=args.amp, cuda_graph=args.cuda_graph,
                           channels_last=args.channels_last,
                           random_proxy=args.random_proxy,
                           seed=args.seed, out=args.out, resume=args.resume, overwrite=args.overwrite,
                           save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
                           eval_size=args.eval_size or None, workers=args.workers, device=args.device,
                           progress=not args.no_progress, graph_kernels=args.graph_kernels,
                           nonfinite_patience=args.nonfinite_patience, check_data=args.check_data)
    trainer = train(options)
    if trainer.dist.is_main:
        print(f"wrote {Path(args.out) / 'checkpoint.safetensors'} (step {trainer.step})")
    if trainer.dist.enabled:
        # Every file is written and the process group destroyed. A gloo rank's interpreter
        # teardown can still abort ("terminate called without an active exception": gloo's
        # worker threads meet a finalising interpreter; it happened about once in ten CI runs,
        # with an exit code that fails the launch), so a distributed run ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cmd_restore(args) -> None:
    import functools

    import torch
    from tqdm.auto import tqdm

    from .images import read_image
    from .refine import Refiner
    from .restore import RestoreError, check_targets, collect_inputs, plan, run

    if args.tile is not None and (args.tile < 8 or args.tile % 8 or not 0 <= args.overlap < args.tile):
        raise UsageError(f"--tile must be a multiple of 8 and 0 <= --overlap < --tile "
                         f"(got {args.tile}, {args.overlap})")
    if args.steps is not None and args.steps < 0:
        raise UsageError("--steps must be >= 0")
    if args.tol is not None and not (args.tol >= 0 and math.isfinite(args.tol)):
        raise UsageError(f"--tol must be a finite number >= 0, got {args.tol}")
    if args.tol is not None and (args.save_steps or args.cuda_graph):
        raise UsageError("--tol stops images early: it cannot be combined with --save-steps or --cuda-graph")
    device = _device(args.device, args.cuda_graph)
    dtype = getattr(torch, PRECISIONS[args.precision])
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    out = Path(args.out)
    check_output_folder(out)
    try:
        inputs = collect_inputs(args.inputs, args.recursive)
        plan(inputs, out, args.format)  # names and formats checked before the model loads
        model, _, steps = _load(args, device)
        jobs = plan(inputs, out, args.format, save_steps=steps if args.save_steps else None)
        todo = check_targets(jobs, args.overwrite, args.skip_existing)
    except RestoreError as exc:
        raise UsageError(str(exc)) from None
    # Every input is decoded once before anything is written (decoding is cheap next to
    # restoring; holding every image in memory would not be).
    for job in tqdm(todo, desc="check inputs", disable=len(todo) < 2 or args.no_progress, leave=False):
        height, width = read_image(job.source).size
        if height < 2 or width < 2:
            raise UsageError(f"{job.source}: {height}x{width} is too small to restore (at least 2x2 pixels)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None

    # One refiner per step count for every file: its iteration state, and with --cuda-graph its
    # captured step, serve each image (or tile) of the same size again.
    @functools.lru_cache(maxsize=None)
    def make_refiner(step_count: int):
        return Refiner(model, steps=step_count, tile=args.tile, overlap=args.overlap, tol=args.tol,
                       cuda_graph=args.cuda_graph, dtype=None if dtype == torch.float32 else dtype)

    try:
        summary = run(todo, make_refiner, device, steps, save_steps=args.save_steps, tiled=args.tile is not None,
                      progress=not args.no_progress, skipped=len(jobs) - len(todo))
    except RestoreError as exc:
        raise UsageError(str(exc)) from None
    print(summary.line())


def cmd_eval(args) -> None:
    from .data.datasets import open_source
    from .data.degradations import resolve_tasks
    from .train import evaluate, format_table

    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as exc:
        raise UsageError(f"--tasks: {exc}") from None
    if args.steps is not None and args.steps < 0:
        raise UsageError("--steps must be >= 0")
    if args.size and args.size < 8:
        raise UsageError(f"--size must be at least 8 (or 0: whole images), got {args.size}")
    if args.json:   # before the evaluation, not after it
        report = Path(args.json)
        if report.is_dir():
            raise UsageError(f"--json {report}: is a folder")
        if not report.parent.is_dir():
            raise UsageError(f"--json {report}: the folder {report.parent} does not exist")
        if not os.access(report.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--json {report}: the folder {report.parent} is not writable")
    model, meta, steps = _load(args, _device(args.device, args.cuda_graph))
    samples = open_source(args.data).eval_set(tasks, args.size or None, seed=args.seed)
    evaluation = evaluate(model, samples, steps=steps, progress=not args.no_progress, cuda_graph=args.cuda_graph)
    print(f"PSNR (dB) / SSIM, {args.checkpoint} ({meta['arch']}) on {args.data}:")
    print(format_table(evaluation))
    if args.json:
        from .images import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(evaluation.to_dict(), indent=2).encode())


def cmd_export(args) -> None:
    from .checkpoint import load_model
    from .export import FORMATS, ExportError, export

    if args.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.refine_steps is not None and args.refine_steps < 0:
        raise UsageError(f"--refine-steps must be >= 0, got {args.refine_steps}")
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not checkpoint.exists():
        raise UsageError(f"--checkpoint {checkpoint}: no such file or folder")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; name the file to write")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    model, meta = load_model(checkpoint, device="cpu", arch=args.arch)
    steps = args.refine_steps if args.refine_steps is not None else (2 if model.proxy_fusion else 0)
    if steps and not model.proxy_fusion:
        raise UsageError(f"{checkpoint}: {NO_PROXY_FUSION} (--refine-steps {steps}; use --refine-steps 0)")
    try:
        written = export(model, out, args.format, refine_steps=steps)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {written} ({args.format}, {meta['arch']}, {steps} refinement steps)")


def cmd_info(args) -> None:
    import sipl_fast

    report = sipl_fast.info()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key.ljust(width)}  {value}")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .data.degradations import TASK_SETS

    arch_names = list(ARCHITECTURES)
    file_arch = (f"{' | '.join(arch_names)}: names the architecture of a checkpoint that records none (e.g. the "
                 f"authors' BasicSR .pth; default {DEFAULT_ARCH}); must agree with one that records it")
    parser = argparse.ArgumentParser(prog="sipl-fast", description="SIPL-PromptIR: train, restore, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the tiny model on bundled photos and show refinement (main job)")
    demo.add_argument("--compare", action="store_true",
                      help="train sipl-promptir and plain promptir alike and compare them side by side")
    demo.add_argument("--arch", choices=arch_names, default=None, help=f"network to train (default {DEFAULT_ARCH})")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    demo.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-size", type=int, default=None, help="centre crop of the held-out photos (default 128)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    train = commands.add_parser("train", help="train a model (runs under torchrun for DDP)")
    train.add_argument("--arch", choices=arch_names, default=DEFAULT_ARCH,
                       help=f"network (default {DEFAULT_ARCH}; promptir: the plain baseline, no refinement)")
    train.add_argument("--data", default="skimage", help="skimage | DIR | paired:DEG_DIR,CLEAN_DIR")
    train.add_argument("--tasks", default="3task", help=f"{' | '.join(TASK_SETS)} | comma list of degradations")
    train.add_argument("--config", default="tiny", choices=("tiny", "base"), help="model preset")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch", type=int, default=8, help="batch size per process")
    train.add_argument("--patch", type=int, default=None, help="crop size (default: the preset's, 64 tiny / 128 base)")
    train.add_argument("--out", required=True, help="folder for checkpoint.safetensors and resume.pt")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    train.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    train.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="replay the training step as a CUDA graph (default: on a single GPU process; "
                            "--no-cuda-graph steps eagerly)")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC activations (default: on the CPU, where oneDNN's convolutions are faster "
                            "on them; off on CUDA, where --channels-last makes cuDNN run the depthwise convolutions)")
    train.add_argument("--ema", type=float, default=0.0, help="EMA decay, e.g. 0.999 (0: off)")
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of --steps)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    train.add_argument("--random-proxy", action="store_true", help="the authors' use_random_proxy")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: at the end)")
    train.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    train.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: none)")
    train.add_argument("--eval-size", type=int, default=256, help="validation crop size (0: whole images)")
    train.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--no-graph-kernels", dest="graph_kernels", action="store_false",
                       help="a captured training step records the kernels eager steps run (default: the graph "
                            "kernels, see ops.graph_kernels)")
    train.add_argument("--nonfinite-patience", type=int, default=0,
                       help="non-finite steps in a row skipped before training stops (default 0: stop at the first)")
    train.add_argument("--check-data", action=argparse.BooleanOptionalAction, default=True,
                       help="read every training image once before the first step (default: on)")
    train.set_defaults(run=cmd_train)

    restore = commands.add_parser("restore", help="restore images of any size: files, folders, patterns")
    restore.add_argument("inputs", nargs="+",
                         help="image files (PNG, JPEG, TIFF, 8 or 16 bits; grayscale, alpha and colour profiles "
                              "kept), folders of them, or glob patterns ('scans/**/*.tif')")
    restore.add_argument("--recursive", action="store_true", help="also restore the images in subfolders of folders")
    restore.add_argument("--checkpoint", required=True, help="checkpoint.safetensors, its folder, or a BasicSR .pth")
    restore.add_argument("--out", required=True,
                         help="output folder; each output keeps its input's path relative to the inputs' common folder")
    restore.add_argument("--format", choices=("png", "tiff", "same"), default="png",
                         help="output format (16-bit inputs stay 16-bit in png and tiff; same: the input's format)")
    restore.add_argument("--save-steps", action="store_true",
                         help="also write each refinement step's image (NAME_step0 is the plain pass)")
    restore.add_argument("--tol", type=float, default=None,
                         help="stop refining an image once its mean change per step is <= TOL")
    restore.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                         help="compute precision (bf16: CPU and CUDA; fp16: CUDA); outputs are float32")
    restore.add_argument("--skip-existing", action="store_true",
                         help="skip inputs whose outputs exist already (instead of refusing)")
    restore.add_argument("--arch", choices=arch_names, default=None, help=file_arch)
    restore.add_argument("--steps", type=int, default=None,
                         help="self-refinement steps (0: plain pass; default 2, 0 for promptir)")
    restore.add_argument("--tile", type=int, default=None, help="restore in tiles of this size (multiple of 8)")
    restore.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    restore.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    restore.add_argument("--device", default=None)
    restore.add_argument("--cuda-graph", action="store_true",
                         help="replay a captured refinement step (CUDA; pays where images or --tile tiles share a size)")
    restore.add_argument("--no-progress", action="store_true")
    restore.set_defaults(run=cmd_restore)

    evaluate = commands.add_parser("eval", help="PSNR/SSIM per task and refinement step")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", default="skimage",
                          help="skimage (held-out photos) | DIR | paired:DEG_DIR,CLEAN_DIR")
    evaluate.add_argument("--tasks", default="3task", help="degradations for clean data (ignored for paired data)")
    evaluate.add_argument("--arch", choices=arch_names, default=None, help=file_arch)
    evaluate.add_argument("--steps", type=int, default=None,
                          help="refinement steps reported after step 0 (default 2, 0 for promptir)")
    evaluate.add_argument("--size", type=int, default=256, help="centre crop size (0: whole images)")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the synthetic degradations")
    evaluate.add_argument("--json", default=None, help="also write the scores to this JSON file")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--cuda-graph", action="store_true",
                          help="replay a captured refinement step (CUDA; pays where samples share a size, e.g. --size)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    exporter = commands.add_parser("export", help="write the whole refinement as one ONNX or torch.export file")
    exporter.add_argument("--checkpoint", required=True, help="checkpoint.safetensors, its folder, or a BasicSR .pth")
    exporter.add_argument("--arch", choices=arch_names, default=None, help=file_arch)
    exporter.add_argument("--format", required=True, help="onnx | torch-export")
    exporter.add_argument("--refine-steps", type=int, default=None,
                          help="refinement steps unrolled in the graph (default: 2; 0 without Proxy Fusion)")
    exporter.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    exporter.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    exporter.set_defaults(run=cmd_export)

    info = commands.add_parser("info", help="build and backend report")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":   # the demo's defaults live in sipl_fast.demo
        from .demo import COMPARE_STEPS, DEFAULT_STEPS, EVAL_SIZE

        default_steps = COMPARE_STEPS if args.compare else DEFAULT_STEPS
        args.steps = default_steps if args.steps is None else args.steps
        args.eval_size = EVAL_SIZE if args.eval_size is None else args.eval_size
    try:
        args.run(args)
    except USER_ERRORS + (UsageError,) as exc:
        print(f"sipl-fast: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:   # any other filesystem problem: one line naming the path
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sipl-fast: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sipl-fast: interrupted (a training run continues from its last save with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
