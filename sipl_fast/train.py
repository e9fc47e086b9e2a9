"""Training and validation of the networks of ``sipl_fast.model.ARCHITECTURES`` (``arch``:
SIPL-PromptIR by default, SIPL-AdaIR, or the plain PromptIR baseline), on CPU, one GPU or torchrun.

One training step of a SIPL network, as the authors' ``optimize_parameters``:

1. under no_grad (stop-gradient), the model's own plain pass on the CLEAN image, then the
   privileged features of that output: ``pi = encode(model(gt))`` (same weights, no teacher);
2. the privileged pass on the degraded input: ``out = model(lq, privileged_features=pi)``;
3. L1 loss against the clean image; AdamW; gradient-norm clipping; linear warm-up then
   cosine decay of the learning rate; optional EMA of the weights (used for evaluation).

A network without Proxy Fusion (``promptir``) trains with PromptIR's step: the L1 loss of
``model(lq)`` against the clean image, no privileged pass; everything else is the same.

Note: the dictionaries start at zero, so the first step's gradient norm is huge
(~1e9 on the tiny preset). AdamW's update does not scale with the gradient, so this is
harmless; with clipping on, that first step moves the dictionaries almost alone.

Under ``torchrun`` the model is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on
CPU); each rank reads its own shard through a DistributedSampler, and only rank 0 writes
files. ``--batch`` is per process.

Resuming is exact: the batch of iteration s is a pure function of (seed, s) (see
``sipl_fast.data.datasets``), and the resume state holds the weights, EMA, optimizer,
scheduler, step and every rank's RNG state, so an interrupted run continued with
``--resume`` reaches bit-identical weights on the CPU.

Divergence guard: a step whose loss or gradient norm is not finite updates nothing; after
``nonfinite_patience`` such steps in a row (0: the first) training stops with
``TrainingDiverged`` naming the step, and nothing is saved from then on, so the last
checkpoint written stays as it was. Weights are checked for finite values before every save.
A step replayed from a CUDA graph has already updated the weights when its loss is read (one
step later, so that replays stay asynchronous): there the first non-finite step stops.

Options (``TrainOptions``) come from their defaults, then an options file (``--options``,
JSON or YAML), then the flags typed (``run_options``). The run folder records them in
``options.json`` with the log (``train.log``) and the metrics (``metrics.csv``; see
``sipl_fast.run_record``); ``--resume`` alone continues a run with its recorded options, and
refuses a changed training option unless ``--override`` (length, logging, saving, validation
and device options may change freely).

Validation (``--val-data``, every ``--val-every`` iterations) scores whole held-out images,
read one at a time, by the PromptIR protocol (``sipl_fast.evaluation``), per task and per
refinement step (step 0 is the plain pass, step t the output of t iterations of the authors'
self-refinement loop); ``best.safetensors`` keeps the weights with the highest average PSNR at
the last validated step.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import ops
from .checkpoint import (FORMAT, RESUME_NAME, WEIGHTS_NAME, CheckpointError, load_resume_state, save_resume_state,
                         save_weights)
from .data.datasets import DataError, EvalSample, mixed_training_set, open_source
from .data.degradations import resolve_tasks
from .data.layouts import parse_pair_rule
from .evaluation import Evaluation, evaluate, format_table
from .run_record import BEST_NAME, PERIODIC_NAME, RunRecord


class OptionsError(ValueError):
    """Training options that cannot work together; the message says which and why."""


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the weights became non-finite; the message names the step."""


