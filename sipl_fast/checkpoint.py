"""Checkpoints: model weights (safetensors), resume state, and the authors' BasicSR files.

Files a training run writes into its output folder, both atomically (temporary file +
``os.replace``, see :func:`sipl_fast.images.atomic_write_bytes`):

- ``checkpoint.safetensors``: the weights to use for inference (the EMA weights when EMA is
  on), with the architecture (``arch``: a name of ``sipl_fast.model.ARCHITECTURES``) and the
  model configuration as JSON in the metadata, so ``load_model`` rebuilds the right network
  without any other file.
- ``resume.pt``: everything ``--resume`` needs to continue bit for bit: raw weights, EMA
  weights, optimizer and scheduler state, step, RNG states and the training options. Only
  tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.

``load_model`` also reads the authors' BasicSR ``.pth`` files (weights under ``params_ema`` or
``params``; the authors' configuration is assumed, of SIPL-PromptIR unless the caller names
another architecture), the official PromptIR Lightning ``.ckpt`` (``state_dict``, keys under
``net.``; architecture ``promptir``) and our ``resume.pt``. Files that record no architecture
(BasicSR files, and ours written before ``arch`` was recorded) hold the caller's, else
SIPL-PromptIR; a file that records one refuses a caller that names another. Nothing is ever
unpickled beyond plain data (``weights_only=True`` everywhere). Any unreadable, corrupted or
mismatched file raises ``CheckpointError`` with a one-line message.

``init_from`` starts a network from another's weights (``train --init-from``): every tensor
whose key and shape the network shares is loaded, the rest of the network stays as
initialised (e.g. the Proxy Fusion sites when SIPL-PromptIR starts from the official
PromptIR), and an ``InitReport`` says what was loaded, left fresh and left unused.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import atomic_write_bytes

WEIGHTS_NAME = "checkpoint.safetensors"
RESUME_NAME = "resume.pt"
FORMAT = "sipl_fast/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


# --------------------------------------------------------------------------- writing
def save_weights(path: str | os.PathLike, state_dict: dict, config: dict, **metadata) -> None:
    """Atomically write ``state_dict`` as safetensors with ``config`` (and ``metadata``) as JSON."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    header = {"format": FORMAT, "config": json.dumps(config),
              **{key: json.dumps(value) for key, value in metadata.items()}}
    atomic_write_bytes(path, save(tensors, metadata=header))


def save_resume_state(path: str | os.PathLike, state: dict) -> None:
    """Atomically write the resume state (plain data only) with torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- reading
def _load_failure_reason(exc: Exception) -> str:
    """One line saying why torch.load failed: for a file that holds objects beyond plain data,
    the object's class or function that only unsafe unpickling would construct or call."""
    text = str(exc).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it holds {refused.group(1)}, which only unsafe unpickling could load; tensors and plain data only"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError,
            TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_load_failure_reason(exc)})") from None


def load_resume_state(path: str | os.PathLike) -> dict:
    """The resume state written by ``save_resume_state``; CheckpointError if unusable."""
    path = Path(path)
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not a sipl_fast resume state")
    return state


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        tensors = load(data)
        # The header is 8 bytes of little-endian length, then JSON with the metadata.
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_length]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted safetensors file ({str(exc)[:200]})") from None
    return tensors, metadata


