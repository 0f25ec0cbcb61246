"""The phases of a value-neuron experiment (docs/ARCHITECTURE.md section 9), called in order by
`locate_values.py`; each takes typed inputs and returns a typed value.

1. values/location.py: `location_statistics` (greedy responses to location prompts, a
   location statement of a source, or its negation, + a location question), their activation
   statistics per source, pooled and per prompt (a source is a pole or "<pole>_reversed");
   `teacher_forced_statistics`: the same statistics over the location statements themselves
   (teacher-forced, one unit per statement: no sampling noise).
2. `locate`: per dimension the set toward it (delta > 0 against its negative source) and the
   set away from it (the negative source against the pole); `neuron_sets` adds random
   controls with the same count per layer.
3. `reliability`: permutation null and split-half reliability of delta, per contrast and
   source; `choose_sources` takes the more reliable source per dimension, before any steering.
4. `measure`: every instrument under base, persona, located, random and reverse arms at each
   gamma, and the perplexity cost.

    stats = location_statistics(subject, settings, settings.sources(dims))
    sets = neuron_sets(locate(stats, select, dims, settings.negative, nulls, meta), d_ff, seed)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from values.data import AXES, AXIS_OF, NEUTRAL, toward
from values.effects import MAX_PERPLEXITY_RATIO, Effect, bootstrap_effect, control_passes, \
    mean_effect, null_effect, null_quantile
from values.instruments import Instrument, Subject
from values.likelihood import perplexity
from values.location import SourceStats
from values.neurons import OPPOSITE, SteerSettings, ValueNeurons, random_control
from values.reliability import NullDistribution, SplitHalf, permutation_null, split_half
from values.selection import Selection

CONTRASTS = {"reversed": lambda pole: f"{pole}_reversed", "opposite_pole": OPPOSITE.get}
# Where the location's activations come from: greedy answers the model generates to location
# prompts (the authors' source), or the location statements themselves, teacher-forced.
SOURCES = ("generated", "teacher_forced")


@dataclass
class LocateSettings:
    """`locate.*`: how much location data, against what, and how it is checked."""
    pairs: int = 64
    max_new_tokens: int = 32
    contrast: str = "reversed"
    null_shuffles: int = 200
    split_half_repeats: int = 3
    cache: bool = True  # reuse location statistics from paths.cache_dir (values/storage.py)
    source: str = "auto"  # generated | teacher_forced | auto (both; each dimension takes the
    #                       one whose location is the more reliable)

    def __post_init__(self) -> None:
        if not isinstance(self.cache, bool):
            raise ValueError(f"locate.cache must be true or false, got {self.cache!r}")
        if self.source not in (*SOURCES, "auto"):
            raise ValueError(f"locate.source must be one of {', '.join(SOURCES)} or auto, got "
                             f"{self.source!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"locate.contrast must be one of {', '.join(CONTRASTS)}, got "
                             f"{self.contrast!r}")
        for name in ("pairs", "max_new_tokens", "null_shuffles",
                     "split_half_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"locate.{name} must be an integer >= 1, got {value!r}")
        if self.max_new_tokens > 32767:
            raise ValueError("locate.max_new_tokens must be < 32768 (per-prompt counts)")

    def negative(self, pole: str) -> str:
        return CONTRASTS[self.contrast](pole)

    @property
    def location_sources(self) -> tuple[str, ...]:
        """The location sources gathered: one, or both with `auto`."""
        return SOURCES if self.source == "auto" else (self.source,)

    def sources(self, poles: list[str]) -> list[str]:
        """Every response set that location needs: the poles and their negatives (with all
        four poles, the reversed contrast's run also holds the opposite-pole contrast)."""
        return list(dict.fromkeys([*poles, *(self.negative(p) for p in poles)]))


@dataclass
class DimensionSets:
    toward: ValueNeurons  # pushed to steer toward the dimension
    away: ValueNeurons  # clamped then (and pushed by the reverse arm)
    random_toward: list[ValueNeurons]  # the random null: matched sets, draw 0 first
    random_away: list[ValueNeurons]


def neuron_sets(located: dict[str, tuple[ValueNeurons, ValueNeurons]], d_ff: int,
                seed: int, draws: int = 1,
                prob: dict[str, torch.Tensor] | None = None) -> dict[str, DimensionSets]:
    """`draws` random controls for each dimension's (toward, away) pair: the same count per
    layer (and, with `prob`, per dimension [layers, d_ff], the same activation-probability
    decile per neuron), avoiding the located neurons; each draw's away set also avoids its
    toward set."""
    out = {}
    for k, (dim, (up, down)) in enumerate(located.items()):
        ups, downs = [], []
        for draw in range(draws):
            base = seed + 2 * k + 1000 * draw
            matched = None if prob is None else prob[dim]
            rand_up = random_control(up, d_ff, base, exclude=[down], prob=matched)
            ups.append(rand_up)
            downs.append(random_control(down, d_ff, base + 1, exclude=[up, rand_up],
                                        prob=matched))
        out[dim] = DimensionSets(up, down, ups, downs)
    return out


def locate(stats: dict[str, SourceStats], select: Selection, dims: list[str],
           negative: Callable[[str], str], nulls: dict[tuple[str, str], NullDistribution],
           meta: dict[str, Any]) -> dict[str, tuple[ValueNeurons, ValueNeurons]]:
    """Each dimension's set toward it (pole against its negative) and away from it."""
    out = {}
    for dim in dims:
        neg = negative(dim)
        up = select(stats, dim, neg, nulls.get((dim, neg)))
        down = select(stats, neg, dim, nulls.get((neg, dim))) if neg in stats else None
        if down is None:
            raise ValueError(f"no location statistics for {neg!r}, the negative of {dim!r}")
        for s, direction in ((up, "toward"), (down, "away")):
            s.meta.update(meta, dimension=dim, direction=direction, negative=neg)
        out[dim] = (up, down)
    return out


@dataclass
class Reliability:
    dimension: str
    contrast: str
    curve: list[SplitHalf]
    null_max95: float  # the 95th / 99th percentile of the shuffles' maximum delta
    null_max99: float
    above95: int  # neurons of the located set above those
    above99: int
    set_size: int
    fdr_at_set: float  # estimated FDR of the whole set (at its smallest delta)
    fdr05_count: int  # neurons kept at FDR 5%
    source: str = "generated"  # the location source (SOURCES)
    chosen: bool = False  # the source and contrast the dimension's located set comes from

    @property
    def spearman_brown(self) -> float:
        """The reliability of the statistic over all the units (the curve's last point)."""
        return self.curve[-1].spearman_brown


def choose_sources(rows: list[Reliability], dims: list[str], contrast: str) -> dict[str, str]:
    """Per dimension, the source whose location (of `contrast`) is the more reliable, by
    split-half Spearman-Brown; read before anything is steered. Marks the chosen rows."""
    chosen = {}
    for dim in dims:
        mine = [r for r in rows if r.dimension == dim and r.contrast == contrast]
        if not mine:
            raise ValueError(f"no location of {dim!r} with contrast {contrast!r}")
        best = max(mine, key=lambda r: r.spearman_brown if r.spearman_brown == r.spearman_brown
                   else float("-inf"))
        best.chosen, chosen[dim] = True, best.source
    return chosen


def reliability(stats: dict[str, SourceStats], dim: str, negative: str, contrast: str,
                located: ValueNeurons, top_k: int, null: NullDistribution,
                repeats: int, seed: int, source: str = "generated") -> Reliability:
    pos, neg = stats[dim], stats[negative]
    delta = pos.summary.prob - neg.summary.prob
    curve = split_half(pos.counts, neg.counts, top_k, repeats=repeats, seed=seed)
    at = delta[located.layer, located.index]
    q95, q99 = null.max_quantile(0.95), null.max_quantile(0.99)
    smallest = float(at.min()) if len(at) else float("inf")
    threshold = null.fdr_threshold(delta, 0.05)
    return Reliability(dim, contrast, curve, q95, q99, int((at > q95).sum()),
                       int((at > q99).sum()), len(located),
                       null.fdr(delta, smallest) if len(at) else float("nan"),
                       int((delta >= threshold).sum()), source)


def nulls_for(stats: dict[str, SourceStats], pairs: list[tuple[str, str]], shuffles: int,
              seed: int) -> dict[tuple[str, str], NullDistribution]:
    return {(a, b): permutation_null(stats[a].counts, stats[b].counts, shuffles, seed + k)
            for k, (a, b) in enumerate(dict.fromkeys(pairs))}


# ----------------------------------------------------------------------------- measurement


@dataclass
class Arm:
    """One condition of the model toward (or, `reverse`, away from) a dimension."""
    dimension: str
    kind: str  # located | random | reverse
    gamma: float
    settings: SteerSettings
    draw: int = 0  # which random set of the null (0 for located and reverse)


def arms(sets: dict[str, DimensionSets], gammas: list[float], fraction: float, seed: int,
         scale: str, null_gamma: float | None = None) -> list[Arm]:
    """Every arm. With `null_gamma` (the verdict's gamma) the random arm is every set of the
    null there and the first set at the other gammas, and the reverse arm (read beside the
    verdict, never by it) is at `null_gamma` only; without it, one random set and a reverse
    arm at every gamma."""
    out = []
    for dim, s in sets.items():
        for g in gammas:
            pairs = [("located", 0, s.toward, s.away)]
            draws = range(len(s.random_toward)) if g == null_gamma else range(1)
            pairs += [("random", r, s.random_toward[r], s.random_away[r]) for r in draws]
            if null_gamma is None or g == null_gamma:
                pairs.append(("reverse", 0, s.away, s.toward))
            for kind, r, push, clamp in pairs:
                name = f"{kind}{r if r else ''}:{dim}@{g:g}"
                out.append(Arm(dim, kind, g, SteerSettings(
                    push, g, clamp, fraction, seed, scale=scale, name=name), r))
    return sorted(out, key=lambda a: (list(sets).index(a.dimension), a.draw, a.kind, a.gamma))


@dataclass
class Measurement:
    """Effects toward each dimension (persona and arms), per instrument, and the cost."""
    persona: dict[tuple[str, str], Effect] = field(default_factory=dict)  # (instr, dim)
    # (instr, axis): the first pole's personas minus the second's, toward the first pole
    persona_axis: dict[tuple[str, str], Effect] = field(default_factory=dict)
    arms: dict[tuple[str, str, str, float], Effect] = field(default_factory=dict)
    contrasts: dict[tuple[str, str, float], Effect] = field(default_factory=dict)  # loc-rand
    # (instr, dim, gamma): this pole's located-minus-random minus the opposite pole's, toward dim
    specific: dict[tuple[str, str, float], Effect] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)  # arm name -> ratio to base
    base_perplexity: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)  # (instr, axis): why
    no_reverse: list[tuple[str, str]] = field(default_factory=list)  # (instr, dim): control fails
    # (instr, dim, gamma): the located effect's quantile among the random sets' effects, and
    # how many random sets there were
    quantiles: dict[tuple[str, str, float], tuple[float, int]] = field(default_factory=dict)

    def passes(self, instrument: str, dim: str) -> bool:
        effect = self.persona.get((instrument, dim))
        return effect is not None and control_passes(effect)