@dataclass
class TrainOptions:
    """Everything a training run needs; the command line's ``train`` flags map onto these."""

    data: list[str] = field(default_factory=lambda: ["skimage"])   # --data specs, mixed (sipl_fast.data)
    data_weights: list[float] | None = None   # probability of each --data source (None: by size)
    pair_rule: str = "stem"         # how paired: sources match files (sipl_fast.data.datasets.PAIR_RULES)
    skip_bad: bool = False          # drop unreadable/unmatched files with a warning instead of stopping
    tasks: str = "3task"            # 3task | 5task | cdd11 | comma list of degradations (clean-image sources)
    arch: str = "sipl-promptir"     # a name of sipl_fast.model.ARCHITECTURES
    preset: str = "tiny"            # tiny | base (the authors' configuration)
    iters: int = 1000               # training iterations (optimizer steps)
    batch: int = 8                  # per process
    patch: int | None = None        # default: the preset's train_patch
    lr: float = 2e-4
    warmup: int | None = None       # default: 10% of the iterations (PromptIR: 15 of 150 epochs)
    weight_decay: float = 0.01      # AdamW's default, as PromptIR
    clip: float = 1.0               # max gradient norm; 0 turns clipping off
    ema: float = 0.0                # EMA decay (e.g. 0.999); 0 turns EMA off
    amp: bool = False               # bf16 autocast (CUDA only)
    cuda_graph: bool | None = None  # replay the whole step as a CUDA graph; None: on one CUDA
                                    # process (the eager step is bound by issuing kernels there)
    channels_last: bool | None = None  # NHWC activations; None: on the CPU (oneDNN's convolutions
                                       # are faster on them), not on CUDA
    random_proxy: bool = False      # the authors' use_random_proxy
    init_from: str | None = None    # start from these weights (official PromptIR .ckpt, BasicSR .pth, ours)
    seed: int = 0
    out: str = "runs/sipl"
    resume: bool = False
    overwrite: bool = False         # allow starting over in a folder that holds a run
    override: bool = False          # allow a resumed run to change a recorded option
    save_every: int = 500           # 0: only at the end
    keep: int = 0                   # periodic checkpoints kept besides the latest and the best
    log_every: int = 50
    val_data: list[str] | None = None   # validation specs (None: the held-out photos for --data skimage)
    val_every: int = 0              # 0: no validation during training
    val_size: int | None = None     # centre crop of validation images (None: whole images)
    val_steps: int = 2              # refinement steps validated after the plain pass
    tensorboard: bool = False       # also write TensorBoard event files
    workers: int = 0                # DataLoader worker processes
    device: str | None = None       # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True           # tqdm progress bar (rank 0)
    graph_kernels: bool = True      # a captured step records ops.graph_kernels("train") (False: what
                                    # eager steps run)
    nonfinite_patience: int = 0     # non-finite steps in a row that are skipped before training stops
    check_data: bool = True         # read every training image once before the first step

    def __post_init__(self):
        # one spec may be given as a string; a validation crop of 0 means whole images
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.val_data, str):
            self.val_data = [self.val_data]
        if self.val_size == 0:
            self.val_size = None


# Options that change the trajectory: a resumed run keeps them (unless --override).
TRAJECTORY = ("arch", "data", "data_weights", "pair_rule", "skip_bad", "tasks", "preset", "batch", "patch", "lr",
              "warmup", "weight_decay", "clip", "ema", "amp", "random_proxy", "seed")
# Options that describe one invocation, not the run: never recorded.
PER_INVOCATION = ("resume", "overwrite", "override", "out")
# Earlier names of options, still read from option files and old runs.
OPTION_ALIASES = {"steps": "iters", "config": "preset", "eval_every": "val_every", "eval_size": "val_size",
                  "eval_steps": "val_steps"}


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainOptions))


def canonical_options(options: dict, source: str) -> dict:
    """``options`` with dashes read as underscores and earlier names mapped to today's;
    OptionsError naming ``source`` for an unknown name."""
    known, canonical = option_names(), {}
    for name, value in options.items():
        key = OPTION_ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        if key not in known:
            raise OptionsError(f"{source}: unknown option {name!r}")
        canonical[key] = value
    return canonical


