"""The phases of a value-neuron experiment (DESIGN.md section 9), called in order by
`locate_values.py`; each takes typed inputs and returns a typed value.

1. `location_statistics`: greedy responses to location prompts (a location statement of a
   source, or its negation, + a location question), their activation statistics per source,
   pooled and per prompt. A source is a pole or "<pole>_reversed".
2. `locate`: per dimension the set toward it (delta > 0 against its negative source) and the
   set away from it (the negative source against the pole); `neuron_sets` adds random
   controls with the same count per layer.
3. `reliability`: permutation null and split-half reliability of delta, per contrast.
4. `measure`: every instrument under base, persona, located, random and reverse arms at each
   gamma, and the perplexity cost.

    stats = location_statistics(subject, settings, settings.sources(dims))
    sets = neuron_sets(locate(stats, select, dims, settings.negative, nulls, meta), d_ff, seed)
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from values.data import AXES, AXIS_OF, toward
from values.effects import MAX_PERPLEXITY_RATIO, Effect, bootstrap_effect, control_passes
from values.instruments import Instrument, Subject
from values.likelihood import perplexity
from values.neurons import OPPOSITE, SteerSettings, ValueNeurons, random_control
from values.reliability import NullDistribution, SplitHalf, permutation_null, split_half
from values.selection import Selection
from values.statistics import ActivationStats, ActivationSummary, PromptCounts, \
    record_activations, record_decoding

CONTRASTS = {"reversed": lambda pole: f"{pole}_reversed", "opposite_pole": OPPOSITE.get}


@dataclass
class LocateSettings:
    """`locate.*`: how much location data, against what, and how it is checked."""
    pairs: int = 64
    max_new_tokens: int = 32
    contrast: str = "reversed"
    null_shuffles: int = 200
    split_half_repeats: int = 3
    cache: bool = True  # reuse location statistics from paths.cache_dir (values/storage.py)

    def __post_init__(self) -> None:
        if not isinstance(self.cache, bool):
            raise ValueError(f"locate.cache must be true or false, got {self.cache!r}")
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

    def sources(self, poles: list[str]) -> list[str]:
        """Every response set that location needs: the poles and their negatives (with all
        four poles, the reversed contrast's run also holds the opposite-pole contrast)."""
        return list(dict.fromkeys([*poles, *(self.negative(p) for p in poles)]))


@dataclass
class SourceStats:
    summary: ActivationSummary  # pooled over the source's response tokens
    counts: PromptCounts  # per prompt
    texts: list[str] = field(default_factory=list)


def location_prompts(subject: Subject, source: str, pairs: int) -> list[list[int]]:
    """`pairs` prompts "statement of the source + location question of its axis"; the two
    poles of an axis and their negations get the same questions in the same order, and a
    pole and its negation the same statement slots."""
    pole, reversed_ = source.removesuffix("_reversed"), source.endswith("_reversed")
    statements = subject.data.statements(pole, "locate", reversed_)
    questions = list(subject.data.questions(pole, "locate"))
    random.Random(subject.seed).shuffle(questions)
    order = list(range(len(statements)))
    random.Random(subject.seed + 1).shuffle(order)
    return [subject.prompts.contrast(statements[order[k % len(order)]],
                                     questions[k % len(questions)]) for k in range(pairs)]


def sequences(prompts: list[list[int]], rollouts: Any, pad: int,
              limit: int | None = None) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + completion ids [N, S] and the mask of completion tokens [N, S]
    (of the first `limit` rollouts, or all)."""
    rows = []
    for r in range(len(rollouts) if limit is None else min(limit, len(rollouts))):
        prompt = prompts[int(rollouts.prompt_index[r])]
        completion = rollouts.completion_ids[r, : int(rollouts.lengths[r])].tolist()
        rows.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, (prompt, completion) in enumerate(rows):
        ids[r, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        mask[r, len(prompt): len(prompt) + len(completion)] = True
    return ids, mask


@torch.no_grad()
def response_statistics(model: Any, ids: torch.Tensor, mask: torch.Tensor,
                        stats: ActivationStats, batch_size: int = 8,
                        counts: PromptCounts | None = None) -> ActivationStats:
    """Feed right-padded sequences through the model, counting the masked tokens (pooled in
    `stats`, per sequence in `counts`)."""
    device = next(model.parameters()).device
    with record_activations(model, stats, counts) as recorder:
        for start in range(0, len(ids), batch_size):
            chunk, chunk_mask = ids[start: start + batch_size], mask[start: start + batch_size]
            width = int(chunk_mask.nonzero()[:, 1].max()) + 1 if chunk_mask.any() else 1
            recorder.mask = chunk_mask[:, :width].to(device)
            model(input_ids=chunk[:, :width].to(device), use_cache=False)
    return stats


def location_statistics(subject: Subject, settings: LocateSettings, sources: list[str],
                        log: Callable[[str], None] = print) -> dict[str, SourceStats]:
    """Each source's responses, counted while they are generated (record_decoding)."""
    out = {}
    for source in sources:
        prompts = location_prompts(subject, source, settings.pairs)
        stats = ActivationStats.for_model(subject.model)
        counts = PromptCounts.for_model(subject.model, len(prompts))
        with record_decoding(subject.model, stats, counts):
            rollouts, texts = subject.generate(prompts, settings.max_new_tokens)
        out[source] = SourceStats(stats.compute(), counts, texts)
        log(f"source {source}: {settings.pairs} responses, {out[source].summary.tokens} "
            f"response tokens, {rollouts.stats.wall_time_s:.1f} s sampling")
    return out


@dataclass
class DimensionSets:
    toward: ValueNeurons  # pushed to steer toward the dimension
    away: ValueNeurons  # clamped then (and pushed by the reverse arm)
    random_toward: ValueNeurons
    random_away: ValueNeurons


def neuron_sets(located: dict[str, tuple[ValueNeurons, ValueNeurons]], d_ff: int,
                seed: int) -> dict[str, DimensionSets]:
    """Random controls (same count per layer, avoiding the located neurons) for each
    dimension's (toward, away) pair."""
    out = {}
    for k, (dim, (up, down)) in enumerate(located.items()):
        rand_up = random_control(up, d_ff, seed + 2 * k, exclude=[down])
        rand_down = random_control(down, d_ff, seed + 2 * k + 1, exclude=[up, rand_up])
        out[dim] = DimensionSets(up, down, rand_up, rand_down)
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


def reliability(stats: dict[str, SourceStats], dim: str, negative: str, contrast: str,
                located: ValueNeurons, top_k: int, null: NullDistribution,
                repeats: int, seed: int) -> Reliability:
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
                       int((delta >= threshold).sum()))


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