def _strip_prefix(state_dict: dict) -> dict:
    """Remove the ``module.`` prefix that DataParallel/DDP checkpoints carry, and the ``net.``
    of the official PromptIR's Lightning module (its network is the attribute ``net``)."""
    for prefix in ("module.", "net."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _is_safetensors(path: Path) -> bool:
    """By suffix; otherwise by content (torch.save files are zip archives or start with a pickle opcode)."""
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        return path.suffix == ".safetensors"
    with open(path, "rb") as f:
        head = f.read(2)
    return not (head == b"PK" or head[:1] == b"\x80")


def read_weights(path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """(state_dict, config or None when the file has none, metadata) of a weights file.

    ``path`` may be a folder holding ``checkpoint.safetensors``, a ``.safetensors`` file, our
    ``resume.pt``, or a BasicSR ``.pth`` (``params_ema`` preferred over ``params``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if _is_safetensors(path):
        tensors, metadata = _read_safetensors(path)
        config = metadata.get("config")
        try:
            config = json.loads(config) if config is not None else None
            extra = {k: json.loads(v) for k, v in metadata.items() if k not in ("config", "format")}
        except ValueError:
            raise CheckpointError(f"{path}: corrupted model configuration in the metadata") from None
        return tensors, config, extra
    loaded = _torch_load(path)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    if loaded.get("format") == FORMAT and "model" in loaded:          # our resume state
        weights = loaded["ema"] if loaded.get("ema") is not None else loaded["model"]
        return weights, loaded.get("config"), {"step": loaded.get("step"), "arch": loaded.get("arch")}
    for key in ("params_ema", "params", "state_dict"):                # BasicSR and Lightning layouts
        if isinstance(loaded.get(key), dict):
            return _strip_prefix(loaded[key]), None, {"source": f"{path.name}[{key}]"}
    if all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return _strip_prefix(loaded), None, {}
    raise CheckpointError(f"{path}: no weights found (expected keys params_ema / params, or a state_dict)")


def _describe_mismatch(model: torch.nn.Module, state_dict: dict) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{len(names)} {label} (e.g. {', '.join(names[:2])})")
    return "; ".join(problems) or None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", config: dict | None = None,
               arch: str | None = None):
    """Rebuild the model a checkpoint describes and load its weights (strictly).

    The architecture is the file's (its ``arch`` metadata); ``arch`` names it for files that
    record none (else SIPL-PromptIR) and must agree with a file that records one. ``config``
    overrides the file's configuration; without either, the architecture's default
    configuration is used (the case of the authors' BasicSR files). Returns (model in eval
    mode, metadata, with ``arch`` and ``config``).
    """
    from .model import DEFAULT_ARCH, architecture

    state_dict, file_config, metadata = read_weights(path)
    recorded = metadata.get("arch")
    if recorded is not None and arch is not None and recorded != arch:
        raise CheckpointError(f"{path}: holds a {recorded} network, not {arch} (the checkpoint names its "
                              "architecture: leave --arch out)")
    name = recorded or arch or DEFAULT_ARCH
    try:
        network = architecture(name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    config = config if config is not None else file_config
    # The configuration is checked on a meta-device network (shapes only, no memory) before the
    # real one is built: an absurd width fails here instead of allocating gigabytes.
    try:
        with torch.device("meta"):
            skeleton = network.from_config(config) if config is not None else network()
    except (TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unusable model configuration ({name}: {reason})") from None
    mismatch = _describe_mismatch(skeleton, state_dict)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match the model configuration ({name}): {mismatch}")
    model = network.from_config(skeleton.config)
    dtypes = {t.dtype for t in state_dict.values()}
    if not all(d.is_floating_point for d in dtypes):
        raise CheckpointError(f"{path}: non-floating weights ({', '.join(sorted(map(str, dtypes)))})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {len(bad)} tensors (e.g. {bad[0]})")
    metadata = {**metadata, "arch": name, "config": model.config}
    return model.to(device).eval(), metadata


# --------------------------------------------------------------------------- starting from other weights
@dataclass
class InitReport:
    """What ``init_from`` did: the network's keys it loaded, the network's keys the file lacks
    (left as initialised) and the file's keys the network has no place for."""

    path: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        """One line, e.g. "loaded 146 tensors from X; 93 left fresh (e.g. ...); 6 in the file unused (e.g. ...)"."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.path}",
                 f"{len(self.missing)} left fresh (e.g. {_examples(self.missing)})" if self.missing
                 else "none left fresh"]
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file unused (e.g. {_examples(self.unexpected)})")
        return "; ".join(parts)


def _examples(keys: list[str]) -> str:
    """The first two keys, and "..." when there are more."""
    return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")


def _bare_network(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DataParallel / DistributedDataParallel and torch.compile wrappers,
    whose state_dict keys carry no wrapper prefix."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):   # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def init_from(model: torch.nn.Module, path: str | os.PathLike) -> InitReport:
    """Load into ``model`` (in place) every tensor of the weights file ``path`` whose key (after
    ``net.`` / ``module.`` prefixes) and shape the model shares; the model's other tensors keep
    their values. ``path`` is anything ``read_weights`` reads: the official PromptIR Lightning
    ``.ckpt``, a BasicSR ``.pth`` (``params_ema`` preferred), our ``checkpoint.safetensors``
    (or its folder) or ``resume.pt``.

    CheckpointError, with the model untouched, for an unreadable file, a key present in both
    with different shapes, a floating tensor where the model has an integer one (or the
    reverse), non-finite values, or a file of which no tensor matches the model.
    """
    from .model import arch_name

    network = _bare_network(model)
    try:
        arch = arch_name(network)
    except ValueError:
        arch = type(network).__name__
    state_dict, _, _ = read_weights(path)
    if Path(path).is_dir():
        path = Path(path) / WEIGHTS_NAME
    expected = network.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in expected and isinstance(v, torch.Tensor)}
    wrong_shape = [k for k, v in matched.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        key = wrong_shape[0]
        others = f" (and {len(wrong_shape) - 1} more)" if len(wrong_shape) > 1 else ""
        raise CheckpointError(f"{path}: {key} has shape {tuple(matched[key].shape)} in the file but "
                              f"{tuple(expected[key].shape)} in the {arch} model{others}; the file holds "
                              "another configuration")
    wrong_kind = [k for k, v in matched.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if wrong_kind:
        key = wrong_kind[0]
        raise CheckpointError(f"{path}: {key} is {matched[key].dtype} in the file but {expected[key].dtype} "
                              f"in the {arch} model")
    if not matched:
        raise CheckpointError(f"no tensor of {path} matches {arch} (the file's keys: "
                              f"{_examples(list(state_dict)) or 'none'}; the model's: {_examples(list(expected))})")
    non_finite = [k for k, v in matched.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{path}: non-finite values in {len(non_finite)} tensors (e.g. {non_finite[0]})")
    network.load_state_dict(matched, strict=False)
    return InitReport(path=str(path), loaded=list(matched), missing=[k for k in expected if k not in matched],
                      unexpected=[k for k in state_dict if k not in matched])
