"""How a neuron set is chosen from location statistics (configs/locate/select/): Hydra picks
the class, so the experiment never branches on a method name.

- `TopDelta` (default, the authors' rule): the top_k neurons by delta = p_pole - p_negative
  plus every neuron with delta >= min_delta, delta > 0 only.
- `NullFdr`: `TopDelta`'s set, keeping only neurons whose delta clears the permutation null
  at the false-discovery rate `q` (values/reliability.py).
- `Lape`: the LAPE-style ablation over the four poles (low entropy of the activation
  probabilities across poles).

    select = TopDelta(top_k=2000, min_delta=0.1)
    neurons = select(stats, "conservation", "conservation_reversed", null)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from values.neurons import DIMENSIONS, ValueNeurons, select_lape, select_neurons
from values.reliability import NullDistribution


@runtime_checkable
class Selection(Protocol):
    needs_null: bool

    def __call__(self, stats: dict[str, Any], pole: str, negative: str,
                 null: NullDistribution | None = None) -> ValueNeurons: ...


@dataclass
class TopDelta:
    top_k: int = 2000
    min_delta: float = 0.1
    needs_null = False

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"locate.top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.min_delta, (int, float)) or not 0 < self.min_delta <= 1:
            raise ValueError(f"locate.min_delta must be in (0, 1], got {self.min_delta!r}")

    def __call__(self, stats: dict[str, Any], pole: str, negative: str,
                 null: NullDistribution | None = None) -> ValueNeurons:
        pos, neg = stats[pole].summary, stats[negative].summary
        neurons = select_neurons(pos.prob, neg.prob, self.top_k, self.min_delta, scale=pos.p95)
        neurons.meta.update(method="contrast", top_k=self.top_k, min_delta=self.min_delta)
        return neurons


@dataclass
class NullFdr(TopDelta):
    q: float = 0.05
    needs_null = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.q, (int, float)) or not 0 < self.q < 1:
            raise ValueError(f"locate.select.q must be in (0, 1), got {self.q!r}")

    def __call__(self, stats: dict[str, Any], pole: str, negative: str,
                 null: NullDistribution | None = None) -> ValueNeurons:
        if null is None:
            raise ValueError("locate.select=null_fdr needs the permutation null "
                             "(locate.null_shuffles >= 1)")
        neurons = super().__call__(stats, pole, negative)
        delta = stats[pole].summary.prob - stats[negative].summary.prob
        threshold = null.fdr_threshold(delta, self.q)
        keep = (neurons.delta >= threshold).nonzero().flatten()
        out = ValueNeurons(neurons.layer[keep], neurons.index[keep], neurons.delta[keep],
                           neurons.scale[keep], {**neurons.meta, "method": "null_fdr",
                                                 "q": self.q, "threshold": threshold},
                           None if neurons.prob is None else neurons.prob[keep])
        return out


@dataclass
class Lape:
    top_k: int = 2000
    quantile: float = 0.9
    needs_null = False

    def __call__(self, stats: dict[str, Any], pole: str, negative: str,
                 null: NullDistribution | None = None) -> ValueNeurons:
        missing = [p for p in DIMENSIONS if p not in stats]
        if missing or pole not in DIMENSIONS:
            raise ValueError(f"locate.select=lape ranks the four poles against each other: it "
                             f"needs all of them located (missing {missing}) and a pole, not "
                             f"{pole!r}")
        probs = torch.stack([stats[p].summary.prob for p in DIMENSIONS])
        other = DIMENSIONS.index(negative) if negative in DIMENSIONS else None
        neurons = select_lape(probs, DIMENSIONS.index(pole), self.top_k, other,
                              scale=stats[pole].summary.p95, min_prob_quantile=self.quantile)
        neurons.meta.update(top_k=self.top_k)
        return neurons
