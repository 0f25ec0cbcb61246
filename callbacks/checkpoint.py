"""Checkpoints that survive a crash: atomic writes, clear errors, a save when a run dies.

- `AtomicCheckpointIO` (the trainer's checkpoint plugin, configs/trainer/default.yaml) writes
  each checkpoint to a temporary file in the same folder, fsyncs it and renames it over the
  target: a run killed mid-save leaves the previous `last.ckpt` intact, never a broken one.
  A missing, truncated or corrupt `ckpt_path` is a one-line error naming the file.
- `StepCheckpoint` saves `last.ckpt` every `every_n_train_steps` optimizer steps and at the
  end of training (plus `step_<n>.ckpt` files with `save_top_k: -1`). It replaces
  Lightning's ModelCheckpoint, whose step-based saving is made for automatic optimization:
  with GRPO's manual optimization it warns at every save. Here the saved state is the one
  after the step's optimizer update, which is exactly where a resumed run continues.
- `CheckpointOnException` saves when a run dies of an exception (reward error, OOM, Ctrl-C).
  Lightning's own OnExceptionCheckpoint also turns `fit(ckpt_path=None)` into a search for
  `last.ckpt`; this one only saves, so fresh runs start fresh and killed ones lose nothing.
  Resume with `python train.py ckpt_path=<run>/checkpoints/on_exception.ckpt`.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class CheckpointOnException(pl.Callback):
    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet: nothing to lose
        trainer.save_checkpoint(self.path)
        log.error("%s at step %d; checkpoint saved to %s", type(exception).__name__,
                  trainer.global_step, self.path)


class StepCheckpoint(pl.Callback):
    def __init__(self, dirpath: str, every_n_train_steps: int = 10,
                 filename: str = "step_{step:06d}", save_top_k: int = 0) -> None:
        if every_n_train_steps < 1:
            raise ValueError("callbacks.model_checkpoint.every_n_train_steps must be >= 1, got "
                             f"{every_n_train_steps}")
        if save_top_k not in (0, -1):
            raise ValueError("callbacks.model_checkpoint.save_top_k must be 0 (only last.ckpt) "
                             f"or -1 (also keep every step's file), got {save_top_k}")
        self.dirpath, self.every, self.filename = Path(dirpath), every_n_train_steps, filename
        self.keep_steps = save_top_k == -1
        self._saved_step = -1

    def save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == self._saved_step or step == 0:
            return
        if self.keep_steps:
            trainer.save_checkpoint(self.dirpath / f"{self.filename.format(step=step)}.ckpt")
        trainer.save_checkpoint(self.dirpath / "last.ckpt")
        self._saved_step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


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
        if not Path(path).is_file():
            raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
        try:
            if map_location is None:
                return super().load_checkpoint(path, weights_only=weights_only)
            return super().load_checkpoint(path, map_location, weights_only)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError,
                zipfile.BadZipFile) as err:
            raise ValueError(f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated "
                             f"or corrupt): {type(err).__name__}: {err}") from err
