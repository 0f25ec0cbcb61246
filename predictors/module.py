"""PredictorModule: offline training of a learned length predictor's head on saved rollouts.

Wraps the `HeadLearner` of a `minilm` or `hidden` predictor (predictors/):
the head it trains IS the predictor's head, with the same `head_loss` and optimizer as the
online refit, so `predictor.save()` after `trainer.fit` writes the trained weights. Features
come from `predictors.rollouts.PredictorDataModule`; validation (held-out prompts) logs
`predictor/mae`, `predictor/smape`, `predictor/kendall_tau`, `predictor/acc_within_10`.

    python train_predictor.py predictor=hidden rollouts=bench_results/rollouts_chat.pt
"""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from predictors.metrics import predictor_metrics
from predictors.head import from_target, head_loss, make_optimizer


class PredictorModule(pl.LightningModule):
    def __init__(self, predictor: Any) -> None:
        super().__init__()
        learner = getattr(predictor, "learner", None)
        if learner is None:
            raise ValueError(f"predictor={getattr(predictor, 'name', predictor)!r} has no "
                             f"trainable head: offline training supports minilm and hidden")
        self.predictor, self.learner = predictor, learner
        self.head: torch.nn.Module | None = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        """Build the head for the feature size and merge the training features' statistics
        into its standardizer (before configure_optimizers, which needs the parameters)."""
        if self.head is not None:
            return
        features = self.trainer.datamodule.train_features  # [n, F] (or MiniLM ids [n, T])
        self.head = self.learner.ensure(features.shape[-1])
        self.head.update_stats(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [b, ...] -> [b] target space
        return self.head(features)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        features, remaining = batch  # [b, ...], long [b]
        loss = head_loss(self(features), remaining, self.learner.log_target,
                         self.learner.default)
        self.log("predictor/train_loss", loss, prog_bar=True, batch_size=len(remaining))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, remaining = batch
        output = self(features)  # [b]
        loss = head_loss(output, remaining, self.learner.log_target, self.learner.default)
        self.log("predictor/val_loss", loss, batch_size=len(remaining))
        predicted = from_target(output, self.learner.log_target, self.learner.default)
        self._val.append((predicted.detach().cpu(), remaining.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        predicted = torch.cat([p for p, _ in self._val])  # [n_val]
        true = torch.cat([t for _, t in self._val])  # [n_val]
        self._val.clear()
        metrics = predictor_metrics(predicted, true)
        self.log_dict({k: v for k, v in metrics.items() if math.isfinite(v)}, prog_bar=False)

    def on_fit_end(self) -> None:
        self.head.to(self.learner.device).eval()  # back where the online predictor runs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.head, self.learner.lr, self.learner.weight_decay)
