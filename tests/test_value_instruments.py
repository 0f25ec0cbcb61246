"""The instruments against independent computations: plain unsteered forwards, step-by-step
steered decoding, a down_proj pre-hook that counts steered positions, the MiniLM embeddings
by hand, and the positive-control gate and effects on synthetic scores."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from modules.policy import tiny
from tests.helpers import past
from values.data import AXES, load_value_data
from values.effects import NAN, Effect, bootstrap_effect, control_passes, mean_effect
from values.instruments import DilemmaMargin, LetteredChoice, Questionnaire, \
    StatementLikelihood, Subject
from values.judges import EmbeddingJudge
from values.neurons import SteerSettings, ValueNeurons, gated_mlps, model_signature, steer

AXIS = "openness_vs_conservation"
FIRST, SECOND = AXES[AXIS]


@pytest.fixture(scope="module")
def subject():
    """A tiny policy over a character tokenizer and 3 dilemmas of one axis."""
    data = load_value_data()
    rows = [r for r in data.answer_rows if r["axis"] == AXIS][:6]
    policy = tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  intermediate_size=64, seed=3)
    return Subject(policy, None, dataclasses.replace(data, answer_rows=rows))


def neurons_of(model, rows) -> ValueNeurons:
    layer, index = zip(*rows)
    return ValueNeurons(torch.tensor(layer), torch.tensor(index), torch.full((len(rows),), 0.5),
                        torch.full((len(rows),), 2.0), {"model": model_signature(model)},
                        torch.full((len(rows),), 0.8))


def answer_logprob(model, context, answer) -> float:
    """Mean log p of `answer` after `context`: one plain forward, no cache, no padding."""
    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(answer)) / len(answer)


def stepwise_logprob(model, context, answer) -> float:
    """The same, decoded one token at a time (what generation under `steer` does: the
    context's forward steers its last position, each one-token forward steers its token)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context]), use_cache=True)
        total = 0.0
        for k, token in enumerate(answer):
            total += float(torch.log_softmax(out.logits[0, -1].double(), -1)[token])
            out = model(input_ids=torch.tensor([[token]]), **past(model, out),
                        position_ids=torch.tensor([[len(context) + k]]), use_cache=True)
    return total / len(answer)


def test_dilemma_margin_equals_plain_and_stepwise_steered_forwards(subject):
    model, prompts = subject.model, subject.prompts
    dilemmas = subject.data.dilemmas(AXIS)
    assert len(dilemmas) == 3
    inst = DilemmaMargin(batch_size=4)  # batches mix dilemmas of different lengths
    got = inst.score(subject, AXIS, None, None)
    expected = [answer_logprob(model, prompts.dilemma(q), prompts.continuation(a[FIRST])) -
                answer_logprob(model, prompts.dilemma(q), prompts.continuation(a[SECOND]))
                for q, a in dilemmas]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    target, opposite = neurons_of(model, [(0, 3), (1, 7), (1, 9)]), neurons_of(model, [(0, 5)])
    settings = SteerSettings(target, 3.0, opposite, fraction=1.0, scale="p95")
    steered = inst.score(subject, AXIS, None, settings)
    with steer(model, target, 3.0, opposite, fraction=1.0):
        expected = [stepwise_logprob(model, prompts.dilemma(q), prompts.continuation(a[FIRST])) -
                    stepwise_logprob(model, prompts.dilemma(q), prompts.continuation(a[SECOND]))
                    for q, a in dilemmas]
    torch.testing.assert_close(steered, torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(steered, got, atol=1e-4)
    # a persona changes the context: the same plain computation with the system prompt
    persona = subject.data.personas(FIRST)[0]
    q, a = dilemmas[0]
    with_persona = inst.score(subject, AXIS, persona, None)
    assert float(with_persona[0]) == pytest.approx(
        answer_logprob(model, prompts.dilemma(q, persona), prompts.continuation(a[FIRST])) -
        answer_logprob(model, prompts.dilemma(q, persona), prompts.continuation(a[SECOND])),
        abs=1e-5)


def test_steering_covers_every_answer_position(subject):
    """A down_proj pre-hook sees the steered neuron changed at exactly one position per answer
    token (the context's last and every answer token but the last), and nowhere else."""
    model, prompts = subject.model, subject.prompts
    inst = StatementLikelihood(batch_size=5)
    inst.score(subject, AXIS, None, None)  # builds the cached prefixes (unsteered)
    seen: list[torch.Tensor] = []
    down = gated_mlps(model)[1].down_proj
    hook = down.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., 9].clone()))
    try:
        inst.score(subject, AXIS, None, None)
        plain, seen[:] = list(seen), []
        target = neurons_of(model, [(1, 9)])
        inst.score(subject, AXIS, None, SteerSettings(target, 5.0, fraction=1.0, scale="p95"))
        steered = list(seen)
    finally:
        hook.remove()
    changed = sum(int((a != b).sum()) for a, b in zip(plain, steered))
    answers = [len(prompts.continuation(s)) for pole in AXES[AXIS]
               for s in subject.data.statements(pole, "validate")]
    assert len(plain) == len(steered) == -(-len(answers) // 5)  # one suffix forward per batch
    assert changed == sum(answers)


def test_lettered_choice_is_counterbalanced_and_scored_by_hand(subject):
    """Each dilemma in both orders: the unit is the mean over the orders of log p(the first
    pole's letter) - log p(the other), so a constant preference for "A" cancels."""
    model, prompts = subject.model, subject.prompts
    dilemmas = subject.data.dilemmas(AXIS)
    got = LetteredChoice(batch_size=3).score(subject, AXIS, None, None)
    assert got.shape == (len(dilemmas),)
    letter = {x: prompts.continuation(x) for x in "AB"}
    for k, (q, a) in enumerate(dilemmas):
        margins = []
        for first_is, pair in (("A", (a[FIRST], a[SECOND])), ("B", (a[SECOND], a[FIRST]))):
            context = prompts.lettered(q, *pair)
            assert f"{first_is}) {a[FIRST]}" in subject.tokenizer.decode(context)
            other = "B" if first_is == "A" else "A"
            margins.append(answer_logprob(model, context, letter[first_is]) -
                           answer_logprob(model, context, letter[other]))
        assert float(got[k]) == pytest.approx(sum(margins) / 2, abs=1e-5)


def test_questionnaire_and_statement_units_carry_their_pole(subject):
    data = subject.data
    signs = StatementLikelihood().signs(subject, AXIS)
    assert int((signs > 0).sum()) == len(data.statements(FIRST, "validate"))
    assert int((signs < 0).sum()) == len(data.statements(SECOND, "validate"))
    _, values = data.items()
    q_signs = Questionnaire().signs(subject, AXIS)
    assert int((q_signs > 0).sum()) == sum(data.value_dims[v] == FIRST for v in values)
    assert int((q_signs < 0).sum()) == sum(data.value_dims[v] == SECOND for v in values)


def test_embedding_judge_by_hand():
    judge = EmbeddingJudge({"a": ["I love trying new food.", "Adventure calls me."],
                            "b": ["I keep to my routine.", "Rules keep us safe."]})
    texts = ["Let us go somewhere new!", "Follow the rules."]
    emb = judge.encoder.embed(texts, judge.MAX_TOKENS)
    centre = {k: judge.encoder.embed(v, judge.MAX_TOKENS).mean(0)
              for k, v in (("a", ["I love trying new food.", "Adventure calls me."]),
                           ("b", ["I keep to my routine.", "Rules keep us safe."]))}
    cos = torch.nn.functional.cosine_similarity
    expected = cos(emb, centre["a"][None], dim=-1) - cos(emb, centre["b"][None], dim=-1)
    torch.testing.assert_close(judge.margin(texts, "a", "b"), expected.double(), atol=1e-5,
                               rtol=0)
    assert float(judge.margin(texts, "a", "b")[0]) > float(judge.margin(texts, "a", "b")[1])


def test_effects_and_the_control_gate_on_synthetic_scores():
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert mean_effect(torch.tensor([2.0, 4.0, 1.0, 1.0]), signs) == pytest.approx(2.0)
    assert mean_effect(torch.tensor([2.0, 4.0]), torch.ones(2)) == pytest.approx(3.0)
    sure = bootstrap_effect(torch.full((30,), 0.5), torch.ones(30), boot=200)
    assert (sure.point, sure.low, sure.high) == pytest.approx((0.5, 0.5, 0.5))
    assert control_passes(sure) and not control_passes(sure.toward(-1))
    gen = torch.Generator().manual_seed(0)
    noise = bootstrap_effect(torch.randn(200, generator=gen), torch.ones(200), boot=500)
    assert noise.low < 0 < noise.high and not control_passes(noise)
    shifted = torch.randn(200, generator=gen) + 0.5  # a real effect of 0.5 sd
    assert control_passes(bootstrap_effect(shifted, torch.ones(200), boot=500))
    assert not control_passes(bootstrap_effect(-shifted, torch.ones(200), boot=500))
    assert Effect(0.2, 0.1, 0.3).toward(-1) == Effect(-0.2, -0.3, -0.1)
    with pytest.raises(ValueError, match="one score change per unit"):
        bootstrap_effect(torch.zeros(3), torch.ones(4))


def test_steer_settings_are_checked_once():
    model = tiny(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                 intermediate_size=64).model
    target = neurons_of(model, [(0, 1)])
    for gamma in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="steer.gamma must be a number >= 0"):
            SteerSettings(target, gamma)
    with pytest.raises(ValueError, match="steer.fraction must be in"):
        SteerSettings(target, 1.0, fraction=0.0)
    with pytest.raises(ValueError, match="steer.scale must be one of"):
        SteerSettings(target, 1.0, scale="huge")
    # the authors' push multiplies the activation probability, NPTI's the 95th percentile
    assert SteerSettings(target, 1.0).target.scale.tolist() == [pytest.approx(0.8)]
    assert SteerSettings(target, 1.0, scale="p95").target.scale.tolist() == [2.0]
    old = dataclasses.replace(target, prob=None)
    with pytest.raises(ValueError, match="no activation probabilities"):
        SteerSettings(old, 1.0)


