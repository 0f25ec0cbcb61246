"""Per-neuron activation statistics of the gated MLPs over selected tokens (docs/ARCHITECTURE.md
section 9).

`ActivationStats` is a torchmetrics `Metric` with sum states only (a histogram per neuron), so
DDP ranks reduce exactly; `record_activations` feeds it from every forward, and optionally a
`PromptCounts` with the same counts kept per sequence (what the permutation null and the
split-half reliability of values/reliability.py resample: whole prompts, never tokens).

    stats, counts = ActivationStats.for_model(model), PromptCounts.for_model(model)
    with record_activations(model, stats, counts) as rec:
        rec.mask = response_mask                       # [B, T] bool: the tokens to count
        model(input_ids=ids)
    summary = stats.compute()                          # .prob, .p95: [layers, d_ff]
    counts.over_zero                                   # [N, layers, d_ff]: per sequence
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torchmetrics import Metric

from values.hooks import gated_mlps, mlp_width, wrap_activations

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


class PromptCounts:
    """Per counted sequence: its token count and, per neuron, how many of its tokens had
    a > 0. Rows are appended in forward order (one per row of each recorded batch)."""

    def __init__(self, layers: int, d_ff: int) -> None:
        self.layers, self.d_ff = layers, d_ff
        self._rows: list[torch.Tensor] = []  # int32 [B, layers, d_ff] per batch
        self._tokens: list[torch.Tensor] = []

    @classmethod
    def for_model(cls, model: Any, prompts: int = 0) -> PromptCounts:
        """Empty (rows appended by `update`), or `prompts` zero rows (filled by `add`)."""
        mlps = gated_mlps(model)
        counts = cls(len(mlps), mlp_width(mlps[0]))
        if prompts:
            counts._rows = [torch.zeros(prompts, counts.layers, counts.d_ff, dtype=torch.int32)]
            counts._tokens = [torch.zeros(prompts, dtype=torch.long)]
        return counts

    def add(self, layer: int, prompts: torch.Tensor, positive: torch.Tensor) -> None:
        """Decoded tokens: one per row; `positive` [n, d_ff] bool, `prompts` [n] their rows."""
        prompts = prompts.cpu()
        self._rows[0][:, layer].index_add_(0, prompts, positive.int().cpu())
        if layer == 0:
            self._tokens[0].index_add_(0, prompts, torch.ones_like(prompts))

    @classmethod
    def of(cls, over_zero: torch.Tensor, tokens: torch.Tensor) -> PromptCounts:
        counts = cls(over_zero.shape[1], over_zero.shape[2])
        counts._rows, counts._tokens = [over_zero.int()], [tokens.long()]
        return counts

    def update(self, layer: int, activations: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.to(activations.device)
        positive = ((activations > 0) & mask[..., None]).sum(1).int().cpu()  # [B, d_ff]
        if layer == 0:
            self._rows.append(torch.zeros(len(positive), self.layers, self.d_ff,
                                          dtype=torch.int32))
            self._tokens.append(mask.sum(1).long().cpu())
        self._rows[-1][:, layer] = positive

    @property
    def over_zero(self) -> torch.Tensor:  # int32 [N, layers, d_ff]
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows)]
            self._tokens = [torch.cat(self._tokens)]
        return self._rows[0] if self._rows else torch.zeros(0, self.layers, self.d_ff,
                                                            dtype=torch.int32)

    @property
    def tokens(self) -> torch.Tensor:  # long [N]
        self.over_zero  # noqa: B018 - concatenates both lists
        return self._tokens[0] if self._tokens else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def prob(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[layers, d_ff]: the pooled activation probability of `rows` (default all)."""
        over, tokens = self.over_zero, self.tokens
        if rows is not None:
            over, tokens = over[rows], tokens[rows]
        return over.sum(0).double().div(max(int(tokens.sum()), 1)).float()


class _Recorder:
    def __init__(self, sinks: list[Any]) -> None:
        self.sinks, self.mask = sinks, None

    def __call__(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise ValueError("record_activations: set `.mask` ([B, T] bool) before the forward")
        for sink in self.sinks:
            sink.update(layer, a.detach(), self.mask)
        return a


class _DecodeRecorder:
    """Counts the engine's decode forwards only (one generated token per row, rows mapped to
    prompts by `on_decode`, the GenerationSpec's observer); prompt prefills are not counted."""

    def __init__(self, stats: ActivationStats, counts: PromptCounts) -> None:
        self.stats, self.counts, self.forwards = stats, counts, 0
        self.prompts: torch.Tensor | None = None  # of the decode forward in progress

    def on_decode(self, prompts: torch.Tensor | None) -> None:
        """The engine's call before (the rows' prompt indices) and after (None) each decode
        forward: pass it as `GenerationSpec(on_decode=recorder.on_decode)`."""
        self.prompts = prompts

    def __call__(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts
        if prompts is None or a.shape[1] != 1:
            return a
        a = a.detach()
        self.stats.update(layer, a, torch.ones(a.shape[:2], dtype=torch.bool, device=a.device))
        self.counts.add(layer, prompts, a[:, 0] > 0)
        self.forwards += layer == 0
        return a


@contextmanager
def record_decoding(model: Any, stats: ActivationStats,
                    counts: PromptCounts) -> Iterator[_DecodeRecorder]:
    """Count every generated token's activations while the decode engine generates, per
    prompt: the token fed at each decode step (every generated token but the last, which is
    never fed back), as the authors' code counts vLLM's decode steps. Generate with
    `GenerationSpec(on_decode=recorder.on_decode)`, with a sampler that decodes through
    samplers/engine.py (full, micro, continuous, infinite)."""
    recorder = _DecodeRecorder(stats, counts)
    with wrap_activations(model, recorder):
        yield recorder
    if recorder.forwards == 0:
        raise ValueError("no decode step was recorded: the sampler does not decode through "
                         "the engine (use sampler=continuous_wide, continuous, full, micro or "
                         "infinite, not hf_generate)")


@contextmanager
def record_activations(model: Any, stats: ActivationStats,
                       counts: PromptCounts | None = None) -> Iterator[_Recorder]:
    """Feed every gated-MLP activation of each forward into `stats` (and per sequence into
    `counts`), at the tokens of the recorder's `.mask` ([B, T] bool, set before each forward)."""
    recorder = _Recorder([stats] if counts is None else [stats, counts])
    with wrap_activations(model, recorder):
        yield recorder
