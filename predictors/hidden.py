"""`predictor=hidden`: the policy's own last hidden state at the probe's last token -> an MLP
head on log1p(remaining), refitted online; costs no extra model.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from predictors.base import (HeadPredictor, ProbeBatch, check_rows, load_if_exists,
                             load_predictor, save_predictor)
from predictors.head import HeadLearner, MLPHead, check_number, initial_output


class HiddenPredictor(HeadPredictor):
    """The policy's last hidden state at the probe's last token [n, H] -> standardized (running
    mean/std) -> MLP head on log1p(remaining). The head is built on the first call (H is not
    known before). `head` holds the HeadLearner options, as for MiniLMPredictor."""

    name, needs_hidden, needs_oracle = "hidden", True, False

    def __init__(self, path: str | None = None, head_width: int = 128,
                 save_on_refit: bool = False, **head: Any) -> None:
        check_number("head_width", head_width, 1, integer=True)
        init = initial_output(head.get("log_target", True), head.get("default", 64.0))
        self.learner = HeadLearner(lambda size: MLPHead(size, head_width, init), **head)
        self.path, self.save_on_refit = path, save_on_refit
        load_if_exists(self, path)

    def bind(self, tokenizer: Any) -> None:
        pass

    def features(self, batch: ProbeBatch) -> torch.Tensor:
        n = check_rows(batch)
        if batch.hidden is None:
            raise ValueError("HiddenPredictor needs batch.hidden, the policy's hidden state at "
                             "the last probe token (the sampler sets it when needs_hidden)")
        if batch.hidden.dim() != 2 or batch.hidden.shape[0] != n:
            raise ValueError(f"batch.hidden must be [n={n}, H], got {tuple(batch.hidden.shape)}")
        return batch.hidden.detach().float().cpu()  # [n, H]

    def state_dict(self) -> dict[str, Any]:
        return {"learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)