def measure(subject: Subject, instruments: list[Instrument], dims: list[str],
            all_arms: list[Arm], personas: int | None, generate_gammas: list[float], boot: int,
            passages: int, log: Callable[[str], None] = print, controls_first: bool = True,
            max_perplexity: float | None = MAX_PERPLEXITY_RATIO) -> Measurement:
    """The cost first (perplexity ratio of every arm on neutral text), then per instrument
    and axis: the unsteered base, the persona controls (the first `personas` wordings of each
    pole against as many neutral ones; None: all), and the arms. With `controls_first`
    an instrument whose control fails for both poles of an axis is not steered on it (it
    is uninformative there: nothing would be read), and a pole whose control fails is not
    steered in reverse (no verdict reads it); with `max_perplexity` an arm whose
    cost exceeds it is not measured (no verdict reads it): a located or random arm is measured
    when its own located arm or the opposite pole's is within the limit (the opposite pole's
    verdict checks pole-specificity with it), a reverse arm when its own cost is."""
    out = Measurement()
    if passages > 0 and instruments:  # no instrument: a reliability-only run
        clock = time.perf_counter()
        texts = [subject.prompts.plain(t) for t in subject.data.neutral_passages[:passages]]
        out.base_perplexity = perplexity(subject.model, texts, None, pad_token_id=subject.pad)
        for arm in (a for a in all_arms if a.draw == 0):  # the null's other sets: same push
            with arm.settings.context(subject.model) as steering:
                value = perplexity(subject.model, texts, steering, pad_token_id=subject.pad)
            out.perplexity[arm.settings.name] = value / out.base_perplexity
        out.seconds["perplexity"] = time.perf_counter() - clock
        log(f"perplexity of {len(out.perplexity)} arms: {out.seconds['perplexity']:.0f} s")

    def within(name: str) -> bool:
        return max_perplexity is None or out.perplexity.get(name, 1.0) <= max_perplexity

    def affordable(arm: Arm) -> bool:
        if arm.kind == "reverse":
            return within(arm.settings.name)
        # located and random at gamma g: read by this pole's verdict, and by the opposite
        # pole's pole-specificity check when that pole's located arm is within the limit
        poles = [d for d in (arm.dimension, OPPOSITE[arm.dimension]) if d in dims]
        return any(within(f"located:{d}@{arm.gamma:g}") for d in poles)

    for inst in instruments:
        clock = time.perf_counter()
        for axis in dict.fromkeys(AXIS_OF[d] for d in dims):
            signs = inst.signs(subject, axis)
            base = inst.score(subject, axis, None, None)
            on_axis = [d for d in dims if AXIS_OF[d] == axis]
            # the control: each pole's personas (every wording, averaged) against the neutral
            # persona's, and the axis's persona contrast (first pole's minus second's)
            def persona_mean(pole: str) -> torch.Tensor:
                return torch.stack([inst.score(subject, axis, text, None)
                                    for text in subject.data.personas(pole)[:personas]]).mean(0)

            neutral = persona_mean(NEUTRAL)
            by_pole = {dim: persona_mean(dim) for dim in on_axis}
            for dim in on_axis:
                out.persona[(inst.name, dim)] = bootstrap_effect(
                    by_pole[dim] - neutral, signs, boot, subject.seed).toward(toward(dim))
            if len(by_pole) == 2:
                first, second = AXES[axis]
                out.persona_axis[(inst.name, axis)] = bootstrap_effect(
                    by_pole[first] - by_pole[second], signs, boot, subject.seed)
            if controls_first and not any(out.passes(inst.name, d) for d in on_axis):
                out.skipped[(inst.name, axis)] = "fails its control on both poles"
                log(f"instrument {inst.name}: control fails on {axis}, arms not measured")
                continue
            # (dim, g): the located arm's and the random sets' score changes, per unit
            beyond: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}
            for dim in on_axis:
                direction = toward(dim)
                scores = {}
                # a pole whose control fails has no verdict here: its located and random
                # arms are still read by the opposite pole's pole-specificity check, its
                # reverse arms by nothing
                unread = controls_first and not out.passes(inst.name, dim)
                if unread:
                    out.no_reverse.append((inst.name, dim))
                for arm in all_arms:
                    if arm.dimension != dim or not affordable(arm) or (
                            inst.generates and arm.gamma not in generate_gammas) or (
                            unread and arm.kind == "reverse"):
                        continue
                    scores[(arm.kind, arm.gamma, arm.draw)] = inst.score(
                        subject, axis, None, arm.settings) - base
                # per gamma, the random sets' changes [sets, units]
                null = {g: torch.stack([c for (k, h, _), c in scores.items()
                                        if (k, h) == ("random", g)])
                        for k, g, _ in scores if k == "random"}
                for (kind, g, draw), change in scores.items():
                    if kind == "random" and draw > 0:
                        continue
                    out.arms[(inst.name, dim, kind, g)] = bootstrap_effect(
                        null[g].mean(0) if kind == "random" else change, signs, boot,
                        subject.seed).toward(direction)
                for (kind, g, draw), located in scores.items():
                    if kind != "located" or g not in null:
                        continue
                    randoms = null[g]
                    beyond[(dim, g)] = (located, randoms)
                    out.contrasts[(inst.name, dim, g)] = null_effect(
                        [(1.0, located, randoms)], signs, boot, subject.seed).toward(direction)
                    out.quantiles[(inst.name, dim, g)] = (null_quantile(
                        direction * mean_effect(located, signs),
                        [direction * mean_effect(r, signs) for r in randoms]), len(randoms))
            # pole-specificity: this pole's set moves the instrument toward this pole more than
            # the opposite pole's set does (both beyond their random sets, on the same units)
            for (dim, g), (located, randoms) in beyond.items():
                if (OPPOSITE[dim], g) in beyond:
                    other, other_randoms = beyond[(OPPOSITE[dim], g)]
                    out.specific[(inst.name, dim, g)] = null_effect(
                        [(1.0, located, randoms), (-1.0, other, other_randoms)], signs, boot,
                        subject.seed).toward(toward(dim))
        out.seconds[inst.name] = time.perf_counter() - clock
        log(f"instrument {inst.name}: {out.seconds[inst.name]:.0f} s")
    return out


__all__ = ["AXES", "Arm", "DimensionSets", "LocateSettings", "Measurement", "Reliability",
           "SOURCES", "arms", "choose_sources", "locate", "measure", "neuron_sets", "nulls_for",
           "reliability"]
