"""Length-predictor quality: how well a sampler's predictor guesses the remaining tokens.

A sampler with a length predictor (e.g. `infinite`) leaves, after each `sample()` call,
`rollouts.stats.predictor`, a `PredictorRecord(name, probe_tokens, predicted, true)`, where
`predicted` (float [n]) and `true` (long [n]) are the remaining tokens after the probe of the n
samples still running after it. `PredictorMetricsLogger` logs `predictor/*` from it after each
training batch and a predicted-vs-true scatter to TensorBoard (`predictors/metrics.py`);
samplers without a predictor, or batches with n = 0, log nothing.
"""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from predictors.metrics import plt, predictor_metrics, scatter_figure  # plt: the Agg backend


class PredictorMetricsLogger(pl.Callback):
    """Logs `predictor/*` after each training batch whose rollouts carry a predictor record.

    The scatter goes to every TensorBoard logger on the first such batch and then every
    `scatter_every_n_steps` global steps. The latest metrics are kept in `self.last`.
    """

    def __init__(self, scatter_every_n_steps: int = 10, within: float = 10.0) -> None:
        if scatter_every_n_steps < 1:
            raise ValueError(f"scatter_every_n_steps must be >= 1, got {scatter_every_n_steps}")
        self.scatter_every_n_steps = scatter_every_n_steps
        self.within = within
        self.last: dict[str, float] = {}
        self._scattered = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        rollouts = getattr(pl_module, "last_rollouts", None)
        record = rollouts.stats.predictor if rollouts is not None else None
        if record is None or record.true.numel() == 0:
            return
        predicted, true = record.predicted, record.true  # float [n], long [n]
        self.last = predictor_metrics(predicted, true, self.within)
        # nan (tau with n < 2 or constant inputs) is left out rather than breaking the TB curve
        finite = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.last.items()
                  if math.isfinite(v)}
        pl_module.log_dict(finite, on_step=True, on_epoch=False, batch_size=int(true.numel()))
        step = trainer.global_step
        if self._scattered and step % self.scatter_every_n_steps:
            return
        self._scattered = True
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        title = f"step {step}: {record.name} predictor, probe {record.probe_tokens} tokens"
        fig = scatter_figure(predicted, true, title)
        for logger in tensorboards:
            logger.experiment.add_figure("predictor/scatter", fig, global_step=step, close=False)
        plt.close(fig)
