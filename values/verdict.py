"""What a value-neuron run may conclude, per dimension: shown, ruled out, inconclusive, location
unreliable, or not testable (docs/ARCHITECTURE.md section 9).

    rule = VerdictRule(gamma=2.0, equivalence=0.5, max_perplexity=1.5, min_reliability=0.5)
    rows = [instrument_row(measurement, name, "conservation", rule.gamma) for name in names]
    word, paragraph = verdict("conservation", rows, rule, reliability=0.17)

Per valid instrument (its persona control passes), at the one gamma fixed before the run:
- **shown**: the located set moves the instrument toward the pole beyond random neurons, and
  beyond what the opposite pole's set does (the pole-specific effect), both intervals above 0;
- **ruled out**: an equivalence test: the pole-specific effect's 95 % interval lies below a
  stated bound, `equivalence` x that instrument's persona effect (default half of it);
- **inconclusive**: neither; the smallest effect the data could have detected is given
  (80 % power at a two-sided 5 % level: 2.8 standard errors, the interval's width x 0.714).
A dimension is shown if one valid instrument shows it, ruled out if every valid instrument
rules it out, else inconclusive; **location unreliable** when the located statistic's
split-half reliability (Spearman-Brown) is below `min_reliability`: a set drawn from noise can
neither show nor rule out value neurons, whatever steering it does. "No effect seen" is never
a refutation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from values.effects import MAX_PERPLEXITY_RATIO, NAN, Effect

# two-sided 5 % test at 80 % power: (1.96 + 0.84) standard errors; a 95 % interval is 3.92 wide
DETECTABLE_PER_WIDTH = 2.8 / 3.92


@dataclass(frozen=True)
class VerdictRule:
    """How the verdict reads a run (`validate.*` in configs/locate_values.yaml)."""
    gamma: float = 2.0  # the one gamma read, fixed before the run
    equivalence: float = 0.5  # "ruled out" bound: this fraction of the persona effect
    max_perplexity: float | None = MAX_PERPLEXITY_RATIO  # the headline's cost limit
    min_reliability: float = 0.5  # Spearman-Brown of the location below it: unreliable
    limits: tuple[float, ...] = (1.25, 1.5, 2.0)  # the verdict is also shown at these

    def __post_init__(self) -> None:
        if not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise ValueError(f"validate.verdict_gamma must be a number > 0, got {self.gamma!r}")
        if not isinstance(self.equivalence, (int, float)) or not 0 < self.equivalence <= 1:
            raise ValueError("validate.equivalence must be in (0, 1] (a fraction of the persona "
                             f"effect), got {self.equivalence!r}")
        if not isinstance(self.min_reliability, (int, float)) or \
                not -1 <= self.min_reliability <= 1:
            raise ValueError("validate.min_reliability must be in [-1, 1] (a Spearman-Brown "
                             f"correlation), got {self.min_reliability!r}")
        if any(not isinstance(x, (int, float)) or not x >= 1 for x in self.limits):
            raise ValueError("validate.verdict_limits must be perplexity ratios >= 1, got "
                             f"{list(self.limits)!r}")


@dataclass
class InstrumentRow:
    """One instrument's line in a dimension's verdict table, at the rule's gamma."""
    instrument: str
    control: bool
    persona: Effect
    gamma: float
    located: Effect
    random: Effect
    located_minus_random: Effect
    reverse: Effect
    perplexity_ratio: float  # the located arm's, at gamma
    specificity: Effect = NAN  # located - random of this pole's set minus the opposite's
    quantile: float = float("nan")  # the located effect's quantile among the random sets'
    random_sets: int = 0

    def cells(self) -> dict[str, Any]:
        return {"instrument": self.instrument, "control passed": "yes" if self.control else
                "no (uninformative)", "persona effect": str(self.persona),
                "gamma": self.gamma, "located": str(self.located),
                "random": str(self.random),
                "located - random": str(self.located_minus_random),
                "null quantile": (f"{self.quantile:.2f} of {self.random_sets}"
                                  if self.random_sets else "n/a"),
                "this pole's set - opposite's": str(self.specificity),
                "reverse": str(self.reverse), "perplexity ratio": self.perplexity_ratio}


def instrument_row(m: Any, instrument: str, dim: str, gamma: float) -> InstrumentRow:
    """The row of `instrument` on `dim` at `gamma` (NAN where that arm was not measured)."""
    return InstrumentRow(
        instrument, m.passes(instrument, dim), m.persona.get((instrument, dim), NAN), gamma,
        m.arms.get((instrument, dim, "located", gamma), NAN),
        m.arms.get((instrument, dim, "random", gamma), NAN),
        m.contrasts.get((instrument, dim, gamma), NAN),
        m.arms.get((instrument, dim, "reverse", gamma), NAN),
        m.perplexity.get(f"located:{dim}@{gamma:g}", float("nan")),
        m.specific.get((instrument, dim, gamma), NAN),
        *m.quantiles.get((instrument, dim, gamma), (float("nan"), 0)))


