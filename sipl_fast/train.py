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

Resuming is exact: the batch of step s is a pure function of (seed, s) (see
``sipl_fast.data.datasets``), and the resume state holds the weights, EMA, optimizer,
scheduler, step and every rank's RNG state, so an interrupted run continued with
``--resume`` reaches bit-identical weights on the CPU.

Divergence guard: a step whose loss or gradient norm is not finite updates nothing; after
``nonfinite_patience`` such steps in a row (0: the first) training stops with
``TrainingDiverged`` naming the step, and nothing is saved from then on, so the last
checkpoint written stays as it was. Weights are checked for finite values before every save.
A step replayed from a CUDA graph has already updated the weights when its loss is read (one
step later, so that replays stay asynchronous): there the first non-finite step stops.

Validation (``evaluate``) reports PSNR/SSIM per task and per refinement step: step 0 is the
plain pass, step t the output of t iterations of the authors' self-refinement loop.
"""
from __future__ import annotations

import copy
import gc
import math
import os
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
from .data.datasets import DataError, EvalSample, open_source
from .data.degradations import resolve_tasks
from .metrics import psnr, ssim


class OptionsError(ValueError):
    """Training options that cannot work together; the message says which and why."""


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the weights became non-finite; the message names the step."""


@dataclass
class TrainOptions:
    """Everything a training run needs; the command line's ``train`` flags map onto these."""

    data: str = "skimage"           # skimage | DIR | paired:DEG_DIR,CLEAN_DIR
    tasks: str = "3task"            # 3task | 5task | cdd11 | comma list of degradations
    arch: str = "sipl-promptir"     # a name of sipl_fast.model.ARCHITECTURES
    preset: str = "tiny"            # tiny | base (the authors' configuration)
    steps: int = 1000
    batch: int = 8                  # per process
    patch: int | None = None        # default: the preset's train_patch
    lr: float = 2e-4
    warmup: int | None = None       # default: 10% of the steps (PromptIR: 15 of 150 epochs)
    weight_decay: float = 0.01      # AdamW's default, as PromptIR
    clip: float = 1.0               # max gradient norm; 0 turns clipping off
    ema: float = 0.0                # EMA decay (e.g. 0.999); 0 turns EMA off
    amp: bool = False               # bf16 autocast (CUDA only)
    cuda_graph: bool | None = None  # replay the whole step as a CUDA graph; None: on one CUDA
                                    # process (H200, base preset, batch 8: 1.8x / 3.5x the eager
                                    # step's speed in fp32 / bf16, which is CPU-bound there)
    channels_last: bool | None = None  # NHWC activations; None: on the CPU (oneDNN's convolutions
                                       # train 1.25-1.6x faster on them), not on CUDA
    random_proxy: bool = False      # the authors' use_random_proxy
    seed: int = 0
    out: str = "runs/sipl"
    resume: bool = False
    overwrite: bool = False         # allow starting over in a folder that holds a run
    save_every: int = 500           # 0: only at the end
    log_every: int = 50
    eval_every: int = 0             # 0: no validation during training
    eval_size: int = 256            # centre crop of the held-out images (None: whole images)
    eval_steps: int = 2
    workers: int = 0                # DataLoader worker processes
    device: str | None = None       # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True           # tqdm progress bar (rank 0)
    graph_kernels: bool = True      # a captured step records ops.graph_kernels("train") (False: what
                                    # eager steps run)
    nonfinite_patience: int = 0     # non-finite steps in a row that are skipped before training stops
    check_data: bool = True         # read every training image once before the first step

    # Options that change the trajectory: a resumed run must use the same values.
    TRAJECTORY = ("arch", "data", "tasks", "preset", "steps", "batch", "patch", "lr", "warmup", "weight_decay",
                  "clip", "ema", "amp", "random_proxy", "seed")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_options(opts: TrainOptions) -> None:
    """OptionsError for the first option no run can use, before anything is built or read."""
    from .model import architecture

    try:
        network = architecture(opts.arch)
    except ValueError as exc:
        raise OptionsError(f"--arch: {exc}") from None
    if opts.preset not in network.PRESETS:
        raise OptionsError(f"--config {opts.preset!r}: {opts.arch} has the presets {', '.join(network.PRESETS)}")
    if not network.proxy_fusion and opts.random_proxy:
        raise OptionsError(f"--random-proxy needs Proxy Fusion; {opts.arch} has none")
    if not (_is_number(opts.lr) and opts.lr > 0):
        raise OptionsError(f"--lr must be a positive finite number, got {opts.lr}")
    if not (_is_number(opts.ema) and 0 <= opts.ema < 1):
        raise OptionsError(f"--ema must be in [0, 1) (e.g. 0.999; 0 turns EMA off), got {opts.ema}")
    for flag, value in (("--weight-decay", opts.weight_decay), ("--clip", opts.clip)):
        if not (_is_number(value) and value >= 0):
            raise OptionsError(f"{flag} must be a finite number >= 0, got {value}")
    if opts.steps < 1 or opts.batch < 1:
        raise OptionsError(f"--steps and --batch must be positive, got {opts.steps} and {opts.batch}")
    counts = (("--warmup", opts.warmup), ("--save-every", opts.save_every), ("--log-every", opts.log_every),
              ("--eval-every", opts.eval_every), ("--eval-steps", opts.eval_steps), ("--workers", opts.workers),
              ("--nonfinite-patience", opts.nonfinite_patience))
    for flag, value in counts:
        if value is not None and value < 0:
            raise OptionsError(f"{flag} must be >= 0, got {value}")
    if opts.patch and (opts.patch < 8 or opts.patch % 8):
        raise OptionsError(f"--patch must be a positive multiple of 8, got {opts.patch}")
    if opts.eval_size is not None and opts.eval_size < 8:
        raise OptionsError(f"--eval-size must be at least 8 (or 0: whole images), got {opts.eval_size}")


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
        self.warmup = opts.warmup if opts.warmup is not None else max(1, opts.steps // 10)
        self.network = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        self.source = open_source(opts.data)
        self.dataset = self.source.training_set(self.tasks, self.patch, opts.seed)
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
            self.optimizer, lambda step: lr_factor(step, opts.steps, self.warmup))
        self._settle_learning_rates()
        self._captured: CapturedStep | None = None
        self._warm_steps = 0
        self.ema = ({k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
                    if opts.ema > 0 else None)
        self.step = 0
        self.saved_step: int | None = None   # the step of the last checkpoint this run wrote
        self._nonfinite_steps = 0            # non-finite steps in a row
        self.history: list[LogEntry] = []

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
        """Train up to step ``until`` (default: ``options.steps``), then save.

        ``on_step(step, loss)`` is called after every step (e.g. to record the loss curve).
        ``time_limit`` (seconds, single process only) stops earlier once training has taken
        that long (the number of steps then depends on the machine's speed).
        """
        opts = self.options
        until = opts.steps if until is None else min(until, opts.steps)
        if time_limit is not None and self.dist.enabled:
            raise OptionsError("time_limit would stop DDP ranks at different steps; use it in one process only")
        if self.step >= until:
            return
        parameters = sum(p.numel() for p in self.model.parameters())
        self.log(f"training {opts.arch} {opts.preset} ({parameters:,} parameters) on "
                 f"{opts.data} [{', '.join(self.tasks)}]: steps {self.step}->{until}, batch {opts.batch} x "
                 f"{self.dist.world_size} process(es), patch {self.patch}, device {self.device}")
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
                self.log(f"step {entry.step}/{opts.steps}  loss {entry.loss:.4f}  lr {entry.lr:.2e}  "
                         f"{loss_count / entry.seconds:.2f} steps/s")
                loss_sum, loss_count, tick = torch.zeros((), device=self.device), 0, time.perf_counter()
            if opts.eval_every and self.step % opts.eval_every == 0 and self.dist.is_main:
                steps = opts.eval_steps if self.model.proxy_fusion else 0   # PromptIR: the plain pass only
                self.log(format_table(evaluate(self.eval_model(), self.eval_samples(), steps)))
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
                    or (opts.eval_every and step % opts.eval_every == 0))

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

    # ------------------------------------------------------------------ evaluation
    def eval_samples(self) -> list[EvalSample]:
        if not hasattr(self, "_eval_samples"):
            self._eval_samples = self.source.eval_set(self.tasks, self.options.eval_size)
        return self._eval_samples

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
        return {name: options[name] for name in TrainOptions.TRAJECTORY} | {
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
        }
        save_resume_state(self.out / RESUME_NAME, state)
        weights = self.ema if self.ema is not None else self.model.state_dict()
        save_weights(self.out / WEIGHTS_NAME, weights, self.model.config, arch=self.options.arch, step=self.step,
                     weights="ema" if self.ema is not None else "raw", tasks=list(self.tasks))
        self.saved_step = self.step

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
        # a run saved before the architecture was recorded trained SIPL-PromptIR
        saved, now = {"arch": "sipl-promptir", **state.get("options", {})}, self._trajectory()
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
        if changed:
            raise CheckpointError(f"{path}: --resume needs the options of the interrupted run; changed: "
                                  + ", ".join(changed))
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
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.log(f"resumed from {path} at step {self.step}")


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


