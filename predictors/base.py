"""What every length predictor takes and implements, and the helpers they share.

The `infinite` sampler decodes the first k = probe_tokens tokens of every sample, hands the
samples still running to `predict(ProbeBatch)` for their REMAINING length (full length L incl.
EOS minus k), schedules on the predictions, and afterwards gives the true remaining lengths to
`observe()`, so a predictor follows the policy's drifting length distribution (DESIGN.md
section 6).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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


def save_predictor(predictor: LengthPredictor, path: str | os.PathLike) -> None:
    """torch.save {name, state} atomically (tensors, lists, dicts, numbers, strings only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"name": predictor.name, "state": predictor.state_dict()}, tmp)
    os.replace(tmp, path)


def load_predictor(predictor: LengthPredictor, path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise ValueError(f"predictor path={str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("name") != predictor.name:
        raise ValueError(f"predictor path={str(path)!r} holds a {payload.get('name')!r} "
                         f"predictor, not {predictor.name!r}")
    predictor.load_state_dict(payload["state"])


def load_if_exists(predictor: LengthPredictor, path: str | os.PathLike | None) -> None:
    if path and Path(path).is_file():
        load_predictor(predictor, path)


def check_rows(batch: ProbeBatch) -> int:
    n = len(batch)
    if batch.sample_index.numel() != n or len(batch.probe_ids) != n:
        raise ValueError(f"ProbeBatch fields disagree: {n} prompt_index, "
                         f"{batch.sample_index.numel()} sample_index, {len(batch.probe_ids)} "
                         f"probe_ids")
    return n


class HeadPredictor:
    """predict/observe of the learned predictors (`minilm`, `hidden`), which define
    `features(batch) -> float [n, F]` and `save(path)`: the features feed their `HeadLearner`,
    and a refit saves to `path` when `save_on_refit`."""

    learner: Any
    path: str | None
    save_on_refit: bool

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0, dtype=torch.float32)
        return self.learner.predict(self.features(batch))

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        features = self.features(batch) if check_rows(batch) else torch.zeros(0, 0)
        if self.learner.observe(features, remaining) and self.path and self.save_on_refit:
            self.save(self.path)
