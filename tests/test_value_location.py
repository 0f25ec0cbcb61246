"""Issue 25's location, null and controls, each against something computed independently: the
shipped data's texts, forward hooks over the statements, activation-probability deciles by
hand, bootstrap intervals by hand, and an end-to-end power test in which a planted neuron's
steering moves an instrument with the real item counts."""
from __future__ import annotations

import dataclasses
import re
import zlib
from types import SimpleNamespace

import pytest
import torch

from modules.policy import tiny
from values.data import AXES, AXIS_OF, NEUTRAL, load_value_data
from values.effects import bootstrap_effect, mean_effect, null_effect, null_quantile
from values.experiment import (LocateSettings, Reliability, arms, choose_sources, measure,
                               neuron_sets)
from values.location import location_prompts, teacher_forced_rows, teacher_forced_statistics
from values.instruments import Subject
from values.likelihood import CommonPrefix
from values.neurons import DIMENSIONS, OPPOSITE, SteerSettings, ValueNeurons, gated_mlps, \
    model_signature, random_control, select_neurons
from values.reliability import SplitHalf
from values.verdict import VerdictRule, instrument_row, verdict


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


@pytest.fixture(scope="module")
def data():
    return load_value_data()


@pytest.fixture(scope="module")
def policy():
    return tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                intermediate_size=64, seed=5)


# ----------------------------------------------------------------------------- location data


def evaluation_texts(data) -> list[str]:
    """Every text an instrument or control reads."""
    texts = [t for r in data.descriptions if r["split"] == "validate"
             for t in (r["text"], r["reversed"])]
    texts += [r["text"] for r in data.question_rows if r["split"] == "validate"]
    texts += [r["text"] for r in data.answer_rows]
    texts += [r["text"] for r in data.questionnaire]
    texts += [r["text"] for r in data.persona_rows]
    return texts + data.neutral_prompts + data.neutral_passages


def test_location_data_is_disjoint_from_the_evaluation_items(data, policy):
    """No location text (statement, negation or question of the locate split) is, or is
    inside, an evaluation text, and the decoded location prompts of both sources contain no
    evaluation text."""
    location = [t for r in data.descriptions if r["split"] == "locate"
                for t in (r["text"], r["reversed"])]
    location += [r["text"] for r in data.question_rows if r["split"] == "locate"]
    evaluation = [norm(t) for t in evaluation_texts(data)]
    for text in map(norm, location):
        assert not any(text in e or e in text for e in evaluation), text
    subject = Subject(policy, None, data)
    decode = subject.tokenizer.decode
    settings = LocateSettings(contrast="reversed")
    for source in settings.sources(list(DIMENSIONS)):
        prompts = [norm(decode(p)) for p in location_prompts(subject, source, 64)]
        prompts += [norm(decode(c + t)) for c, t in teacher_forced_rows(subject, source)]
        for e in evaluation:
            assert not any(e in p for p in prompts), (source, e)


def test_teacher_forced_statistics_match_forward_hooks(data, policy):
    """The pooled activation probability and the per-statement counts over the statement
    tokens equal what plain forward hooks give on each unpadded statement (the shared
    question prefilled once, uncounted)."""
    subject = Subject(policy, None, data)
    source = "conservation_reversed"
    stats = teacher_forced_statistics(subject, [source], lambda _: None)[source]
    rows = teacher_forced_rows(subject, source)
    assert len(stats.counts) == len(rows) == len(data.statements("conservation", "locate"))
    mlps = gated_mlps(policy.model)
    over = torch.zeros(len(rows), len(mlps), mlps[0].up_proj.out_features)
    for r, (context, text) in enumerate(rows):
        seen = []
        hooks = [m.act_fn.register_forward_hook(lambda mod, i, o: seen.append(o.detach()))
                 for m in mlps]
        with torch.no_grad():
            policy.model(input_ids=torch.tensor([context + text]))
        for h in hooks:
            h.remove()
        for layer, acts in enumerate(seen):
            over[r, layer] = (acts[0, len(context):] > 0).sum(0)
    # the question every statement answers is prefilled once for all (not counted)
    assert CommonPrefix(policy.model, [c + t for c, t in rows], limit=len(rows[0][0])).length \
        == len(rows[0][0]) > 0
    tokens = torch.tensor([len(t) for _, t in rows])
    assert torch.equal(stats.counts.tokens, tokens)
    assert torch.equal(stats.counts.over_zero.float(), over)
    assert torch.allclose(stats.summary.prob, over.sum(0) / tokens.sum(), atol=1e-6)
    assert stats.texts == data.statements("conservation", "locate", True)