# --------------------------------------------------------------------------- validation
@dataclass
class TaskScores:
    """Mean PSNR/SSIM of one task: the degraded input and each refinement step (0 = plain pass)."""

    task: str
    images: int
    input_psnr: float
    input_ssim: float
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)


@dataclass
class Evaluation:
    scores: list[TaskScores]
    outputs: dict[tuple[str, str], list[torch.Tensor]]   # (task, image name) -> [step 0, step 1, ...]

    def average(self) -> TaskScores:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        steps = len(self.scores[0].psnr)
        return TaskScores("average", sum(s.images for s in self.scores),
                          mean([s.input_psnr for s in self.scores]), mean([s.input_ssim for s in self.scores]),
                          [mean([s.psnr[t] for s in self.scores]) for t in range(steps)],
                          [mean([s.ssim[t] for s in self.scores]) for t in range(steps)])

    def to_dict(self) -> dict:
        return {"tasks": [asdict(s) for s in self.scores], "average": asdict(self.average())}


def evaluate(model, samples: Sequence[EvalSample], steps: int = 2, keep_outputs: bool = False,
             progress: bool = False, cuda_graph: bool = False) -> Evaluation:
    """PSNR/SSIM per task at refinement steps 0..steps (outputs clamped to [0, 1]).

    Step 0 is the plain pass; step t applies the authors' loop t times (x_t = y_t), which is
    what ``model.refine(x, steps=t)`` returns (sample sides are multiples of 8, so no padding).
    ``cuda_graph``: one captured step replayed for every sample of a size (CUDA). A network
    without Proxy Fusion (PromptIR) has step 0 only: steps > 0 raise ValueError.
    """
    from .refine import Refiner

    model.require_proxy_fusion(steps)

    for sample in samples:   # before any work: metrics need equal sizes
        if sample.lq.shape != sample.gt.shape:
            raise DataError(f"{sample.name}: the degraded image is {tuple(sample.lq.shape[1:])}, the clean one "
                            f"{tuple(sample.gt.shape[1:])}; evaluation needs equal sizes")
    device = next(model.parameters()).device
    refine_step = Refiner(model, steps=1, cuda_graph=cuda_graph)
    was_training = model.training
    model.eval()
    per_task: dict[str, list[list[tuple[float, float]]]] = {}
    inputs: dict[str, list[tuple[float, float]]] = {}
    outputs = {}
    # One cache scope for the whole evaluation: the weights stay as they are, so every step of
    # every sample reuses the dictionary-side values.
    with model.dictionary_cache.scope():
        for sample in tqdm(samples, desc="eval", disable=not progress, leave=False):
            lq, gt = sample.lq[None].to(device), sample.gt[None].to(device)
            with torch.inference_mode():
                results = [model(lq)]
                current = lq
                for _ in range(steps):
                    current = refine_step(current)
                    results.append(current)
            results = [r.clamp(0, 1) for r in results]
            per_task.setdefault(sample.task, []).append(
                [(float(psnr(r, gt)), float(ssim(r, gt))) for r in results])
            inputs.setdefault(sample.task, []).append((float(psnr(lq, gt)), float(ssim(lq, gt))))
            if keep_outputs:
                outputs[(sample.task, sample.name)] = [r[0].cpu() for r in results]
    model.train(was_training)
    scores = []
    for task, runs in per_task.items():
        n = len(runs)
        scores.append(TaskScores(task, n, sum(p for p, _ in inputs[task]) / n, sum(s for _, s in inputs[task]) / n,
                                 [sum(run[t][0] for run in runs) / n for t in range(steps + 1)],
                                 [sum(run[t][1] for run in runs) / n for t in range(steps + 1)]))
    return Evaluation(scores, outputs)


def format_table(evaluation: Evaluation) -> str:
    """PSNR (dB) / SSIM per task: the degraded input, then step 0 (plain pass), 1, 2, ..."""
    steps = len(evaluation.scores[0].psnr)
    headers = ["task", "images", "input"] + ["step 0 (plain)"] + [f"step {t}" for t in range(1, steps)]
    rows = []
    for s in evaluation.scores + [evaluation.average()]:
        cells = [f"{s.input_psnr:6.2f} / {s.input_ssim:.4f}"]
        cells += [f"{p:6.2f} / {q:.4f}" for p, q in zip(s.psnr, s.ssim)]
        rows.append([s.task, str(s.images)] + cells)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
