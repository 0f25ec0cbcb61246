"""`predictor=oracle`: the true remaining lengths from a pre-pass with the same seeds.

An upper bound for ablations (the sampler pays for a second decode), never a default:
`python train.py sampler=infinite predictor=oracle`.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from samplers.prediction import ProbeBatch, check_rows
from predictors.base import load_predictor, save_predictor


class OraclePredictor:
    """Returns `batch.true_remaining` (a pre-pass with the same seeds): ablations only."""

    name, needs_hidden, needs_oracle = "oracle", False, True

    def bind(self, tokenizer: Any) -> None:
        pass

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0, dtype=torch.float32)
        if batch.true_remaining is None:
            raise ValueError("OraclePredictor needs batch.true_remaining (the sampler sets it "
                             "from a same-seed pre-pass when predictor.needs_oracle)")
        return batch.true_remaining.detach().float().cpu().clamp_min(0)  # [n]

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)
