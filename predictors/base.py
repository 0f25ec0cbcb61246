"""What the length predictors share: saving and loading a predictor's state, and
`LearnedPredictor`, a featurizer and a HeadLearner composed (the `hidden` and `minilm`
predictors). The contract they implement (`LengthPredictor`,
`ProbeBatch`) belongs to the sampler that consumes it: samplers/prediction.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from samplers.prediction import LengthPredictor, ProbeBatch, check_rows


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


class Featurizer(Protocol):
    """What a learned predictor turns a ProbeBatch into: float features [n, F] for its
    HeadLearner (or token ids, when the head holds a fine-tuned encoder)."""
    needs_hidden: bool

    def bind(self, tokenizer: Any) -> None: ...
    def features(self, batch: ProbeBatch) -> torch.Tensor: ...
    def state(self) -> dict[str, Any]: ...  # saved beside the learner's state
    def check_state(self, state: dict[str, Any]) -> None: ...  # raise if it is not this one's


class LearnedPredictor:
    """A length predictor composed of a featurizer (`hidden`: the policy's hidden state;
    `minilm`: a MiniLM embedding of prompt + probe) and a `HeadLearner` (predictors/head.py)
    that maps features to remaining lengths and refits online. Loads `path` at construction
    when it exists; with `save_on_refit` every refit saves there.

        predictor = LearnedPredictor("hidden", HiddenFeatures(), HeadLearner(build))
    """

    needs_oracle = False

    def __init__(self, name: str, featurizer: Featurizer, learner: Any,
                 path: str | None = None, save_on_refit: bool = False) -> None:
        self.name, self.featurizer, self.learner = name, featurizer, learner
        self.needs_hidden = featurizer.needs_hidden
        self.path, self.save_on_refit = path, save_on_refit
        load_if_exists(self, path)

    def bind(self, tokenizer: Any) -> None:
        self.featurizer.bind(tokenizer)

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0, dtype=torch.float32)
        return self.learner.predict(self.featurizer.features(batch))

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        features = self.featurizer.features(batch) if check_rows(batch) else torch.zeros(0, 0)
        if self.learner.observe(features, remaining) and self.path and self.save_on_refit:
            self.save(self.path)

    def state_dict(self) -> dict[str, Any]:
        return {**self.featurizer.state(), "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.featurizer.check_state(state)
        self.learner.load_state_dict(state["learner"])

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)
