"""The length-prediction contract of the `infinite` sampler (docs/ARCHITECTURE.md): what a
length predictor is asked about and what it answers. `predictors/` implements it.

The `infinite` sampler asks `predict(ProbeBatch)`, when a sample has decoded its first
k = probe_tokens tokens and is still running, for its REMAINING length (full length L incl.
EOS minus k), schedules on the predictions, and after the call gives the true remaining
lengths to `observe()`, so a predictor follows the policy's drifting length distribution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ProbeBatch:
    prompts: list[list[int]]  # token ids of the B prompts of this sample() call
    prompt_index: torch.Tensor  # long [n]: prompt of each sample to predict
    sample_index: torch.Tensor  # long [n]: j within its group
    probe_ids: list[list[int]]  # [n] the first k completion tokens of each sample (k may be 0)
    hidden: torch.Tensor | None = None  # float [n, H]: policy's last hidden state at the last
    # probe token (the prompt's last token when k = 0); set only when predictor.needs_hidden
    true_remaining: torch.Tensor | None = None  # long [n]: set only when predictor.needs_oracle

    def __len__(self) -> int:
        return int(self.prompt_index.numel())


class LengthPredictor(Protocol):
    name: str
    needs_hidden: bool
    needs_oracle: bool

    def bind(self, tokenizer: Any) -> None: ...
    def predict(self, batch: ProbeBatch) -> torch.Tensor: ...  # float [n] >= 0, CPU
    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None: ...
    def save(self, path: str | os.PathLike) -> None: ...
    def load(self, path: str | os.PathLike) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_rows(batch: ProbeBatch) -> int:
    n = len(batch)
    if batch.sample_index.numel() != n or len(batch.probe_ids) != n:
        raise ValueError(f"ProbeBatch fields disagree: {n} prompt_index, "
                         f"{batch.sample_index.numel()} sample_index, {len(batch.probe_ids)} "
                         f"probe_ids")
    return n
