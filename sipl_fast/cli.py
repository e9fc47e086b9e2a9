"""The ``sipl-fast`` command line (also ``python -m sipl_fast``).

    sipl-fast demo [--compare] [--arch ARCH] [--iters N] [--out DIR] [--seed S]
    sipl-fast train --out RUN [--data SPEC ...] [--val-data SPEC --val-every N] [--preset tiny|base]
                    [--iters N] [--batch B] [--options FILE.json|yaml] [--init-from CKPT] [--tensorboard] ...
    sipl-fast train --out RUN --resume [--iters N]
    sipl-fast restore FILE|DIR|GLOB... --checkpoint CKPT --out DIR [--recursive] [--refine-steps 2] [--tol T]
                      [--save-steps] [--format png|tiff|same] [--precision fp32|bf16|fp16] [--tile SIZE]
                      [--overwrite | --skip-existing]
    sipl-fast eval --checkpoint CKPT [--data SPEC ...] [--protocol promptir|basicsr] [--refine-steps 2]
                   [--csv FILE] [--save-images DIR] [--precision fp32|bf16|fp16]
    sipl-fast export --checkpoint CKPT --format onnx|torch-export [--refine-steps T] --out FILE
    sipl-fast info

SPEC (``--data``, ``--val-data``): ``skimage``, ``DIR``, ``paired:LQ_DIR,GT_DIR``, ``promptir:ROOT``
or ``cdd11:ROOT`` (sipl_fast.data.datasets). Earlier spellings still work with a note on stderr:
``--config`` (now ``--preset``), ``--steps`` (now ``--iters`` in train and demo, ``--refine-steps``
in restore and eval), ``--eval-every`` / ``--eval-size`` (now ``--val-every`` / ``--val-size``).

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

import torch

from .checkpoint import CheckpointError
from .data.datasets import DataError
from .images import ImageReadError
from .model import ARCHITECTURES, DEFAULT_ARCH, NO_PROXY_FUSION
from .train import OptionsError, TrainingDiverged, available_device, check_output_folder

USER_ERRORS = (CheckpointError, DataError, ImageReadError, OptionsError, TrainingDiverged)


class UsageError(ValueError):
    """Arguments that argparse cannot check on its own."""


def renamed(new_flag: str):
    """An argparse action for an earlier spelling of ``new_flag``: stores into the new option
    and says once on stderr that the spelling changed."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"sipl-fast: note: {option_string} is now {new_flag} (the old spelling still works)",
                  file=sys.stderr)
            setattr(namespace, self.dest, values)
    return Renamed