def read_options_file(path: str | os.PathLike) -> dict:
    """Options from a JSON or YAML file (``--options``): a mapping of option names to values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionsError(f"--options {path}: cannot read ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            options = yaml.safe_load(text)
        else:
            options = json.loads(text)
    except Exception as exc:   # JSON and YAML parsers raise their own types
        raise OptionsError(f"--options {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                           f"({str(exc).splitlines()[0]})") from None
    if not isinstance(options, dict):
        raise OptionsError(f"--options {path}: expected a mapping of option names to values")
    return canonical_options(options, f"--options {path}")


def run_options(given: dict, options_file: str | None = None) -> TrainOptions:
    """The options of a run: the defaults, then ``options_file``, then ``given`` (the flags typed).

    With ``resume``, the run's recorded options (``options.json`` in ``out``) replace the
    defaults and the file; a typed or file option that differs from a recorded one is refused
    unless ``override``, except the options of ``RESUMABLE`` (length, logging, saving,
    validation cadence, devices), which a resumed run may change freely.
    """
    from .run_record import OPTIONS_NAME, read_options

    chosen = read_options_file(options_file) if options_file else {}
    chosen.update(canonical_options(given, "options"))
    if not chosen.get("resume"):
        return TrainOptions(**chosen)
    out = Path(chosen.get("out", TrainOptions.out))
    recorded_path = out / OPTIONS_NAME
    if not recorded_path.exists():
        if not (out / RESUME_NAME).exists():
            raise CheckpointError(f"{out}: no training run to resume (no {OPTIONS_NAME} or {RESUME_NAME})")
        return TrainOptions(**chosen)   # a run recorded before options.json: the flags as typed
    try:
        recorded = canonical_options(read_options(recorded_path), str(recorded_path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    changed = [f"--{name.replace('_', '-')} {recorded[name]!r} -> {value!r}" for name, value in chosen.items()
               if name in recorded and name not in RESUMABLE + PER_INVOCATION and recorded[name] != value]
    if changed and not chosen.get("override"):
        raise OptionsError(f"--resume continues {out} with its recorded options; changed: {', '.join(changed)} "
                           "(pass --override to change them anyway)")
    return TrainOptions(**{**recorded, **chosen})


# Options a resumed run may change without --override.
RESUMABLE = ("iters", "save_every", "keep", "log_every", "val_data", "val_every", "val_size", "val_steps",
             "tensorboard", "workers", "device", "progress", "nonfinite_patience", "check_data", "cuda_graph",
             "graph_kernels", "init_from")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_options(opts: TrainOptions) -> None:
    """OptionsError for the first option no run can use, before anything is built or read."""
    from .model import architecture

    _check_types(opts)
    try:
        network = architecture(opts.arch)
    except ValueError as exc:
        raise OptionsError(f"--arch: {exc}") from None
    if opts.preset not in network.PRESETS:
        raise OptionsError(f"--preset {opts.preset!r}: {opts.arch} has the presets {', '.join(network.PRESETS)}")
    if not network.proxy_fusion and opts.random_proxy:
        raise OptionsError(f"--random-proxy needs Proxy Fusion; {opts.arch} has none")
    if not (_is_number(opts.lr) and opts.lr > 0):
        raise OptionsError(f"--lr must be a positive finite number, got {opts.lr}")
    if not (_is_number(opts.ema) and 0 <= opts.ema < 1):
        raise OptionsError(f"--ema must be in [0, 1) (e.g. 0.999; 0 turns EMA off), got {opts.ema}")
    for flag, value in (("--weight-decay", opts.weight_decay), ("--clip", opts.clip)):
        if not (_is_number(value) and value >= 0):
            raise OptionsError(f"{flag} must be a finite number >= 0, got {value}")
    if opts.iters < 1 or opts.batch < 1:
        raise OptionsError(f"--iters and --batch must be positive, got {opts.iters} and {opts.batch}")
    counts = (("--warmup", opts.warmup), ("--save-every", opts.save_every), ("--log-every", opts.log_every),
              ("--val-every", opts.val_every), ("--val-steps", opts.val_steps), ("--workers", opts.workers),
              ("--keep", opts.keep), ("--nonfinite-patience", opts.nonfinite_patience))
    for flag, value in counts:
        if value is not None and value < 0:
            raise OptionsError(f"{flag} must be >= 0, got {value}")
    if opts.patch and (opts.patch < 8 or opts.patch % 8):
        raise OptionsError(f"--patch must be a positive multiple of 8, got {opts.patch}")
    if opts.val_size is not None and opts.val_size < 16:   # the PromptIR protocol crops to multiples of 16
        raise OptionsError(f"--val-size must be at least 16 (or 0: whole images), got {opts.val_size}")
    if not opts.data:
        raise OptionsError("--data: give at least one data source")
    try:
        parse_pair_rule(opts.pair_rule)
    except DataError as exc:
        raise OptionsError(f"--pair-rule: {exc}") from None
    if opts.data_weights is not None:
        if len(opts.data_weights) != len(opts.data):
            raise OptionsError(f"--data-weights: {len(opts.data_weights)} weights for {len(opts.data)} --data sources")
        if not all(_is_number(w) and w > 0 for w in opts.data_weights):
            raise OptionsError(f"--data-weights must be positive finite numbers, got {opts.data_weights}")
    if opts.val_every and opts.val_data is None and opts.data != ["skimage"]:
        raise OptionsError("--val-every needs --val-data (held-out images; only --data skimage has its own)")
    if opts.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise OptionsError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


_OPTION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(opts: TrainOptions) -> None:
    """OptionsError for a value of the wrong type (options files and Python callers)."""
    for spec in dataclasses.fields(TrainOptions):
        value, kinds = getattr(opts, spec.name), [k.strip() for k in spec.type.split("|")]
        flag = f"--{spec.name.replace('_', '-')}"
        if value is None and "None" in kinds:
            continue
        if kinds[0].startswith("list["):
            item = _OPTION_TYPES[kinds[0][5:-1]]
            if isinstance(value, list) and all(isinstance(v, item) and not (bool not in item and isinstance(v, bool))
                                               for v in value):
                continue
            raise OptionsError(f"{flag}: expected a list of {kinds[0][5:-1]}, got {value!r}")
        expected = _OPTION_TYPES[kinds[0]]
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            raise OptionsError(f"{flag}: expected {' or '.join(k for k in kinds if k != 'None')}, got {value!r}")


def check_output_folder(folder: Path, flag: str = "--out") -> None:
    """OptionsError unless ``folder`` is, or can be created as, a writable folder (creates nothing)."""
    if folder.exists() and not folder.is_dir():
        raise OptionsError(f"{flag} {folder}: exists and is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OptionsError(f"{flag} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionsError(f"{flag} {folder}: {existing} is not writable")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warm-up, cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Distributed:
    """Where this process sits in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_type: str) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(option: str | None) -> torch.device:
    """The training device: ``option``, else CUDA when available, else the CPU.

    A CUDA device always gets an index (this process's LOCAL_RANK under torchrun):
    torch.cuda.set_device and the NCCL collectives need one.
    """
    if option is not None:
        try:
            device = torch.device(option)
        except RuntimeError:
            raise OptionsError(f"--device: {option!r} is not a device (cpu, cuda or cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise OptionsError(f"--device {option}: sipl-fast runs on cpu or cuda")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def available_device(option: str | None) -> torch.device:
    """pick_device's device, which must exist (one error where CUDA is absent)."""
    device = pick_device(option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"--device {option}: CUDA is not available")
    return device


VALIDATION_SEED = 1234  # the synthetic degradations of validation images are the same at every validation


class ChainedSamples(Sequence):
    """Several evaluation sets read as one (each item still loaded when indexed)."""

    def __init__(self, parts: Sequence[Sequence[EvalSample]]):
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int) -> EvalSample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)


