"""The ``sipl-fast`` command line (also ``python -m sipl_fast``).

    sipl-fast demo [--steps N] [--out DIR] [--seed S]
    sipl-fast train --data skimage|DIR|paired:DEG_DIR,CLEAN_DIR --tasks 3task --config tiny|base
                    --steps N --batch B --patch P --out DIR [--resume] [--amp] [--ema 0.999] ...
    sipl-fast restore INPUT... --checkpoint CKPT --out DIR [--steps 2] [--tile SIZE --overlap PX] [--overwrite]
    sipl-fast eval --checkpoint CKPT --data ... --tasks ... [--steps 2]
    sipl-fast info

Problems with the user's files (a corrupted or mismatched checkpoint, an unreadable image,
missing data, an output folder that cannot be written) and a diverged training run print one
``sipl-fast: error: ...`` line on stderr and exit with status 1, without a traceback. Inputs,
options and output paths are checked before the work starts and before any output file is
written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .data.datasets import DataError
from .images import ImageReadError
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
    from .demo import run_demo

    run_demo(steps=args.steps, out=args.out, seed=args.seed, eval_size=args.eval_size, progress=not args.no_progress)


def cmd_train(args) -> None:
    from .train import TrainOptions, train

    options = TrainOptions(data=args.data, tasks=args.tasks, preset=args.config, steps=args.steps, batch=args.batch,
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


def _output_paths(inputs: list[Path], out: Path) -> dict[Path, Path]:
    """input -> out/<stem>.png; refuses collisions and any output that is an input file."""
    targets: dict[Path, Path] = {}
    for path in inputs:
        target = out / f"{path.stem}.png"
        # samefile also catches symlinks and hard links to an input.
        if target.exists() and any(os.path.samefile(target, p) for p in inputs):
            raise UsageError(f"{path}: its output {target} would overwrite an input; choose another --out")
        if target in targets.values():
            other = next(p for p, t in targets.items() if t == target)
            raise UsageError(f"{path} and {other} would both be written to {target}; restore them separately")
        targets[path] = target
    return targets


def _check_restore_targets(targets: dict[Path, Path], overwrite: bool) -> None:
    """Refuses a target that is a folder, and one that exists unless --overwrite (every target
    is distinct, so an existing one was not written by this run)."""
    for path, target in targets.items():
        if target.is_dir():
            raise UsageError(f"{target}: the output of {path} would replace a folder; choose another --out")
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it, or choose another --out")


def cmd_restore(args) -> None:
    from tqdm.auto import tqdm

    from .checkpoint import load_model
    from .images import read_image, write_png
    from .refine import Refiner

    if args.tile is not None and (args.tile < 8 or args.tile % 8 or not 0 <= args.overlap < args.tile):
        raise UsageError(f"--tile must be a multiple of 8 and 0 <= --overlap < --tile "
                         f"(got {args.tile}, {args.overlap})")
    if args.steps < 0:
        raise UsageError("--steps must be >= 0")
    device = _device(args.device, args.cuda_graph)
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    check_output_folder(out)
    targets = _output_paths(inputs, out)
    _check_restore_targets(targets, args.overwrite)
    # Every input is decoded once before anything is written (decoding is cheap next to
    # restoring; holding every image in memory would not be).
    for path in tqdm(inputs, desc="check inputs", disable=len(inputs) < 2 or args.no_progress, leave=False):
        height, width = read_image(path).size
        if height < 2 or width < 2:
            raise UsageError(f"{path}: {height}x{width} is too small to restore (at least 2x2 pixels)")
    model, _ = load_model(args.checkpoint, device=device)
    # One refiner for every file: its iteration state, and with --cuda-graph its captured step,
    # serve each image (or tile) of the same size again.
    refiner = Refiner(model, steps=args.steps, tile=args.tile, overlap=args.overlap, cuda_graph=args.cuda_graph)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    for path in tqdm(inputs, desc="restore", disable=len(inputs) < 2 or args.no_progress):
        image = read_image(path)
        restored = refiner(image.rgb[None].to(device))
        try:
            write_png(targets[path], restored[0].cpu(), image.alpha, image.grayscale, image.bit_depth, image.exif,
                      image.icc_profile)
        except OSError as exc:
            raise UsageError(f"{targets[path]}: cannot write ({exc.strerror or exc})") from None
        print(f"{path} -> {targets[path]} ({image.size[1]}x{image.size[0]}, {image.bit_depth}-bit"
              f"{', grayscale' if image.grayscale else ''}{', alpha kept' if image.alpha is not None else ''})")


def cmd_eval(args) -> None:
    from .checkpoint import load_model
    from .data.datasets import open_source
    from .data.degradations import resolve_tasks
    from .train import evaluate, format_table

    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as exc:
        raise UsageError(f"--tasks: {exc}") from None
    if args.steps < 0:
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
    model, meta = load_model(args.checkpoint, device=_device(args.device, args.cuda_graph))
    samples = open_source(args.data).eval_set(tasks, args.size or None, seed=args.seed)
    evaluation = evaluate(model, samples, steps=args.steps, progress=not args.no_progress, cuda_graph=args.cuda_graph)
    print(f"PSNR (dB) / SSIM, {args.checkpoint} on {args.data}:")
    print(format_table(evaluation))
    if args.json:
        from .images import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(evaluation.to_dict(), indent=2).encode())


def cmd_info(args) -> None:
    import sipl_fast

    report = sipl_fast.info()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key.ljust(width)}  {value}")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .data.degradations import TASK_SETS

    parser = argparse.ArgumentParser(prog="sipl-fast", description="SIPL-PromptIR: train, restore, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the tiny model on bundled photos and show refinement (main job)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    demo.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-size", type=int, default=None, help="centre crop of the held-out photos (default 128)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)

    train = commands.add_parser("train", help="train a model (runs under torchrun for DDP)")
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

    restore = commands.add_parser("restore", help="restore image files of any size")
    restore.add_argument("inputs", nargs="+", help="PNG / JPEG / TIFF files, 8 or 16 bits (grayscale, alpha and colour profiles kept)")
    restore.add_argument("--checkpoint", required=True, help="checkpoint.safetensors, its folder, or a BasicSR .pth")
    restore.add_argument("--out", required=True, help="output folder; files are written as <name>.png")
    restore.add_argument("--steps", type=int, default=2, help="self-refinement steps (0: plain pass)")
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
    evaluate.add_argument("--steps", type=int, default=2)
    evaluate.add_argument("--size", type=int, default=256, help="centre crop size (0: whole images)")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the synthetic degradations")
    evaluate.add_argument("--json", default=None, help="also write the scores to this JSON file")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--cuda-graph", action="store_true",
                          help="replay a captured refinement step (CUDA; pays where samples share a size, e.g. --size)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    info = commands.add_parser("info", help="build and backend report")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":   # the demo's defaults live in sipl_fast.demo
        from .demo import DEFAULT_STEPS, EVAL_SIZE

        args.steps = DEFAULT_STEPS if args.steps is None else args.steps
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