def reliability_row(dim: str, source: str, sb: float) -> Reliability:
    r = sb / (2 - sb)  # the split-half correlation whose Spearman-Brown is sb
    return Reliability(dim, "reversed", [SplitHalf(16, r, 0.1, sb)], 0, 0, 0, 0, 10, 0.5, 0,
                       source)


def test_the_more_reliable_source_is_chosen_per_dimension():
    rows = [reliability_row("conservation", "generated", 0.2),
            reliability_row("conservation", "teacher_forced", 0.8),
            reliability_row("openness_to_change", "generated", 0.6),
            reliability_row("openness_to_change", "teacher_forced", float("nan"))]
    chosen = choose_sources(rows, ["conservation", "openness_to_change"], "reversed")
    assert chosen == {"conservation": "teacher_forced", "openness_to_change": "generated"}
    assert [r.chosen for r in rows] == [False, True, True, False]
    assert rows[1].spearman_brown == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no location of 'self_enhancement'"):
        choose_sources(rows, ["self_enhancement"], "reversed")
    with pytest.raises(ValueError, match="locate.source must be one of"):
        LocateSettings(source="sampled")


def test_a_set_holds_at_most_a_third_of_a_layer():
    """Every delta positive on a 6-neuron layer: the cap keeps the 2 largest there."""
    p_pos = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    p_neg = torch.full_like(p_pos, 0.1)
    chosen = select_neurons(p_pos, p_neg, top_k=100, min_delta=0.05)
    assert sorted(zip(chosen.layer.tolist(), chosen.index.tolist())) == [(0, 0), (0, 1), (1, 0)]


# ----------------------------------------------------------------------------- the null