GRAPH_WARMUP_STEPS = 2  # eager steps before the training step is captured (--cuda-graph)


class CapturedStep:
    """One training step captured in a CUDA graph, with static input buffers.

    Replaying runs the plain pass, privileged pass, backward, clipping and AdamW update with
    one launch: at SIPL's training sizes the eager step is bound by the CPU issuing thousands
    of small kernels. The captured kernels read the weights, gradients, optimizer state and
    learning rate in place, so every replay is a real step on the current weights.
    """

    def __init__(self, trainer: "Trainer", lq: torch.Tensor, gt: torch.Tensor):
        self.lq, self.gt = lq.clone(), gt.clone()
        self.graph = torch.cuda.CUDAGraph()
        trainer.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        # (the dictionary cache works only inside refinement calls: the graph recomputes everything)
        with ops.kernels_forced(*trainer.graph_kernels()), torch.cuda.graph(self.graph):
            self.loss, self.finite = trainer._optimizer_step(self.lq, self.gt, guard=False)

    def matches(self, lq: torch.Tensor, gt: torch.Tensor) -> bool:
        return lq.shape == self.lq.shape and gt.shape == self.gt.shape

    def replay(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.lq.copy_(lq, non_blocking=True)
        self.gt.copy_(gt, non_blocking=True)
        self.graph.replay()
        return self.loss.clone(), self.finite.clone()


@dataclass
class LogEntry:
    step: int
    loss: float
    lr: float
    seconds: float


def _in_layout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """t (N, C, H, W) with the strides of memory_format. For channels_last they are set
    explicitly: .contiguous() keeps the strides of a weight that already satisfies the format
    because of its size-1 dimensions (depthwise (C, 1, 3, 3), 1x1 kernels), whereas NHWC
    convolutions give its gradient the canonical strides, and DDP reports the mismatch."""
    if memory_format != torch.channels_last:
        return t.contiguous(memory_format=memory_format)
    _, channels, height, width = t.shape
    strides = (channels * height * width, 1, width * channels, channels)
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


class Trainer:
    """Builds the model, data, optimizer and schedule from ``TrainOptions`` and runs training."""

    def __init__(self, options: TrainOptions, log: Callable[[str], None] | None = None):
        from .model import architecture

        self.options = opts = copy.deepcopy(options)
        validate_options(opts)
        self.device = available_device(opts.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)   # NCCL collectives use the current device
        self.dist = Distributed.from_environment(self.device.type)
        one_cuda_process = self.device.type == "cuda" and not self.dist.enabled
        self.cuda_graph = one_cuda_process if opts.cuda_graph is None else opts.cuda_graph
        if self.cuda_graph and not one_cuda_process:
            raise OptionsError("--cuda-graph needs a single CUDA process (not the CPU, not torchrun)")
        self._log = log or (lambda line: tqdm.write(line))
        self.out = Path(opts.out)
        self.record = RunRecord(self.out, write=self.dist.is_main, tensorboard=opts.tensorboard)
        try:
            self.tasks = resolve_tasks(opts.tasks)
        except ValueError as exc:
            raise OptionsError(f"--tasks: {exc}") from None
        if self.dist.is_main:
            check_output_folder(self.out)
        self.use_amp = opts.amp and self.device.type == "cuda"
        if opts.amp and not self.use_amp:
            self.log("--amp ignored: bf16 autocast is used on CUDA only")

        torch.manual_seed(opts.seed)              # identical initial weights on every rank
        network = architecture(opts.arch)
        proxy_options = dict(use_random_proxy=opts.random_proxy) if network.proxy_fusion else {}
        self.model = network.from_preset(opts.preset, **proxy_options).to(self.device)
        channels_last = opts.channels_last if opts.channels_last is not None else self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for parameter in self.model.parameters():  # the convolution weights follow the activations
            if parameter.dim() == 4:
                parameter.data = _in_layout(parameter.data, self.memory_format)
        self.patch = opts.patch or self.model.config["train_patch"]
        if self.patch % 8 or self.patch < 8:
            raise OptionsError(f"--patch must be a positive multiple of 8, got {self.patch}")
        self.warmup = opts.warmup if opts.warmup is not None else max(1, opts.iters // 10)
        if opts.init_from and not opts.resume:   # before DDP, which broadcasts rank 0's weights
            from .checkpoint import init_from

            self.init_report = init_from(self.model, opts.init_from)
            self.log(self.init_report.summary())
        self.network = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        self.sources = [open_source(spec, pair_rule=opts.pair_rule, skip_bad=opts.skip_bad) for spec in opts.data]
        self.dataset = mixed_training_set(self.sources, self.tasks, self.patch, opts.seed, weights=opts.data_weights)
        # without --val-data, only the bundled photos have held-out images of their own
        self.val_specs = opts.val_data if opts.val_data is not None else (["skimage"] if opts.data == ["skimage"] else [])
        self._val_samples = None
        if opts.val_data is not None and self.dist.is_main:
            self.validation_samples()   # validation files are checked now, not at the first validation
        if opts.check_data:   # a corrupt file fails now, not when first sampled hours later
            self.dataset.check(progress=opts.progress and self.dist.is_main)
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=opts.seed, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // opts.batch
        if self.batches_per_epoch == 0:
            raise OptionsError(f"--batch {opts.batch} is larger than the {len(self.sampler)} samples per epoch")

        # capturable AdamW keeps its step counts in device memory (a captured step needs that)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay,
                                           capturable=self.cuda_graph)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, opts.iters, self.warmup))
        self._settle_learning_rates()
        self._captured: CapturedStep | None = None
        self._warm_steps = 0
        self.ema = ({k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
                    if opts.ema > 0 else None)
        self.step = 0
        self.saved_step: int | None = None   # the step of the last checkpoint this run wrote
        self._nonfinite_steps = 0            # non-finite steps in a row
        self.history: list[LogEntry] = []
        self.best: dict | None = None        # {"iter", "psnr"} of best.safetensors

        if opts.resume:
            self._load_resume_state()
        elif (self.out / RESUME_NAME).exists() and not opts.overwrite:
            raise CheckpointError(f"{self.out} already holds a training run ({RESUME_NAME}); pass --resume to "
                                  "continue it, --overwrite to start over, or choose another --out")
        # Each rank draws its own random numbers (use_random_proxy) after the shared init.
        if not opts.resume:
            torch.manual_seed(opts.seed + 1 + self.dist.rank)

    # ------------------------------------------------------------------ logging
    def log(self, line: str) -> None:
        if self.dist.is_main:
            self._log(line)
            self.record.log(line)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        # A CUDA graph cannot keep autocast's cache of casted weights across replays.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp, cache_enabled=not self.cuda_graph)

    def graph_kernels(self) -> tuple[str, ...]:
        """The ops whose kernels a captured step records (options.graph_kernels)."""
        return ops.graph_kernels("train") if self.options.graph_kernels else ()

    def train_step(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached) L1 loss. An eager step whose
        loss or gradient norm is not finite updates nothing (see the module docstring)."""
        return self._train_step(lq, gt)[0]

    def _train_step(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """train_step's loss and a bool tensor: loss and gradient norm were finite."""
        self.model.train()
        lq, gt = (t.contiguous(memory_format=self.memory_format) for t in (lq, gt))  # the layout propagates
        loss, finite = self._graphed_step(lq, gt) if self.cuda_graph else self._optimizer_step(lq, gt)
        self.scheduler.step()
        if self.ema is not None:
            current = self.model.state_dict()
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.values()), [current[k].float() for k in self.ema],
                                     1.0 - self.options.ema)
        return loss, finite

    def _optimizer_step(self, lq: torch.Tensor, gt: torch.Tensor,
                        guard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, clipping and the AdamW update: everything a CUDA graph captures.
        Returns the loss and whether it and the gradient norm are finite; ``guard`` (eager
        steps) skips the update when they are not (one device sync)."""
        if self.model.proxy_fusion:
            with torch.no_grad(), self._autocast():
                # PI from the model's own plain pass on the clean image (stop-gradient).
                privileged = self.model.encode(self.model(gt))
            with self._autocast():
                restored = self.network(lq, privileged_features=privileged)
        else:   # PromptIR's step: the plain pass only
            with self._autocast():
                restored = self.network(lq)
        loss = F.l1_loss(restored.float(), gt)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.options.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip)
        else:
            norm = torch.nn.utils.get_total_norm(gradients)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if guard and self.dist.enabled:   # every rank skips, or none does
            agreed = finite.to(torch.float32)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            finite = agreed.bool()
        if guard and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach(), finite
        self.optimizer.step()
        return loss.detach(), finite

    def _graphed_step(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """The step replayed from a CUDA graph: the first GRAPH_WARMUP_STEPS run eagerly on a
        side stream (optimizer state, Triton autotuning, cuDNN plans), then one is captured."""
        if self._captured is not None and self._captured.matches(lq, gt):
            return self._captured.replay(lq, gt)
        if self._captured is None and self._warm_steps >= GRAPH_WARMUP_STEPS:
            self._captured = CapturedStep(self, lq, gt)
            return self._captured.replay(lq, gt)
        # warm-up, or a batch of another shape (capturable AdamW also runs eagerly)
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        # the kernels the capture records compile and autotune here
        with torch.cuda.stream(side), ops.kernels_forced(*self.graph_kernels()):
            result = self._optimizer_step(lq, gt)
        main.wait_stream(side)
        self._warm_steps += 1
        return result

    # ------------------------------------------------------------------ data
    def _batches(self, start_step: int):
        """Batches from ``start_step`` on, epoch after epoch; the order depends only on the seed."""
        opts = self.options
        step = start_step
        while True:
            epoch, offset = divmod(step, self.batches_per_epoch)
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            indices = list(self.sampler)
            batches = [indices[i * opts.batch:(i + 1) * opts.batch] for i in range(offset, self.batches_per_epoch)]
            # A private generator keeps the DataLoader from drawing from the global RNG.
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=opts.workers,
                                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))
            for batch in loader:
                yield batch
                step += 1

    # ------------------------------------------------------------------ loop
    def run(self, until: int | None = None, on_step: Callable[[int, torch.Tensor], None] | None = None,
            time_limit: float | None = None) -> None:
        """Train up to iteration ``until`` (default: ``options.iters``), then save.

        ``on_step(step, loss)`` is called after every step (e.g. to record the loss curve).
        ``time_limit`` (seconds, single process only) stops earlier once training has taken
        that long (the number of steps then depends on the machine's speed).
        """
        opts = self.options
        until = opts.iters if until is None else min(until, opts.iters)
        if time_limit is not None and self.dist.enabled:
            raise OptionsError("time_limit would stop DDP ranks at different steps; use it in one process only")
        if self.step >= until:
            return
        self._open_records()
        parameters = sum(p.numel() for p in self.model.parameters())
        self.log(f"training {opts.arch} {opts.preset} ({parameters:,} parameters) on "
                 f"{' + '.join(opts.data)} [{', '.join(self.dataset.tasks)}]: iterations {self.step}->{until}, "
                 f"batch {opts.batch} x {self.dist.world_size} process(es), patch {self.patch}, device {self.device}")
        self._reset_peak_memory()
        bar = tqdm(total=until, initial=self.step, disable=not (opts.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True, leave=False)
        start = tick = time.perf_counter()
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        pending = None  # a replayed step's (step, loss, finite), read one step later
        for batch in self._batches(self.step):
            loss, finite = self._train_step(batch["lq"].to(self.device, non_blocking=True),
                                            batch["gt"].to(self.device, non_blocking=True))
            self.step += 1
            if self.cuda_graph:   # reading the flag now would wait for the replay
                pending, previous = (self.step, loss, finite), pending
                if previous is not None:
                    self._check_finite(*previous)
            elif not self._check_finite(self.step, loss, finite):
                loss = torch.zeros_like(loss)   # a skipped step adds nothing to the logged mean
                loss_count -= 1
            loss_sum += loss
            loss_count += 1
            bar.update(1)
            if on_step is not None:
                on_step(self.step, loss)
            out_of_time = time_limit is not None and time.perf_counter() - start >= time_limit
            stop = self.step == until or out_of_time
            if pending is not None and (stop or self._saves_or_evaluates(self.step)):
                self._check_finite(*pending)
                pending = None
            if self.step % max(1, opts.log_every) == 0 or stop:
                mean = self._mean_over_ranks(loss_sum / max(1, loss_count))
                entry = LogEntry(self.step, mean, float(self.scheduler.get_last_lr()[0]),
                                 time.perf_counter() - tick)
                self.history.append(entry)
                bar.set_postfix(loss=f"{mean:.4f}")
                images_per_s = loss_count * opts.batch * self.dist.world_size / entry.seconds
                memory = self._peak_memory_mib()
                self.log(f"iter {entry.step}/{opts.iters}  loss {entry.loss:.4f}  lr {entry.lr:.2e}  "
                         f"{images_per_s:.1f} images/s" + (f"  peak {memory:.0f} MiB" if memory is not None else ""))
                self.record.training_row(entry.step, entry.loss, entry.lr, images_per_s, memory)
                loss_sum, loss_count, tick = torch.zeros((), device=self.device), 0, time.perf_counter()
                self._reset_peak_memory()
            if opts.val_every and self.step % opts.val_every == 0 and self.dist.is_main:
                self.validate()
            if out_of_time and self.step < until:
                self.log(f"time limit of {time_limit:.0f} s reached: stopping at step {self.step} of {until}")
            if stop:
                break
            if opts.save_every and self.step % opts.save_every == 0:
                self.save()
        bar.close()
        self.save()

    def _saves_or_evaluates(self, step: int) -> bool:
        opts = self.options
        return bool((opts.save_every and step % opts.save_every == 0)
                    or (opts.val_every and step % opts.val_every == 0))

    def _open_records(self) -> None:
        """options.json, train.log, metrics.csv (and TensorBoard) once, at the first run()."""
        if getattr(self, "_records_open", False):
            return
        self._records_open = True
        self.record.start(resumed_at=self.step if self.options.resume else None)
        recorded = {k: v for k, v in asdict(self.options).items() if k not in PER_INVOCATION}
        # the resolved values, so that a run resumed with more --iters keeps its warm-up and patch
        self.record.save_options(recorded | {"warmup": self.warmup, "patch": self.patch})

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_memory_mib(self) -> float | None:
        """The CUDA allocator's peak since the last reset, or the process's peak resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            import resource
        except ImportError:   # not on every platform
            return None
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux

    def _check_finite(self, step: int, loss: torch.Tensor, finite: torch.Tensor) -> bool:
        """Whether step ``step`` was finite; TrainingDiverged once the patience is used up (at
        once for replayed steps, whose update cannot be skipped). Under DDP every rank holds
        the same flag (``_optimizer_step`` agrees on it)."""
        if bool(finite):
            self._nonfinite_steps = 0
            return True
        self._nonfinite_steps += 1
        if self.cuda_graph or self._nonfinite_steps > self.options.nonfinite_patience:
            kept = (f"the checkpoint of step {self.saved_step} in {self.out} is kept"
                    if self.saved_step is not None else "nothing was saved")
            raise TrainingDiverged(f"training diverged at step {step}: the loss ({float(loss):.4g}) or a gradient "
                                   f"is not finite; stopped ({kept}); try a lower --lr"
                                   + ("" if self.cuda_graph else " or a --nonfinite-patience above "
                                      f"{self.options.nonfinite_patience}"))
        self.log(f"step {step}: the loss or a gradient is not finite; update skipped "
                 f"({self._nonfinite_steps} of {self.options.nonfinite_patience} in a row)")
        return False

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.dist.world_size
        return float(value)

    # ------------------------------------------------------------------ validation
    def validation_samples(self) -> Sequence[EvalSample]:
        """The validation images (``--val-data``; the held-out photos for ``--data skimage``),
        read one at a time when evaluated; their files are checked when first asked for."""
        if self._val_samples is None:
            if not self.val_specs:
                raise OptionsError("no validation data: pass --val-data")
            opts = self.options
            sets = [open_source(spec, pair_rule=opts.pair_rule, skip_bad=opts.skip_bad)
                    .eval_set(self.tasks, size=opts.val_size, seed=VALIDATION_SEED, uint8_noise=True)
                    for spec in self.val_specs]
            self._val_samples = sets[0] if len(sets) == 1 else ChainedSamples(sets)
        return self._val_samples

    def validate(self) -> Evaluation:
        """Score the current weights (the EMA weights with --ema) on the validation images,
        log and record the scores, and keep best.safetensors: the weights with the highest
        average PSNR at the last validated refinement step."""
        steps = self.options.val_steps if self.model.proxy_fusion else 0   # PromptIR: the plain pass only
        evaluation = evaluate(self.eval_model(), self.validation_samples(), steps, protocol="promptir")
        average = evaluation.average()
        self.log(f"validation at iter {self.step} (PSNR dB / SSIM, PromptIR protocol):\n" + format_table(evaluation))
        self.record.validation_rows(self.step, evaluation.scores + [average])
        score = average.psnr[-1]
        if math.isfinite(score) and (self.best is None or score > self.best["psnr"]):
            weights = self.ema if self.ema is not None else self.model.state_dict()
            if all(torch.isfinite(value).all() for value in weights.values()):
                save_weights(self.out / BEST_NAME, weights, self.model.config, arch=self.options.arch, step=self.step,
                             weights="ema" if self.ema is not None else "raw", tasks=list(self.dataset.tasks),
                             val_psnr=score)
                self.best = {"iter": self.step, "psnr": score}
                self.log(f"best so far: {score:.3f} dB at iter {self.step} -> {self.out / BEST_NAME}")
        return evaluation

    def eval_model(self):
        """The model to evaluate: a copy holding the EMA weights when EMA is on, else the model."""
        if self.ema is None:
            return self.model.eval()
        model = type(self.model).from_config(self.model.config).to(self.device)
        model.load_state_dict(self.ema)
        return model.eval()

    # ------------------------------------------------------------------ checkpoints
    def _trajectory(self) -> dict:
        options = asdict(self.options)
        return {name: options[name] for name in TRAJECTORY} | {
            "world_size": self.dist.world_size, "warmup": self.warmup, "patch": self.patch}

    def _rng_states(self) -> list[dict]:
        """Every rank's RNG state (all ranks must call this together)."""
        state = {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if not self.dist.enabled:
            return [state]
        gathered = [None] * self.dist.world_size
        dist.all_gather_object(gathered, {k: (v.cpu() if v is not None else None) for k, v in state.items()})
        return gathered

    def save(self) -> None:
        """Write checkpoint.safetensors and resume.pt (rank 0; every rank takes part in the gather)."""
        # every rank checks (the weights are the same everywhere), so that all ranks stop together
        for label, weights in (("weights", self.model.state_dict()), ("EMA weights", self.ema or {})):
            bad = [name for name, value in weights.items() if not torch.isfinite(value).all()]
            if bad:
                kept = (f"the checkpoint of step {self.saved_step} is kept" if self.saved_step is not None
                        else "nothing was saved")
                raise TrainingDiverged(f"training diverged by step {self.step}: the {label} are not finite "
                                       f"({len(bad)} tensors, e.g. {bad[0]}); not saved ({kept}); try a lower --lr")
        rng = self._rng_states()
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT,
            "arch": self.options.arch,
            "step": self.step,
            "config": self.model.config,
            "options": self._trajectory(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "history": [asdict(entry) for entry in self.history],
            "best": self.best,
        }
        save_resume_state(self.out / RESUME_NAME, state)
        weights = self.ema if self.ema is not None else self.model.state_dict()
        metadata = dict(arch=self.options.arch, step=self.step, weights="ema" if self.ema is not None else "raw",
                        tasks=list(self.dataset.tasks))
        save_weights(self.out / WEIGHTS_NAME, weights, self.model.config, **metadata)
        if self.options.keep:
            save_weights(self.out / PERIODIC_NAME.format(iter=self.step), weights, self.model.config, **metadata)
            self._prune_periodic()
        self.saved_step = self.step

    def _prune_periodic(self) -> None:
        """Keep the newest ``--keep`` periodic checkpoints (files named as this run names them)."""
        pattern = re.compile(PERIODIC_NAME.replace("{iter:07d}", r"(\d{7})").replace(".", r"\.") + "$")
        periodic = sorted((int(m.group(1)), path) for path in self.out.iterdir() if (m := pattern.match(path.name)))
        for _, path in periodic[:-self.options.keep]:
            path.unlink(missing_ok=True)

    def _this_runs_optimizer_settings(self, saved: dict) -> dict:
        """The saved optimizer state with this run's learning-rate type and capturable flag, so
        that a run with --cuda-graph resumes one without it and the other way round
        (load_state_dict takes hyper-parameters from the file and places the step counts by them)."""
        groups = []
        for group, now in zip(saved["param_groups"], self.optimizer.param_groups):
            group = dict(group, capturable=now["capturable"])
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = float(group[key])
            groups.append(group)
        return dict(saved, param_groups=groups)

    def _settle_learning_rates(self) -> None:
        """Learning rates as this run keeps them (after construction and after loading): the
        scheduler's bases as floats (no device sync per step) and, for a captured step, each
        group's rate in device memory, which the scheduler then overwrites in place."""
        self.scheduler.base_lrs = [float(lr) for lr in self.scheduler.base_lrs]
        if self.cuda_graph:
            for group in self.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)

    def _load_resume_state(self) -> None:
        path = self.out / RESUME_NAME
        if not path.exists():
            raise CheckpointError(f"{path}: no resume state to continue from (train without --resume first)")
        state = load_resume_state(path)
        # options an older run did not record had their defaults (SIPL-PromptIR among them)
        defaults = asdict(TrainOptions())
        saved, now = {**defaults, **state.get("options", {})}, self._trajectory()
        if isinstance(saved["data"], str):
            saved["data"] = [saved["data"]]
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed and not self.options.override:
            raise CheckpointError(f"{path}: --resume needs the options of the interrupted run; changed: "
                                  + ", ".join(changed) + " (pass --override to change them anyway)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(self._this_runs_optimizer_settings(state["optimizer"]))
            self.scheduler.load_state_dict(state["scheduler"])
            self._settle_learning_rates()
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0]
            raise CheckpointError(f"{path}: resume state does not match the model ({reason})") from None
        if self.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.step = int(state["step"])
        self.history = [LogEntry(**entry) for entry in state.get("history", [])]
        self.best = state.get("best")
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.log(f"resumed from {path} at iteration {self.step}")


def train(options: TrainOptions, log: Callable[[str], None] | None = None) -> Trainer:
    """Run a whole training job (the ``train`` command); returns the finished Trainer."""
    trainer = Trainer(options, log)
    try:
        trainer.run()
        if trainer.dist.enabled:
            # Rank 0 is still writing the checkpoint when the others leave save(); a rank that
            # tore its gloo group down meanwhile was seen to abort ("terminate called without
            # an active exception") on a loaded 2-core machine. Leave together.
            dist.barrier()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            trainer.network = trainer.model  # DDP's reducer goes while its group still exists
            gc.collect()
            dist.destroy_process_group()
    return trainer