@dataclass(frozen=True)
class Reading:
    """What one valid instrument says: its word, the effect read, the bound, and why."""
    word: str  # shown | ruled out | inconclusive
    effect: Effect  # the pole-specific effect (located - random without the opposite pole)
    bound: float  # the equivalence bound
    detectable: float  # the smallest effect these data could have detected
    reason: str


def read(row: InstrumentRow, rule: VerdictRule, limit: float | None,
         specificity: bool = True) -> Reading:
    """One valid instrument's reading at perplexity limit `limit` (None: no limit).
    `specificity=False` (the opposite pole was not run) reads located - random alone."""
    effect = row.specificity if specificity else row.located_minus_random
    bound = rule.equivalence * row.persona.point
    width = effect.high - effect.low
    detectable = DETECTABLE_PER_WIDTH * width if math.isfinite(width) else float("nan")
    name = f"{row.instrument} at gamma {row.gamma:g}"
    if limit is not None and not row.perplexity_ratio <= limit:
        return Reading("inconclusive", effect, bound, detectable,
                       f"{name}: perplexity x{row.perplexity_ratio:.2f} is above the limit "
                       f"x{limit:g}")
    if math.isnan(row.located_minus_random.point) or math.isnan(effect.point):
        what = "the located and random arms" if math.isnan(row.located_minus_random.point) \
            else "the opposite pole's arms (its pole-specificity)"
        return Reading("inconclusive", effect, bound, detectable,
                       f"{name}: {what} not measured")
    summary = (f"{name}: located - random {row.located_minus_random}, "
               + (f"this pole's set - the opposite's {effect}, " if specificity else "")
               + f"perplexity x{row.perplexity_ratio:.2f}")
    if row.located_minus_random.low > 0 and effect.low > 0:
        return Reading("shown", effect, bound, detectable, summary)
    if effect.high < bound:
        return Reading("ruled out", effect, bound, detectable,
                       f"{summary}; the interval is below the bound {bound:+.3f} "
                       f"({rule.equivalence:g} x the persona effect {row.persona.point:+.3f})")
    return Reading("inconclusive", effect, bound, detectable,
                   f"{summary}; neither above 0 nor below the bound {bound:+.3f}: the "
                   f"smallest effect these data could detect is {detectable:.3f}")


def dimension_word(readings: Sequence[Reading]) -> str:
    """shown if one valid instrument shows it, ruled out if all rule it out, else
    inconclusive."""
    words = [r.word for r in readings]
    if "shown" in words:
        return "shown"
    if words and all(w == "ruled out" for w in words):
        return "ruled out"
    return "inconclusive"


def verdict(dim: str, rows: list[InstrumentRow], rule: VerdictRule = VerdictRule(),
            reliability: float | None = None,
            specificity: bool = True) -> tuple[str, str]:
    """(word, one paragraph) for a dimension: shown | ruled out | inconclusive | location
    unreliable | not testable on this model. `reliability`: the Spearman-Brown split-half
    reliability of the located statistic (None: not measured, e.g. saved sets);
    `specificity=False`: the opposite pole was not run."""
    valid = [r for r in rows if r.control]
    failed = ", ".join(f"{r.instrument} {r.persona}" for r in rows if not r.control)
    if not valid:
        return "not testable on this model", (
            f"No instrument passes its positive control for {dim}: a persona prompt of this "
            f"pole does not move any of them the intended way with an interval excluding 0 "
            f"(persona effects: {failed or 'none measured'}). Nothing is concluded.")
    readings = [read(r, rule, rule.max_perplexity, specificity) for r in valid]
    word = dimension_word(readings)
    limit = "no perplexity limit" if rule.max_perplexity is None else \
        f"perplexity limit x{rule.max_perplexity:g}"
    lines = "; ".join(f"{r.word}: {r.reason}" for r in readings)
    text = (f"At gamma {rule.gamma:g} (fixed before the run), {limit}, {len(valid)} valid "
            f"instrument(s): {lines}.")
    others = [x for x in rule.limits if x != rule.max_perplexity]
    if others:
        text += " At other limits: " + ", ".join(
            f"x{x:g} {dimension_word([read(r, rule, x, specificity) for r in valid])}"
            for x in others) + "."
    if not specificity:
        text += " The opposite pole was not run, so pole-specificity is not checked."
    if failed:
        text += f" Instruments that fail their control (not read): {failed}."
    if reliability is None:
        text += " The location's reliability was not measured (saved neuron sets)."
    elif not reliability >= rule.min_reliability:
        return "location unreliable", (
            f"The location is unreliable: the split-half reliability of its statistic "
            f"(Spearman-Brown {reliability:.2f}) is below {rule.min_reliability:g}, so the "
            f"located set is mostly noise, and steering it can neither show nor rule out "
            f"{dim} neurons. As steering results only ({word}): {text}")
    return word, text