def arms(sets: dict[str, DimensionSets], gammas: list[float], fraction: float, seed: int,
         scale: str) -> list[Arm]:
    out = []
    for dim, s in sets.items():
        pairs = {"located": (s.toward, s.away), "random": (s.random_toward, s.random_away),
                 "reverse": (s.away, s.toward)}
        for kind, (push, clamp) in pairs.items():
            for g in gammas:
                out.append(Arm(dim, kind, g, SteerSettings(
                    push, g, clamp, fraction, seed, scale=scale, name=f"{kind}:{dim}@{g:g}")))
    return out


@dataclass
class Measurement:
    """Effects toward each dimension (persona and arms), per instrument, and the cost."""
    persona: dict[tuple[str, str], Effect] = field(default_factory=dict)  # (instr, dim)
    arms: dict[tuple[str, str, str, float], Effect] = field(default_factory=dict)
    contrasts: dict[tuple[str, str, float], Effect] = field(default_factory=dict)  # loc-rand
    # (instr, dim, gamma): this pole's located-minus-random minus the opposite pole's, toward dim
    specific: dict[tuple[str, str, float], Effect] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)  # arm name -> ratio to base
    base_perplexity: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)  # (instr, axis): why
    no_reverse: list[tuple[str, str]] = field(default_factory=list)  # (instr, dim): control fails

    def passes(self, instrument: str, dim: str) -> bool:
        effect = self.persona.get((instrument, dim))
        return effect is not None and control_passes(effect)


def measure(subject: Subject, instruments: list[Instrument], dims: list[str],
            all_arms: list[Arm], personas: int, generate_gammas: list[float], boot: int,
            passages: int, log: Callable[[str], None] = print, controls_first: bool = True,
            max_perplexity: float | None = MAX_PERPLEXITY_RATIO) -> Measurement:
    """The cost first (perplexity ratio of every arm on neutral text), then per instrument
    and axis: the unsteered base, the persona controls, and the arms. With `controls_first`
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
        for arm in all_arms:
            with arm.settings.context(subject.model) as steering:
                value = perplexity(subject.model, texts, steering, pad_token_id=subject.pad)
            out.perplexity[arm.settings.name] = value / out.base_perplexity
        out.seconds["perplexity"] = time.perf_counter() - clock
        log(f"perplexity of {len(all_arms)} arms: {out.seconds['perplexity']:.0f} s")

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
            for dim in on_axis:
                persona = torch.stack([inst.score(subject, axis, p, None) for p in
                                       subject.data.personas(dim)[:personas]]).mean(0)
                out.persona[(inst.name, dim)] = bootstrap_effect(
                    persona - base, signs, boot, subject.seed).toward(toward(dim))
            if controls_first and not any(out.passes(inst.name, d) for d in on_axis):
                out.skipped[(inst.name, axis)] = "fails its control on both poles"
                log(f"instrument {inst.name}: control fails on {axis}, arms not measured")
                continue
            beyond: dict[tuple[str, float], torch.Tensor] = {}  # located - random per unit
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
                    scores[(arm.kind, arm.gamma)] = inst.score(subject, axis, None,
                                                               arm.settings)
                    out.arms[(inst.name, dim, arm.kind, arm.gamma)] = bootstrap_effect(
                        scores[(arm.kind, arm.gamma)] - base, signs, boot,
                        subject.seed).toward(direction)
                for (kind, g), steered in scores.items():
                    if kind == "located" and ("random", g) in scores:
                        beyond[(dim, g)] = steered - scores[("random", g)]
                        out.contrasts[(inst.name, dim, g)] = bootstrap_effect(
                            beyond[(dim, g)], signs, boot, subject.seed).toward(direction)
            # pole-specificity: this pole's set moves the instrument toward this pole more than
            # the opposite pole's set does (both beyond their random sets, on the same units)
            for (dim, g), own in beyond.items():
                if (OPPOSITE[dim], g) in beyond:
                    out.specific[(inst.name, dim, g)] = bootstrap_effect(
                        own - beyond[(OPPOSITE[dim], g)], signs, boot,
                        subject.seed).toward(toward(dim))
        out.seconds[inst.name] = time.perf_counter() - clock
        log(f"instrument {inst.name}: {out.seconds[inst.name]:.0f} s")
    return out


__all__ = ["AXES", "Arm", "DimensionSets", "LocateSettings", "Measurement", "Reliability",
           "SourceStats", "arms", "locate", "location_statistics", "measure", "neuron_sets",
           "nulls_for", "reliability", "response_statistics", "sequences"]
