"""Save a checkpoint when a run dies of an exception (reward error, OOM, Ctrl-C).

Lightning's own OnExceptionCheckpoint also turns `fit(ckpt_path=None)` into a search for
`last.ckpt`; this one only saves, so fresh runs start fresh and killed ones lose nothing.
Resume with `python train.py ckpt_path=<run>/checkpoints/on_exception.ckpt`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

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
