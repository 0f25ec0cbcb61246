"""Checkpoint files: atomic writes and one-line errors for a `ckpt_path` that cannot be this
run's (used by the GRPO module, the FSDP strategy and train.py; the saving callbacks are
callbacks/checkpoint.py).

- `AtomicCheckpointIO` (the trainer's checkpoint plugin, configs/trainer/default.yaml) writes
  each checkpoint to a temporary file in the same folder, fsyncs it and renames it over the
  target: a run killed mid-save leaves the previous `last.ckpt` intact, never a broken one.
  A missing, truncated or corrupt `ckpt_path` is a one-line error naming the file.
- `check_compatible`: the checkpoint holds this module (names, shapes, an optimizer state).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.tmp<pid>`, fsync, then os.replace: all or nothing."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, lambda: super(AtomicCheckpointIO, self).load_checkpoint(
            path, *((map_location,) if map_location is not None else ()),
            weights_only=weights_only))


class CheckpointError(ValueError):
    """A `ckpt_path` that cannot be this run's checkpoint (one line, naming the file)."""


def read_checkpoint(path: Any, load: Callable[[], Any]) -> dict[str, Any]:
    """`load()` the checkpoint at `path`; whatever its bytes, a file that is not a Lightning
    checkpoint is one CheckpointError naming it (not an exception type guessed in advance:
    torch.load raises many, from EOFError to a pickle error to an IndexError)."""
    name = f"ckpt_path={str(path)!r}"
    where = Path(path)
    if where.is_dir():
        raise CheckpointError(f"{name} is a directory: give a .ckpt file (e.g. "
                              f"{where / 'last.ckpt'})")
    if not where.exists():
        raise FileNotFoundError(f"{name} does not exist")
    if where.stat().st_size == 0:
        raise CheckpointError(f"{name} is an empty file, not a checkpoint")
    try:
        checkpoint = load()
    except Exception as err:  # noqa: BLE001 - any unreadable bytes, reported in one line
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(f"{name} is not a readable checkpoint (truncated, corrupt or "
                              f"another format): {type(err).__name__}: {detail}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{name} is a torch file but not a Lightning checkpoint (no "
                              "state_dict): resume from a .ckpt that train.py wrote")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], module: torch.nn.Module,
                     trainable: int | None = None) -> None:
    """Raise a CheckpointError (without the path, which the caller adds) when `checkpoint`
    does not hold this module: other parameter names or shapes (another model, LoRA against
    full fine-tuning), weights only, or an optimizer over another number of parameters."""
    theirs, ours = checkpoint["state_dict"], module.state_dict()
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [(k, tuple(theirs[k].shape), tuple(v.shape)) for k, v in ours.items()
              if k in theirs and hasattr(theirs[k], "shape") and
              tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of this model's tensors are missing (e.g. "
                         f"{missing[0]})")
        if extra:
            parts.append(f"{len(extra)} are not this model's (e.g. {extra[0]})")
        if shapes:
            k, a, b = shapes[0]
            parts.append(f"{len(shapes)} have other shapes (e.g. {k}: {list(a)} in the file, "
                         f"{list(b)} here)")
        raise CheckpointError("holds another model or an incompatible config (policy, LoRA): "
                              + "; ".join(parts))
    states = checkpoint.get("optimizer_states")
    if not states:
        raise CheckpointError("holds weights only (no optimizer state): it cannot resume "
                              "training; load its state_dict into the policy instead")
    if trainable is not None:
        saved = sum(len(g.get("params", [])) for g in states[0].get("param_groups", []))
        if saved != trainable:
            raise CheckpointError(f"has an optimizer over {saved} parameters, this run trains "
                                  f"{trainable}: another policy or LoRA config")