@pytest.mark.parametrize("family, window", [("llama", None), ("mistral", 5)])
def test_continuation_scorer_against_plain_forwards_again_and_again(family, window):
    """Scored three times (the prefix KV is restored after each forward: cropped, or copied
    for sliding-window layers), each time equal to one plain forward per row; shared contexts
    and contexts of different lengths in one batch."""
    from tests.helpers import tiny_lm
    from values.likelihood import ContinuationScorer

    extra = {} if window is None else {"sliding_window": window}
    model = tiny_lm(family, seed=2, **extra)
    ctx_a, ctx_b = [5, 9, 11, 4, 7, 8, 30], [6, 12]
    rows = [(ctx_a, [3, 14]), (ctx_a, [22, 5, 9, 1]), (ctx_b, [17]), (ctx_b, [40, 2, 2])]
    scorer = ContinuationScorer(model, rows, pad_token_id=0, batch_size=4)
    expected = torch.tensor([answer_logprob(model, c, x) for c, x in rows], dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(scorer.mean_logprobs(model), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family, window", [("llama", None), ("mistral", 5)])
def test_continuation_scorer_shares_a_persona_prefix(family, window):
    """Contexts that all begin with the same tokens (a persona's system prompt): those are
    prefilled once for every row (`CommonPrefix`; not with sliding-window layers), and the
    scores still equal one plain forward per row, unsteered and under steering (which never
    reaches the shared tokens) against the stepwise reference; the shared length stops one
    token short of the shortest context's prefix."""
    from tests.helpers import tiny_lm
    from values.likelihood import ContinuationScorer, CommonPrefix, common_prefix_length

    extra = {} if window is None else {"sliding_window": window}
    model = tiny_lm(family, seed=4, **extra)
    persona = [21, 8, 33, 4, 19, 7, 40, 12, 3]  # longer than the sliding window
    contexts = [persona + [5, 9, 11], persona + [6], persona + [30, 2, 2, 17, 9]]
    rows = [(contexts[0], [3, 14]), (contexts[0], [22, 5]), (contexts[1], [17, 1, 8]),
            (contexts[2], [40]), (contexts[2], [2, 9, 9, 14])]
    # the second context's prefix is the persona itself: one token of it stays its own
    assert common_prefix_length([c[:-1] for c in contexts]) == len(persona) - 1
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # one token of its own
    assert common_prefix_length([[1, 2, 3], [1, 2, 9]], limit=1) == 1
    # sliding-window layers count cache slots: the padding after the shared tokens would
    # narrow a short row's window, so nothing is shared there
    shared = len(persona) - 1 if window is None else 0
    assert CommonPrefix(model, [c[:-1] for c in contexts]).length == shared
    assert CommonPrefix(model, [[1, 2, 3, 4, 5]]).length == 0  # one sequence: nothing shared
    for batch_size in (2, 5):
        scorer = ContinuationScorer(model, rows, pad_token_id=0, batch_size=batch_size)
        expected = torch.tensor([answer_logprob(model, c, x) for c, x in rows],
                                dtype=torch.float64)
        for _ in range(2):
            torch.testing.assert_close(scorer.mean_logprobs(model), expected, atol=1e-6, rtol=0)
    neurons = ValueNeurons(torch.tensor([0, 1]), torch.tensor([3, 5]), torch.ones(2),
                           torch.full((2,), 20.0), {"model": model_signature(model)})
    with steer(model, neurons, 4.0, fraction=1.0) as steering:
        got = scorer.mean_logprobs(model, steering)
        expected = torch.tensor([stepwise_logprob(model, c, x) for c, x in rows],
                                dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, scorer.mean_logprobs(model), atol=1e-4)


def test_verdicts_on_synthetic_rows():
    """The three-way reading by hand: shown (beyond random and the opposite pole's set),
    ruled out (the pole-specific interval below half the persona effect), inconclusive
    (neither, with the smallest detectable effect = 0.714 x the interval's width); location
    unreliable below the reliability threshold; never "refuted"."""
    from values.verdict import InstrumentRow, VerdictRule, read, verdict

    def row(control, contrast, specificity=(0.08, 0.02, 0.15), perplexity=1.2,
            persona=(0.1, 0.05, 0.15)):
        e = Effect(*contrast)
        return InstrumentRow("dilemmas", control, Effect(*persona), 2.0, e, e, e, e,
                             perplexity, Effect(*specificity))

    rule = VerdictRule(gamma=2.0, equivalence=0.5, max_perplexity=1.5, min_reliability=0.5)
    beyond = (0.1, 0.03, 0.2)
    assert verdict("conservation", [row(True, beyond)], rule, 0.9)[0] == "shown"
    # the opposite pole's set moves it about as much: not specific, and +0.1 is not excluded
    kind, text = verdict("conservation", [row(True, beyond, (0.03, -0.04, 0.1))], rule, 0.9)
    assert kind == "inconclusive"
    reading = read(row(True, beyond, (0.03, -0.04, 0.1)), rule, 1.5)
    assert reading.bound == pytest.approx(0.05)  # half the persona effect 0.1
    assert reading.detectable == pytest.approx(0.14 * 2.8 / 3.92)
    assert f"{reading.detectable:.3f}" in text
    # the pole-specific interval lies below half the persona effect: ruled out
    narrow = (0.0, -0.03, 0.04)
    assert verdict("conservation", [row(True, narrow, narrow)], rule, 0.9)[0] == "ruled out"
    # ... but not when one of two valid instruments is inconclusive
    rows = [row(True, narrow, narrow), row(True, narrow, (0.0, -0.1, 0.1))]
    assert verdict("conservation", rows, rule, 0.9)[0] == "inconclusive"
    # the opposite pole's arms were not measured: inconclusive, and said
    kind, text = verdict("conservation", [row(True, beyond, (NAN.point,) * 3)], rule, 0.9)
    assert kind == "inconclusive" and "pole-specificity) not measured" in text
    # the opposite pole was not run at all: located - random is read alone, and that is said
    kind, text = verdict("conservation", [row(True, beyond, (NAN.point,) * 3)], rule, 0.9,
                         specificity=False)
    assert kind == "shown" and "pole-specificity is not checked" in text
    # above the cost limit: inconclusive at x1.5, shown at x2, both said
    kind, text = verdict("conservation", [row(True, beyond, perplexity=1.74)],
                         VerdictRule(limits=(1.5, 2.0)), 0.9)
    assert kind == "inconclusive" and "x1.74 is above the limit x1.5" in text
    assert "x2 shown" in text
    # an unreliable location: no verdict about value neurons, whatever steering did
    kind, text = verdict("conservation", [row(True, beyond)], rule, 0.17)
    assert kind == "location unreliable" and "Spearman-Brown 0.17" in text and "(shown)" in text
    kind, text = verdict("conservation", [row(True, beyond)], rule, None)
    assert kind == "shown" and "reliability was not measured" in text
    assert verdict("conservation", [row(False, beyond)], rule, 0.9)[0] == \
        "not testable on this model"
    with pytest.raises(ValueError, match="validate.equivalence"):
        VerdictRule(equivalence=0.0)
    with pytest.raises(ValueError, match="validate.verdict_limits"):
        VerdictRule(limits=(0.5,))
