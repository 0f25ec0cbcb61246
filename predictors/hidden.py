"""`predictor=hidden`: the policy's own last hidden state at the probe's last token -> an MLP
head on log1p(remaining), refitted online; costs no extra model.
"""
from __future__ import annotations

from typing import Any

import torch

from common.checks import check_number
from predictors.base import LearnedPredictor
from predictors.head import HeadLearner, MLPHead, initial_output
from samplers.prediction import ProbeBatch, check_rows


class HiddenFeatures:
    """The policy's last hidden state at the probe's last token, float [n, H] (the sampler
    sets `batch.hidden` when `needs_hidden`)."""

    needs_hidden = True

    def bind(self, tokenizer: Any) -> None:
        """Nothing to decode."""

    def features(self, batch: ProbeBatch) -> torch.Tensor:
        n = check_rows(batch)
        if batch.hidden is None:
            raise ValueError("the hidden predictor needs batch.hidden, the policy's hidden "
                             "state at the last probe token (the sampler sets it when "
                             "needs_hidden)")
        if batch.hidden.dim() != 2 or batch.hidden.shape[0] != n:
            raise ValueError(f"batch.hidden must be [n={n}, H], got {tuple(batch.hidden.shape)}")
        return batch.hidden.detach().float().cpu()  # [n, H]

    def state(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: dict[str, Any]) -> None:
        """Any learner state fits: the head's input size is checked when it is loaded."""


def hidden_predictor(path: str | None = None, head_width: int = 128,
                     save_on_refit: bool = False, **head: Any) -> LearnedPredictor:
    """Hidden state [n, H] -> standardized (running mean/std) -> MLP head on log1p(remaining);
    the head is built on the first call (H is not known before). `head` holds the HeadLearner
    options (refit_every, refit_steps, buffer_size, batch_size, lr, weight_decay, log_target,
    default, seed); configs/predictor/hidden.yaml gives the defaults."""
    check_number("head_width", head_width, 1, integer=True)
    init = initial_output(head.get("log_target", True), head.get("default", 64.0))
    learner = HeadLearner(lambda size: MLPHead(size, head_width, init), **head)
    return LearnedPredictor("hidden", HiddenFeatures(), learner, path, save_on_refit)
