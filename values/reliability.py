"""How much of a located neuron set is signal (docs/ARCHITECTURE.md section 9): a permutation null
over whole location prompts and split-half reliability, both from per-prompt counts
(`values.statistics.PromptCounts`).

- Permutation null: the pole labels of the two contrasted response sets are shuffled across
  prompts (whole prompts: the tokens of one response are correlated), delta is recomputed,
  and each shuffle's maximum delta and the histogram of all its deltas are kept. When both
  sides have as many prompts, prompt k of each shares its question and statement slot
  (values/location.py: location_prompts), so the labels are swapped within each pair: the
  question's effect on the activations, which dwarfs the pole's, cancels. A neuron is
  above the null when its delta exceeds the 95th / 99th percentile of the shuffles' maxima
  (family-wise); the false-discovery rate at a threshold t is the mean number of null deltas
  >= t over the number of observed deltas >= t.
- Split-half: each set's prompts are split in two halves (pairs kept together, as above);
  delta on one half against delta on the other gives the Spearman correlation over all
  neurons and the Jaccard overlap of the top-k sets, also at fewer prompts per half (a curve).
  Unpaired halves would carry opposite imbalances of the same questions and correlate
  negatively whatever the pole signal.

    null = permutation_null(counts_pos, counts_neg, shuffles=200, seed=0)
    null.family_wise(delta, 0.99)       # bool [layers, d_ff]
    null.fdr_threshold(delta, 0.05)     # the smallest delta kept at FDR 5%
    split_half(counts_pos, counts_neg, top_k=2000)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from values.statistics import PromptCounts

BINS = 4001  # null-delta histogram over [-1, 1]: 0.0005 wide
CHUNK = 32  # shuffles per matrix product


def _pooled(over: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights [S, N] (0/1 rows) -> pooled activation probability [S, L*D]."""
    return (weights @ over) / (weights @ tokens).clamp(min=1.0)[:, None]


@dataclass
class NullDistribution:
    maxima: torch.Tensor  # [shuffles]: the largest null delta of each shuffle
    histogram: torch.Tensor  # [BINS]: all null deltas of all shuffles, binned over [-1, 1]

    @property
    def shuffles(self) -> int:
        return int(self.maxima.numel())

    def max_quantile(self, q: float) -> float:
        return float(torch.quantile(self.maxima.double(), q))

    def family_wise(self, delta: torch.Tensor, q: float) -> torch.Tensor:
        """bool, delta's shape: above the q-quantile of the shuffles' maxima."""
        return delta > self.max_quantile(q)

    def expected_at_least(self, t: torch.Tensor) -> torch.Tensor:
        """Mean number of null deltas >= t per shuffle (t any shape)."""
        tail = self.histogram.flip(0).cumsum(0).flip(0).double()  # [BINS]: count >= bin start
        index = ((t.double() + 1.0) / 2.0 * (BINS - 1)).floor().long().clamp(0, BINS - 1)
        return tail[index] / max(self.shuffles, 1)

    def fdr(self, delta: torch.Tensor, t: float) -> float:
        """Estimated false-discovery rate of keeping every neuron with delta >= t."""
        observed = int((delta >= t).sum())
        expected = float(self.expected_at_least(torch.tensor(t)))
        return min(1.0, expected / max(observed, 1))

    def fdr_threshold(self, delta: torch.Tensor, q: float) -> float:
        """The smallest t (an observed positive delta) whose FDR is <= q (step-up over the
        sorted deltas); +inf when none is."""
        values = delta.flatten().double()
        values = values[values > 0].sort(descending=True).values  # [m]
        if not len(values):
            return float("inf")
        rank = torch.arange(1, len(values) + 1, dtype=torch.float64)
        ok = (self.expected_at_least(values) / rank <= q).nonzero().flatten()
        return float(values[int(ok.max())]) if len(ok) else float("inf")


def permutation_null(pos: PromptCounts, neg: PromptCounts, shuffles: int = 200,
                     seed: int = 0) -> NullDistribution:
    """Shuffle which prompts are `pos` and which `neg` (sizes kept) and recompute delta."""
    if shuffles < 1:
        raise ValueError(f"locate.null_shuffles must be >= 1, got {shuffles}")
    if len(pos) < 1 or len(neg) < 1:
        raise ValueError("the permutation null needs at least one prompt on each side")
    over = torch.cat([pos.over_zero, neg.over_zero]).flatten(1).float()  # [N, L*D]
    tokens = torch.cat([pos.tokens, neg.tokens]).float()  # [N]
    n, n_pos = len(tokens), len(pos)
    paired = len(pos) == len(neg)
    gen = torch.Generator().manual_seed(seed)
    maxima, histogram = [], torch.zeros(BINS, dtype=torch.float64)
    for start in range(0, shuffles, CHUNK):
        count = min(CHUNK, shuffles - start)
        if paired:  # swap the two prompts of each pair with probability 1/2
            swap = torch.rand(count, n_pos, generator=gen) < 0.5  # [S, n/2]
            first = torch.cat([~swap, swap], 1).float()  # [S, N]: the "pos" prompts
        else:
            order = torch.stack([torch.randperm(n, generator=gen) for _ in range(count)])
            first = torch.zeros(count, n)
            first.scatter_(1, order[:, :n_pos], 1.0)  # [S, N]: the shuffled "pos" prompts
        delta = _pooled(over, tokens, first) - _pooled(over, tokens, 1.0 - first)  # [S, L*D]
        maxima.append(delta.max(1).values)
        histogram += torch.histc(delta.double(), BINS, -1.0, 1.0)
    return NullDistribution(torch.cat(maxima), histogram)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank (as Spearman needs)."""
    values, order = x.double().sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # [groups]
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 0.0


def top_set(delta: torch.Tensor, k: int) -> set[int]:
    flat = delta.flatten()
    top = torch.topk(flat, min(k, flat.numel())).indices
    return set(top[flat[top] > 0].tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class SplitHalf:
    prompts_per_half: int
    spearman: float  # of delta over all neurons, half against half (mean over repeats)
    jaccard: float  # of the top-k sets
    spearman_brown: float  # the reliability predicted for twice the prompts: 2r / (1 + r)


def split_half(pos: PromptCounts, neg: PromptCounts, top_k: int, sizes: tuple[int, ...] = (),
               repeats: int = 3, seed: int = 0) -> list[SplitHalf]:
    """Split-half reliability of delta = p_pos - p_neg at each number of prompts per half in
    `sizes` (default: the largest, half of the smaller set) and their halvings down to 4."""
    largest = min(len(pos), len(neg)) // 2
    if largest < 1:
        raise ValueError("split-half reliability needs at least two prompts per side")
    if not sizes:
        sizes, size = [], largest
        while size >= 4:
            sizes.append(size)
            size //= 2
        sizes = tuple(reversed(sizes)) or (largest,)
    gen = torch.Generator().manual_seed(seed)
    paired = len(pos) == len(neg)  # prompt k of each side: the same question (see above)
    out = []
    for size in sizes:
        size = min(size, largest)
        rs, js = [], []
        for _ in range(repeats):
            p = torch.randperm(len(pos), generator=gen)
            q = p if paired else torch.randperm(len(neg), generator=gen)
            one = pos.prob(p[:size]) - neg.prob(q[:size])
            two = pos.prob(p[size:2 * size]) - neg.prob(q[size:2 * size])
            rs.append(spearman(one, two))
            js.append(jaccard(top_set(one, top_k), top_set(two, top_k)))
        r = sum(rs) / len(rs)
        out.append(SplitHalf(size, r, sum(js) / len(js), 2 * r / (1 + r) if r > -1 else r))
    return out
