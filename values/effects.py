"""Effects of a condition on an instrument, with paired bootstrap intervals, and the positive
control gate (docs/ARCHITECTURE.md section 9).

An instrument gives one score per unit, oriented toward its axis's first pole, and a sign per
unit (+1 a unit of the first pole, -1 of the second). The effect of a condition is the mean
change of score (condition minus base, paired by unit) over +1 units minus that over -1 units;
toward a dimension, it is multiplied by `toward(dimension)`. The interval resamples units
within each sign (a stratified, paired bootstrap).

    e = bootstrap_effect(steered - base, signs, boot=1000)     # Effect(point, low, high)
    e.toward(-1)                                                # the other pole's view
    control_passes(persona_effect)                              # > 0, interval excludes 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Effect:
    point: float
    low: float  # 95% bootstrap interval
    high: float

    def toward(self, direction: int) -> Effect:
        """The effect seen from the other pole (direction -1) or unchanged (+1)."""
        if direction > 0:
            return self
        return Effect(-self.point, -self.high, -self.low)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if math.isnan(self.point):
            return "n/a"
        return f"{self.point:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


NAN = Effect(float("nan"), float("nan"), float("nan"))

# The cost a steered arm may have to enter a verdict: its perplexity ratio on neutral text.
MAX_PERPLEXITY_RATIO = 1.5


def mean_effect(diff: torch.Tensor, signs: torch.Tensor) -> float:
    """Mean of diff over +1 units minus the mean over -1 units (0 when there are none)."""
    diff = diff.double()
    pos, neg = diff[signs > 0], diff[signs < 0]
    return (float(pos.mean()) if len(pos) else 0.0) - (float(neg.mean()) if len(neg) else 0.0)


def bootstrap_effect(diff: torch.Tensor, signs: torch.Tensor, boot: int = 1000,
                     seed: int = 0) -> Effect:
    """`mean_effect` with a 95% interval from `boot` resamples of the units (within sign)."""
    if diff.shape != signs.shape or diff.dim() != 1 or not len(diff):
        raise ValueError(f"an effect needs one score change per unit, got {tuple(diff.shape)} "
                         f"changes for {tuple(signs.shape)} units")
    if boot < 1:
        raise ValueError(f"validate.bootstrap must be >= 1, got {boot}")
    diff = diff.double()
    gen = torch.Generator().manual_seed(seed)
    draws = torch.zeros(boot, dtype=torch.float64)
    for sign in (1.0, -1.0):
        rows = diff[signs == sign]
        if len(rows):
            picks = torch.randint(len(rows), (boot, len(rows)), generator=gen)  # [boot, n]
            draws += sign * rows[picks].mean(-1)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return Effect(mean_effect(diff, signs), float(low), float(high))


def null_effect(terms: list[tuple[float, torch.Tensor, torch.Tensor]], signs: torch.Tensor,
                boot: int = 1000, seed: int = 0) -> Effect:
    """The effect of sum_k w_k * (located_k - the mean of random_k over its sets), for terms
    (w_k, located_k [n], random_k [R_k, n]) of score changes on the same units. The interval
    resamples the units (within sign, the same units for every term: paired) and, in each
    term, its random sets (with replacement): the null's spread enters the interval."""
    if boot < 1:
        raise ValueError(f"validate.bootstrap must be >= 1, got {boot}")
    gen = torch.Generator().manual_seed(seed)
    point = torch.zeros(len(signs), dtype=torch.float64)
    drawn = torch.zeros(boot, len(signs), dtype=torch.float64)  # [boot, n] per resampled nulls
    for weight, located, randoms in terms:
        located, randoms = located.double(), randoms.double()
        if randoms.dim() != 2 or randoms.shape[1] != len(signs) or located.shape != signs.shape:
            raise ValueError(f"null_effect: located {tuple(located.shape)} and random sets "
                             f"{tuple(randoms.shape)} do not match {len(signs)} units")
        point += weight * (located - randoms.mean(0))
        picks = torch.randint(len(randoms), (boot, len(randoms)), generator=gen)
        drawn += weight * (located - randoms[picks].mean(1))
    draws = torch.zeros(boot, dtype=torch.float64)
    for sign in (1.0, -1.0):
        rows = (signs == sign).nonzero().flatten()
        if len(rows):
            picks = rows[torch.randint(len(rows), (boot, len(rows)), generator=gen)]
            draws += sign * drawn.gather(1, picks).mean(-1)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return Effect(mean_effect(point, signs), float(low), float(high))


def null_quantile(located: float, randoms: list[float]) -> float:
    """The fraction of the random sets' effects below the located set's (ties count half):
    1.0 when the located set beats every random set."""
    if not randoms:
        return float("nan")
    below = sum(1.0 if r < located else 0.5 if r == located else 0.0 for r in randoms)
    return below / len(randoms)


def control_passes(persona: Effect) -> bool:
    """An instrument counts for a dimension only where the persona of that dimension moves it
    the intended way (positive, seen toward the dimension) with a 95% interval above 0."""
    return persona.point > 0 and persona.low > 0
