"""Length-predictor quality: how well a sampler's predictor guesses the remaining tokens.

A sampler with a length predictor (e.g. `infinite`) leaves, after each `sample()` call,
`rollouts.stats.predictor`, a `PredictorRecord(name, probe_tokens, predicted, true)`, where
`predicted` (float [n]) and `true` (long [n]) are the remaining tokens after the probe of the n
samples still running after it. `PredictorMetricsLogger` logs `predictor/*` from it after each
training batch and a predicted-vs-true scatter to TensorBoard; samplers without a predictor,
or batches with n = 0, log nothing. bench.py (Table D) reuses `predictor_metrics`:

    from callbacks.predictor import predictor_metrics
    predictor_metrics(torch.tensor([10.0, 40.0]), torch.tensor([12, 30]))  # mae 6.0, ...
"""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
import torchmetrics.functional as tmf
from lightning.pytorch.loggers import TensorBoardLogger

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAN = float("nan")


def predictor_metrics(predicted: torch.Tensor, true: torch.Tensor,
                      within: float = 10.0) -> dict[str, float]:
    """Error and ranking quality of predicted vs true remaining tokens (both [n]).

    - `predictor/mae`: mean |predicted - true| in tokens.
    - `predictor/smape`: torchmetrics' SMAPE, mean of 2|p - t| / (|p| + |t|): a fraction in
      [0, 2] (not a percentage); 0 = exact, 2 = one side is 0. Both 0 counts as exact.
    - `predictor/kendall_tau`: Kendall's tau-b (torchmetrics' default variant) in [-1, 1]; it
      is what a length-aware scheduler needs (the order, not the values). Undefined, so nan,
      for n < 2 or when either side is constant.
    - `predictor/acc_within_10`: fraction with |predicted - true| <= `within` tokens. Plain
      torch: torchmetrics has no tolerance-accuracy metric for regression outputs.
    - `predictor/n`: the number of samples. With n = 0 every other value is nan.
    """
    n = int(true.numel())
    if n == 0:
        return {"predictor/mae": NAN, "predictor/smape": NAN, "predictor/kendall_tau": NAN,
                "predictor/acc_within_10": NAN, "predictor/n": 0.0}
    preds = predicted.detach().float().flatten()  # [n]
    target = true.detach().to(preds.device, torch.float32).flatten()  # [n]
    tau = tmf.kendall_rank_corrcoef(preds, target) if n >= 2 else torch.tensor(NAN)
    return {
        "predictor/mae": float(tmf.mean_absolute_error(preds, target)),
        "predictor/smape": float(tmf.symmetric_mean_absolute_percentage_error(preds, target)),
        "predictor/kendall_tau": float(tau),
        "predictor/acc_within_10": float(((preds - target).abs() <= within).float().mean()),
        "predictor/n": float(n),
    }


def scatter_figure(predicted: torch.Tensor, true: torch.Tensor, title: str = "") -> Any:
    """Predicted vs true remaining tokens (both [n]) with the y = x diagonal; MAE and tau on top."""
    metrics = predictor_metrics(predicted, true)
    x = true.detach().float().cpu().numpy()  # [n]
    y = predicted.detach().float().cpu().numpy()  # [n]
    top = max(float(x.max(initial=0.0)), float(y.max(initial=0.0)), 1.0)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="y = x")
    ax.scatter(x, y, s=12, alpha=0.6)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("true remaining tokens")
    ax.set_ylabel("predicted remaining tokens")
    stats = (f"MAE {metrics['predictor/mae']:.1f} tokens, "
             f"τ {metrics['predictor/kendall_tau']:.2f}, n {int(metrics['predictor/n'])}")
    ax.set_title(f"{title}\n{stats}" if title else stats)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


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
        finite = {k: torch.tensor(v) for k, v in self.last.items() if math.isfinite(v)}
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
