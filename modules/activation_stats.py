"""Per-neuron activation statistics of the gated MLPs over selected tokens (DESIGN.md 9).

`ActivationStats` is a torchmetrics `Metric` with sum states only (a histogram per neuron), so
DDP ranks reduce exactly; `record_activations` feeds it from every forward.

    stats = ActivationStats.for_model(model)
    with record_activations(model, stats) as rec:
        rec.mask = response_mask                       # [B, T] bool: the tokens to count
        model(input_ids=ids)
    summary = stats.compute()                          # .prob, .p95: [layers, d_ff]
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torchmetrics import Metric

from modules.mlp_hooks import gated_mlps, mlp_width, wrap_activations

# Histogram of activations per neuron, for the 95th percentile: bin 0 holds a <= 0, then
# geometric bins from 1e-3 to 1e2 (about 10% wide), then one overflow bin.
_EDGES = torch.cat([torch.zeros(1), torch.logspace(-3, 2, 127, dtype=torch.float64).float()])
NUM_BINS = len(_EDGES) + 1



@dataclass
class ActivationSummary:
    prob: torch.Tensor  # [layers, d_ff]: fraction of counted tokens with a > 0
    p95: torch.Tensor  # [layers, d_ff]: 95th percentile of a over counted tokens
    tokens: int


class ActivationStats(Metric):
    """Per-neuron histogram of activations over counted (response) tokens.

    Sum states only, so DDP ranks reduce exactly: the activation probability and the 95th
    percentile (to ~10%, interpolated within a bin; 0 when 95% of tokens have a <= 0) are both
    read off the summed histogram.
    """

    full_state_update = False

    def __init__(self, layers: int, d_ff: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers, self.d_ff = layers, d_ff
        self.add_state("hist", torch.zeros(layers, d_ff, NUM_BINS, dtype=torch.int32),
                       dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def for_model(cls, model: Any) -> ActivationStats:
        mlps = gated_mlps(model)
        return cls(len(mlps), mlp_width(mlps[0])).to(next(model.parameters()).device)

    def update(self, layer: int, activations: torch.Tensor, mask: torch.Tensor) -> None:
        """activations [B, T, d_ff] of one layer; mask [B, T] bool (tokens to count)."""
        acts = activations[mask.to(activations.device)].float()  # [n, d_ff]
        edges = _EDGES.to(acts.device)
        bins = torch.bucketize(acts, edges)  # a <= 0 -> 0, (0, 1e-3] -> 1, ...
        flat = bins + NUM_BINS * torch.arange(self.d_ff, device=acts.device)
        counts = torch.bincount(flat.flatten(), minlength=self.d_ff * NUM_BINS)
        self.hist[layer] += counts.view(self.d_ff, NUM_BINS).to(self.hist.dtype)
        if layer == 0:
            self.tokens += acts.shape[0]

    def compute(self) -> ActivationSummary:
        hist = self.hist.double()  # [L, D, bins]
        total = max(int(self.tokens), 1)
        prob = (1.0 - hist[..., 0] / total).float()
        return ActivationSummary(prob.clamp(min=0.0), _quantile(hist, 0.95), int(self.tokens))


def _quantile(hist: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each neuron's histogram [L, D, bins], geometric within a bin."""
    total = hist.sum(-1, keepdim=True).clamp(min=1)
    cdf = hist.cumsum(-1)
    target = q * total  # [L, D, 1]
    b = (cdf < target).sum(-1, keepdim=True).clamp(max=NUM_BINS - 1)  # first bin reaching q
    before = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = ((target - before) / hist.gather(-1, b).clamp(min=1)).clamp(0, 1)
    edges = torch.cat([_EDGES.double(), _EDGES[-1:].double()]).to(hist.device)
    low, high = edges[(b - 1).clamp(min=0)], edges[b.clamp(max=len(_EDGES) - 1)]
    value = torch.where(low > 0, low * (high / low.clamp(min=1e-12)) ** inside,
                        high * inside)  # the first positive bin starts at 0: linear there
    value = torch.where(b == 0, torch.zeros_like(value), value)
    value = torch.where(b >= len(_EDGES), edges[-1].expand_as(value), value)
    return value.squeeze(-1).float()


class _Recorder:
    def __init__(self, stats: ActivationStats) -> None:
        self.stats, self.mask = stats, None

    def __call__(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise ValueError("record_activations: set `.mask` ([B, T] bool) before the forward")
        self.stats.update(layer, a.detach(), self.mask)
        return a


@contextmanager
def record_activations(model: Any, stats: ActivationStats) -> Iterator[_Recorder]:
    """Feed every gated-MLP activation of each forward into `stats`, at the tokens of the
    recorder's `.mask` ([B, T] bool, set before each forward)."""
    recorder = _Recorder(stats)
    with wrap_activations(model, recorder):
        yield recorder
