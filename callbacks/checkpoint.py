"""Checkpoints that survive a crash: a save every n steps and a save when a run dies (the
atomic writes and the checks of a `ckpt_path` are modules/checkpoints.py).

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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class CheckpointOnException(pl.Callback):
    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet: nothing to lose
        trainer.save_checkpoint(self.path, weights_only=False)
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
            trainer.save_checkpoint(self.dirpath / f"{self.filename.format(step=step)}.ckpt",
                                    weights_only=False)
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)
        self._saved_step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # the last step is saved here too, not only in on_train_end: Lightning restores its
        # loop counters as they stand at a batch's end (after it, the logged step of a resumed
        # run would be one ahead of the uninterrupted run's)
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)  # an end by epochs or time (a step saved above is not saved again)