def test_random_sets_match_the_activation_probability_decile():
    """prob = index / 100 on both layers, so a neuron's decile is index // 10: each random
    neuron has its located neuron's decile; a full decile borrows from the nearest one."""
    prob = (torch.arange(100) / 100).repeat(2, 1)
    located = ValueNeurons(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([5, 15, 25, 95, 50]),
                           torch.ones(5), torch.ones(5))
    for seed in range(5):
        control = random_control(located, 100, seed, prob=prob)
        assert torch.equal(control.index // 10, located.index // 10)
        assert control.layer_histogram(2) == located.layer_histogram(2)
        assert not set(zip(control.layer.tolist(), control.index.tolist())) & set(
            zip(located.layer.tolist(), located.index.tolist()))
    whole = ValueNeurons(torch.zeros(10, dtype=torch.long), torch.arange(10), torch.ones(10),
                         torch.ones(10))  # all of decile 0
    control = random_control(whole, 100, 0, prob=prob)
    assert set(control.index.tolist()) == set(range(10, 20))
    draws = [random_control(located, 100, s, prob=prob) for s in range(3)]
    assert len({tuple(d.index.tolist()) for d in draws}) == 3  # different draws


def test_neuron_sets_draw_many_matched_sets_and_arms_use_them_at_the_verdict_gamma(policy):
    signature = model_signature(policy.model)
    up = ValueNeurons(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.ones(2), torch.ones(2),
                      {"model": signature})
    down = ValueNeurons(torch.tensor([0]), torch.tensor([9]), torch.ones(1), torch.ones(1),
                        {"model": signature})
    sets = neuron_sets({"conservation": (up, down)}, 64, 0, draws=5)
    s = sets["conservation"]
    assert len(s.random_toward) == len(s.random_away) == 5
    taken = {(0, 3), (1, 4), (0, 9)}
    for t, a in zip(s.random_toward, s.random_away):
        mine = set(zip(t.layer.tolist(), t.index.tolist()))
        assert not mine & taken and not set(zip(a.layer.tolist(), a.index.tolist())) & mine
    all_arms = arms(sets, [1.0, 2.0], 0.9, 0, "p95", null_gamma=2.0)
    names = sorted(a.settings.name for a in all_arms)
    assert names == sorted(["located:conservation@1", "located:conservation@2",
                            "reverse:conservation@2",
                            "random:conservation@1", "random:conservation@2",
                            *(f"random{r}:conservation@2" for r in range(1, 5))])


def test_null_effect_and_quantile_by_hand():
    signs = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    located = torch.tensor([0.5, 0.7, 0.6, -0.2, 0.0, -0.1], dtype=torch.float64)
    # the same random set five times: no null spread, the interval is the units' alone
    same = torch.tensor([0.1, 0.0, 0.2, 0.0, 0.1, 0.0], dtype=torch.float64).repeat(5, 1)
    effect = null_effect([(1.0, located, same)], signs, 4000, 1)
    plain = bootstrap_effect(located - same[0], signs, 4000, 1)
    hand = (0.6 - 0.1) - (-0.1 - 1 / 30)
    assert effect.point == pytest.approx(hand) == pytest.approx(plain.point)
    assert effect.high - effect.low == pytest.approx(plain.high - plain.low, rel=0.1)
    # a spread of constant shifts between sets widens it; the mean shift is 0
    shifts = torch.tensor([-0.3, -0.1, 0.0, 0.1, 0.3], dtype=torch.float64)
    spread = same + shifts[:, None] * signs
    wide = null_effect([(1.0, located, spread)], signs, 4000, 1)
    assert wide.point == pytest.approx(hand)
    assert wide.high - wide.low > 1.5 * (effect.high - effect.low)
    # two terms: this pole's beyond its null minus the other pole's beyond its null
    two = null_effect([(1.0, located, same), (-1.0, located / 2, same)], signs, 200, 1)
    assert two.point == pytest.approx(hand - mean_effect(located / 2 - same[0], signs))
    assert null_quantile(0.3, [0.1, 0.2, 0.3, 0.4]) == pytest.approx((2 + 0.5) / 4)
    assert null_quantile(1.0, [0.1, 0.2]) == 1.0
    with pytest.raises(ValueError, match="do not match 6 units"):
        null_effect([(1.0, located, same[:, :4])], signs)


# ----------------------------------------------------------------------------- controls


class PersonaByText:
    """Scores that say which persona was given: base 0, each wording of a pole its own
    constant (k + 1 for the k-th wording, signed toward the axis's first pole), neutral
    wordings 0.25 * (k + 1)."""
    name, generates = "by_text", False

    def __init__(self, data) -> None:
        self.rank = {}
        for pole in (*DIMENSIONS, NEUTRAL):
            for k, text in enumerate(data.personas(pole)):
                self.rank[text] = (pole, k)

    def signs(self, subject, axis):
        return torch.ones(4)

    def score(self, subject, axis, persona, settings):
        if persona is None:
            return torch.zeros(4, dtype=torch.float64)
        pole, k = self.rank[persona]
        if pole == NEUTRAL:
            return torch.full((4,), 0.25 * (k + 1), dtype=torch.float64)
        sign = 1.0 if pole == AXES[axis][0] else -1.0
        return torch.full((4,), sign * (k + 1), dtype=torch.float64)

    def reset(self):
        pass


@pytest.mark.parametrize("personas", [None, 2])
def test_the_persona_control_is_every_wording_against_the_neutral_persona(data, personas):
    subject = SimpleNamespace(data=data, seed=0)
    m = measure(subject, [PersonaByText(data)], list(DIMENSIONS), [], personas, [], 50, 0,
                lambda _: None)
    n = len(data.personas("conservation")) if personas is None else personas
    pole_mean = sum(range(1, n + 1)) / n
    neutral_n = len(data.personas(NEUTRAL)) if personas is None else personas
    neutral_mean = 0.25 * sum(range(1, neutral_n + 1)) / neutral_n
    for dim in DIMENSIONS:
        first = AXES[AXIS_OF[dim]][0] == dim
        expected = pole_mean - neutral_mean if first else pole_mean + neutral_mean
        assert m.persona[("by_text", dim)].point == pytest.approx(expected)
    for axis in AXES:
        assert m.persona_axis[("by_text", axis)].point == pytest.approx(2 * pole_mean)


def test_neutral_personas_are_shipped_and_checked(data, tmp_path):
    assert len(data.personas(NEUTRAL)) == 6
    assert all(len(data.personas(d)) == 6 for d in DIMENSIONS)
    bad = dataclasses.replace(data, persona_rows=[*data.persona_rows,
                                                  {"pole": "hedonism", "text": "x"}])
    from values.data import check_data
    with pytest.raises(ValueError, match="unknown pole"):
        check_data(bad)
    none = dataclasses.replace(data, persona_rows=[r for r in data.persona_rows
                                                   if r["pole"] != NEUTRAL])
    with pytest.raises(ValueError, match="no persona for pole 'neutral'"):
        check_data(none)


# ----------------------------------------------------------------------------- power


class PlantedNeuronInstrument:
    """An instrument with the real item count of the statements (62 units of one axis) whose
    steered scores follow what steering does to the model: each unit moves toward the axis's
    first pole by `slope` x the rise of planted neuron (layer 1, index PLANTED)'s activation,
    read by a down_proj pre-hook of a real forward under the arm's steering, plus fixed unit
    noise. Personas move every unit by `persona`."""
    name, generates = "planted", False
    PLANTED = 7

    def __init__(self, data, model, slope: float, noise: torch.Tensor, persona: float = 0.4):
        self.data, self.model, self.slope, self.noise = data, model, slope, noise
        self.pole_of = {t: p for p in (*DIMENSIONS, NEUTRAL) for t in data.personas(p)}
        self.persona_shift = persona
        self.ids = torch.arange(3, 19)[None]
        self.base = self.activation(None)

    def activation(self, settings) -> float:
        seen = []
        mlp = gated_mlps(self.model)[1]
        hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        with torch.no_grad(), (settings.context(self.model) if settings else _null()):
            self.model(input_ids=self.ids)
        hook.remove()
        return float(seen[0][0, -1, self.PLANTED])

    def signs(self, subject, axis):
        first, second = AXES[axis]
        return torch.tensor([1.0] * len(self.data.statements(first, "validate")) +
                            [-1.0] * len(self.data.statements(second, "validate")))

    def score(self, subject, axis, persona, settings):
        signs = self.signs(subject, axis)
        out = self.noise[: len(signs)].clone()
        if persona is not None and self.pole_of[persona] != NEUTRAL:
            toward_first = 1.0 if self.pole_of[persona] == AXES[axis][0] else -1.0
            out += toward_first * self.persona_shift * signs
        if settings is not None:
            out += self.slope * (self.activation(settings) - self.base) * signs
            out += 0.02 * torch.randn(len(signs), generator=torch.Generator().manual_seed(
                zlib.crc32(settings.name.encode())), dtype=torch.float64)  # a set's own noise
        return out

    def reset(self):
        pass


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def planted_sets(model, dim: str, planted: bool) -> dict:
    """`dim`'s set holds the planted neuron (or, `planted=False`, a neuron steering
    does nothing to the instrument); its opposite's does not."""
    sig = model_signature(model)
    index = PlantedNeuronInstrument.PLANTED if planted else 30
    own = ValueNeurons(torch.tensor([1, 1, 0]), torch.tensor([index, 40, 12]), torch.ones(3),
                       torch.ones(3), {"model": sig}, torch.full((3,), 0.5))
    other = ValueNeurons(torch.tensor([1, 0]), torch.tensor([50, 20]), torch.ones(2),
                         torch.ones(2), {"model": sig}, torch.full((2,), 0.5))
    return {dim: (own, other), OPPOSITE[dim]: (other, own)}


@pytest.mark.parametrize("planted", [True, False])
def test_power_a_planted_value_is_shown_and_a_null_never_is(data, policy, planted):
    """The real item count (62 statements of one axis), 20 matched random sets, fixed gamma:
    a planted steerable neuron comes out "shown" for every unit-noise draw; a set without it
    comes out "ruled out" or "inconclusive", never "shown"."""
    model, dim = policy.model, "openness_to_change"  # the instrument moves toward it
    subject = SimpleNamespace(data=data, seed=0, model=model, pad=0)
    rule = VerdictRule(gamma=2.0, equivalence=0.5, max_perplexity=None, min_reliability=0.5)
    # the slope: steering the planted neuron alone at gamma 2 moves each unit by 0.3 (the
    # activation rise itself is small in a random model: the push times up_proj's output)
    alone = ValueNeurons(torch.tensor([1]), torch.tensor([PlantedNeuronInstrument.PLANTED]),
                         torch.ones(1), torch.ones(1), {"model": model_signature(model)},
                         torch.full((1,), 0.5))
    probe = PlantedNeuronInstrument(data, model, 0.0, torch.zeros(62))
    rise = probe.activation(SteerSettings(alone, 2.0, None, 1.0, 0)) - probe.base
    assert abs(rise) > 1e-3
    words = []
    for seed in range(6):
        noise = 0.1 * torch.randn(62, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
        inst = PlantedNeuronInstrument(data, model, 0.3 / rise, noise)
        sets = neuron_sets(planted_sets(model, dim, planted), 64, seed, draws=20)
        all_arms = [a for a in arms(sets, [2.0], 1.0, 0, "probability", null_gamma=2.0)
                    if a.kind != "reverse"]
        m = measure(subject, [inst], [dim, OPPOSITE[dim]], all_arms, 2, [], 300, 0,
                    lambda _: None, controls_first=True, max_perplexity=None)
        assert m.quantiles[("planted", dim, 2.0)][1] == 20
        row = instrument_row(m, "planted", dim, 2.0)
        words.append(verdict(dim, [row], rule, reliability=0.9)[0])
    if planted:
        assert words == ["shown"] * 6, words
    else:
        assert "shown" not in words and set(words) <= {"ruled out", "inconclusive"}, words
