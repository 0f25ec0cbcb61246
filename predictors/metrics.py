"""How well a length predictor guesses the remaining tokens: the `predictor/*` metrics and a
predicted-vs-true scatter, shared by the training callback (`callbacks/predictor.py`), the
offline trainer (`predictors/module.py`) and the benchmarks (Table D).

    from predictors.metrics import predictor_metrics
    predictor_metrics(torch.tensor([10.0, 40.0]), torch.tensor([12, 30]))  # mae 6.0, ...
"""
from __future__ import annotations

from typing import Any

import matplotlib
import torch
import torchmetrics.functional as tmf

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