def float_list(text: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0] (argparse reports a ValueError as an invalid value)."""
    return [float(part) for part in text.split(",")]


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
        run_compare(steps=args.iters, out=args.out, seed=args.seed, eval_size=args.eval_size,
                    progress=not args.no_progress)
    else:
        run_demo(steps=args.iters, out=args.out, seed=args.seed, eval_size=args.eval_size,
                 progress=not args.no_progress, arch=args.arch or DEFAULT_ARCH)


def _load(args, device):
    """The checkpoint's model and metadata (architecture from the file, --arch for files that
    record none), and the refinement steps: --refine-steps, by default 2 where the network has
    Proxy Fusion and 0 where it has none; steps > 0 on a network without Proxy Fusion are refused."""
    from .checkpoint import load_model

    model, meta = load_model(args.checkpoint, device=device, arch=args.arch)
    steps = args.refine_steps if args.refine_steps is not None else (2 if model.proxy_fusion else 0)
    if steps and not model.proxy_fusion:
        raise UsageError(f"{args.checkpoint}: {NO_PROXY_FUSION} (--refine-steps {steps}; use --refine-steps 0)")
    return model, meta, steps


def cmd_train(args) -> None:
    from .train import option_names, read_options_file, run_options, train

    given = {name: value for name, value in vars(args).items() if name in option_names()}
    options_file = getattr(args, "options", None)
    if "out" not in given and not (options_file and "out" in read_options_file(options_file)):
        raise UsageError("--out is required: the run folder")
    options = run_options(given, options_file)
    trainer = train(options)
    if trainer.dist.is_main:
        print(f"wrote {Path(options.out) / 'checkpoint.safetensors'} (iteration {trainer.step})")
    if trainer.dist.enabled:
        # Every file is written and the process group destroyed. A gloo rank's interpreter
        # teardown can still abort ("terminate called without an active exception": gloo's
        # worker threads meet a finalising interpreter; it happened about once in ten CI runs,
        # with an exit code that fails the launch), so a distributed run ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _precision(option: str, device) -> torch.dtype:
    """--precision as a torch dtype; fp16 only on CUDA."""
    dtype = getattr(torch, PRECISIONS[option])
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    return dtype


def cmd_restore(args) -> None:
    import functools

    from tqdm.auto import tqdm

    from .images import read_image
    from .refine import Refiner
    from .restore import RestoreError, check_targets, collect_inputs, plan, run

    if args.tile is not None and (args.tile < 8 or args.tile % 8 or not 0 <= args.overlap < args.tile):
        raise UsageError(f"--tile must be a multiple of 8 and 0 <= --overlap < --tile "
                         f"(got {args.tile}, {args.overlap})")
    if args.refine_steps is not None and args.refine_steps < 0:
        raise UsageError("--refine-steps must be >= 0")
    if args.tol is not None and not (args.tol >= 0 and math.isfinite(args.tol)):
        raise UsageError(f"--tol must be a finite number >= 0, got {args.tol}")
    if args.tol is not None and (args.save_steps or args.cuda_graph):
        raise UsageError("--tol stops images early: it cannot be combined with --save-steps or --cuda-graph")
    device = _device(args.device, args.cuda_graph)
    dtype = _precision(args.precision, device)
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
    from .data.layouts import parse_pair_rule
    from .evaluation import EvaluationError, check_report_path, evaluate, format_table, write_csv
    from .train import ChainedSamples

    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as exc:
        raise UsageError(f"--tasks: {exc}") from None
    if args.refine_steps is not None and args.refine_steps < 0:
        raise UsageError("--refine-steps must be >= 0")
    if args.size and args.size < 16:
        raise UsageError(f"--size must be at least 16 (or 0: whole images), got {args.size}")
    if args.protocol != "basicsr" and (args.crop_border or args.y_channel):
        raise UsageError("--crop-border and --y-channel belong to --protocol basicsr")
    if args.crop_border < 0:
        raise UsageError(f"--crop-border must be >= 0, got {args.crop_border}")
    for flag, report in (("--json", args.json), ("--csv", args.csv)):   # before the evaluation, not after it
        if report:
            try:
                check_report_path(report, args.overwrite)
            except EvaluationError as exc:
                raise UsageError(f"{flag} {exc}") from None
    if args.save_images:
        check_output_folder(Path(args.save_images), "--save-images")
    device = _device(args.device, args.cuda_graph)
    dtype = _precision(args.precision, device)
    specs = args.data or ["skimage"]
    try:
        parse_pair_rule(args.pair_rule)
    except DataError as exc:
        raise UsageError(f"--pair-rule: {exc}") from None
    sets = [open_source(spec, pair_rule=args.pair_rule, skip_bad=args.skip_bad)
            .eval_set(tasks, size=args.size or None, seed=args.seed, uint8_noise=args.protocol == "promptir")
            for spec in specs]
    samples = sets[0] if len(sets) == 1 else ChainedSamples(sets)
    model, meta, steps = _load(args, device)
    try:
        evaluation = evaluate(model, samples, steps=steps, protocol=args.protocol, crop_border=args.crop_border,
                              y_channel=args.y_channel, dtype=None if dtype == torch.float32 else dtype,
                              progress=not args.no_progress, cuda_graph=args.cuda_graph,
                              save_images=args.save_images, overwrite=args.overwrite, pad_to=args.pad_to)
    except EvaluationError as exc:
        raise UsageError(str(exc)) from None
    print(f"PSNR (dB) / SSIM, {args.protocol} protocol, {args.checkpoint} ({meta['arch']}) on {' + '.join(specs)}:")
    print(format_table(evaluation))
    if args.csv:
        write_csv(evaluation, args.csv, overwrite=args.overwrite)
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
    from . import __version__

    parser = argparse.ArgumentParser(prog="sipl-fast", description="SIPL-PromptIR: train, restore, evaluate.")
    parser.add_argument("--version", action="version", version=f"sipl-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the tiny model on bundled photos and show refinement (main job)")
    demo.add_argument("--compare", action="store_true",
                      help="train sipl-promptir and plain promptir alike and compare them side by side")
    demo.add_argument("--arch", choices=arch_names, default=None, help=f"network to train (default {DEFAULT_ARCH})")
    demo.add_argument("--iters", type=int, default=None, help="training iterations (default: the demo's budget)")
    demo.add_argument("--steps", dest="iters", type=int, action=renamed("--iters"), help=argparse.SUPPRESS)
    demo.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-size", type=int, default=None, help="centre crop of the held-out photos (default 128)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    # Only the flags typed reach the options (argument_default=SUPPRESS): the defaults live in
    # TrainOptions, and a resumed run takes its recorded options for every flag not typed.
    train = commands.add_parser("train", help="train a model (runs under torchrun for DDP)",
                                argument_default=argparse.SUPPRESS,
                                description="Train a network. Options come from TrainOptions' defaults, then "
                                            "--options FILE, then the flags typed; --resume continues the run in "
                                            "--out with its recorded options.")
    train.add_argument("--options", help="read options from a JSON or YAML file (keys: the flags' long names)")
    train.add_argument("--arch", choices=arch_names,
                       help=f"network (default {DEFAULT_ARCH}; promptir: the plain baseline, no refinement)")
    train.add_argument("--data", action="append",
                       help="a training source, repeatable (sources are mixed): skimage | DIR (clean images) | "
                            "paired:LQ_DIR,GT_DIR | promptir:ROOT (official PromptIR Train tree) | cdd11:ROOT "
                            "(default: skimage)")
    train.add_argument("--data-weights", type=float_list,
                       help="probability weights of the --data sources, e.g. 1,1,2 (default: by their sizes)")
    train.add_argument("--pair-rule", help="how paired files match: stem (default) | rain | reside | key:REGEX")
    train.add_argument("--skip-bad", action="store_true",
                       help="skip unreadable or unmatched files with a warning and a count (default: stop)")
    train.add_argument("--tasks", help=f"degradations of clean-image sources: {' | '.join(TASK_SETS)} | comma list "
                                       "(default 3task)")
    train.add_argument("--preset", choices=("tiny", "base"), help="model preset (default tiny)")
    train.add_argument("--config", dest="preset", choices=("tiny", "base"), action=renamed("--preset"),
                       help=argparse.SUPPRESS)
    train.add_argument("--iters", type=int, help="training iterations (default 1000)")
    train.add_argument("--steps", dest="iters", type=int, action=renamed("--iters"), help=argparse.SUPPRESS)
    train.add_argument("--batch", type=int, help="batch size per process (default 8)")
    train.add_argument("--patch", type=int, help="crop size (default: the preset's, 64 tiny / 128 base)")
    train.add_argument("--out", help="run folder: checkpoints, options.json, train.log, metrics.csv (required)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out with its recorded options (flags typed change them: "
                            "--iters, logging, saving and validation freely, the others with --override)")
    train.add_argument("--override", action="store_true", help="let --resume change a recorded training option")
    train.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    train.add_argument("--init-from", help="start from these weights: the official PromptIR .ckpt, the authors' "
                                           "BasicSR .pth, or a checkpoint.safetensors (matching tensors loaded, "
                                           "the others left fresh and listed)")
    train.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    train.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                       help="replay the training step as a CUDA graph (default: on a single GPU process; "
                            "--no-cuda-graph steps eagerly)")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="NHWC activations (default: on the CPU, where oneDNN's convolutions are faster "
                            "on them; off on CUDA, where --channels-last makes cuDNN run the depthwise convolutions)")
    train.add_argument("--ema", type=float, help="EMA decay, e.g. 0.999 (default 0: off)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    train.add_argument("--warmup", type=int, help="warm-up iterations (default: 10%% of --iters)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    train.add_argument("--clip", type=float, help="max gradient norm (default 1; 0: off)")
    train.add_argument("--random-proxy", action="store_true", help="the authors' use_random_proxy")
    train.add_argument("--seed", type=int, help="seed of the weights and the data order (default 0)")
    train.add_argument("--save-every", type=int, help="iterations between checkpoints (default 500; 0: at the end)")
    train.add_argument("--keep", type=int, help="periodic checkpoints kept besides the latest and the best (default 0)")
    train.add_argument("--log-every", type=int, help="iterations between log lines and metrics rows (default 50)")
    train.add_argument("--val-data", action="append",
                       help="validation images, repeatable, same forms as --data (default: the held-out photos "
                            "of --data skimage); whole images, one at a time, PromptIR protocol")
    train.add_argument("--val-every", type=int, help="iterations between validations (default 0: none)")
    train.add_argument("--eval-every", dest="val_every", type=int, action=renamed("--val-every"),
                       help=argparse.SUPPRESS)
    train.add_argument("--val-size", type=int, help="centre crop of validation images (default 0: whole images)")
    train.add_argument("--eval-size", dest="val_size", type=int, action=renamed("--val-size"), help=argparse.SUPPRESS)
    train.add_argument("--val-steps", type=int, help="refinement steps validated after the plain pass (default 2)")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    train.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    train.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    train.add_argument("--no-graph-kernels", dest="graph_kernels", action="store_false",
                       help="a captured training step records the kernels eager steps run (default: the graph "
                            "kernels, see ops.graph_kernels)")
    train.add_argument("--nonfinite-patience", type=int,
                       help="non-finite steps in a row skipped before training stops (default 0: stop at the first)")
    train.add_argument("--check-data", action=argparse.BooleanOptionalAction,
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
    restore.add_argument("--refine-steps", type=int, default=None,
                         help="self-refinement steps (0: plain pass; default 2, 0 for promptir)")
    restore.add_argument("--steps", dest="refine_steps", type=int, action=renamed("--refine-steps"),
                         help=argparse.SUPPRESS)
    restore.add_argument("--tile", type=int, default=None, help="restore in tiles of this size (multiple of 8)")
    restore.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    restore.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    restore.add_argument("--device", default=None)
    restore.add_argument("--cuda-graph", action="store_true",
                         help="replay a captured refinement step (CUDA; pays where images or --tile tiles share a size)")
    restore.add_argument("--no-progress", action="store_true")
    restore.set_defaults(run=cmd_restore)

    evaluate = commands.add_parser("eval", help="PSNR/SSIM per task and refinement step, as the papers compute them")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", action="append",
                          help="repeatable: skimage (held-out photos, the default) | DIR (clean images, degraded by "
                               "--tasks) | paired:LQ_DIR,GT_DIR | promptir:ROOT | cdd11:ROOT")
    evaluate.add_argument("--pair-rule", default="stem", help="how paired files match: stem | rain | reside | key:REGEX")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip unreadable or unmatched files with a warning")
    evaluate.add_argument("--tasks", default="3task", help="degradations for clean images (ignored for paired data)")
    evaluate.add_argument("--protocol", choices=("promptir", "basicsr"), default="promptir",
                          help="promptir: the official PromptIR test code (crop to multiples of 16, float output "
                               "clipped to [0, 1], scikit-image PSNR/SSIM); basicsr: uint8 images, Gaussian SSIM, "
                               "--crop-border, --y-channel")
    evaluate.add_argument("--crop-border", type=int, default=0, help="pixels cut from each side (basicsr)")
    evaluate.add_argument("--y-channel", action="store_true", help="score the luma Y only (basicsr)")
    evaluate.add_argument("--pad-to", type=int, default=8,
                          help="pad whole images to this multiple for the network (basicsr; 16 as SIPL's released "
                               "test code)")
    evaluate.add_argument("--arch", choices=arch_names, default=None, help=file_arch)
    evaluate.add_argument("--refine-steps", type=int, default=None,
                          help="refinement steps reported after step 0 (default 2, 0 for promptir)")
    evaluate.add_argument("--steps", dest="refine_steps", type=int, action=renamed("--refine-steps"),
                          help=argparse.SUPPRESS)
    evaluate.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                          help="compute precision (bf16: CPU and CUDA; fp16: CUDA)")
    evaluate.add_argument("--size", type=int, default=0, help="centre crop size (default 0: whole images)")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the synthetic degradations")
    evaluate.add_argument("--csv", default=None, help="write one row of scores per image to this CSV file")
    evaluate.add_argument("--save-images", default=None,
                          help="write every refinement step's output to this folder (TASK/NAME_stepT.png)")
    evaluate.add_argument("--json", default=None, help="also write the scores to this JSON file")
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing --csv, --json, --save-images files")
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

        default_iters = COMPARE_STEPS if args.compare else DEFAULT_STEPS
        args.iters = default_iters if args.iters is None else args.iters
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
