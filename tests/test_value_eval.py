"""Value data and the questionnaire: the shipped data's coverage and splits, questionnaire
scoring by hand, left-padding against unpadded forwards, pyvalues scoring, perplexity by hand.
(The other instruments: tests/test_value_instruments.py.)"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch

from tests.helpers import past, tiny_lm
from values.data import AXIS_OF, load_value_data
from values.judges import TextValueScorer
from values.likelihood import perplexity
from values.neurons import DIMENSIONS, OPPOSITE, ValueNeurons, model_signature, steer
from values.prompts import ValuePrompts
from values.questionnaire import BASIC_VALUES, AnswerCache, answer_probabilities, \
    expected_scores, option_token_ids


@pytest.fixture(scope="module")
def data():
    return load_value_data()


def test_shipped_data_covers_every_pole_dimension_and_value(data):
    for pole in DIMENSIONS:
        for split in ("locate", "validate"):
            statements = data.statements(pole, split)
            assert len(statements) >= 30 and len(set(statements)) == len(statements)
            assert len(data.statements(pole, split, reversed_=True)) == len(statements)
            assert len(data.questions(pole, split)) >= 20
        assert len(data.personas(pole)) >= 4
        assert len(data.questions(pole, "locate")) + len(data.questions(pole, "validate")) >= 60
    # the two poles of an axis are contrasted on the same questions
    for pole in DIMENSIONS:
        assert AXIS_OF[pole] == AXIS_OF[OPPOSITE[pole]]
    domains = {r["domain"] for r in data.question_rows}
    assert domains == {"work", "family", "money", "community", "travel", "rules"}
    # every held-out dilemma has one answer per pole of its axis, none used for location
    validate = {r["id"] for r in data.question_rows if r["split"] == "validate"}
    assert {r["question"] for r in data.answer_rows} == validate
    for axis in ("openness_vs_conservation", "enhancement_vs_transcendence"):
        assert len(data.dilemmas(axis)) == 40


def test_no_statement_is_both_a_location_and_a_validation_statement(tmp_path):
    """Read the file directly (not through the loader), then make the loader refuse a copy
    whose validation split repeats a location statement."""
    from values.data import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / "descriptions.jsonl").open()]
    texts = {s: {" ".join(t.lower().split()) for r in rows if r["split"] == s
                 for t in (r["text"], r["reversed"])} for s in ("locate", "validate")}
    assert texts["locate"] and texts["validate"] and not texts["locate"] & texts["validate"]
    assert {r["split"] for r in rows} == {"locate", "validate"}
    shutil.copytree(DATA_DIR, tmp_path / "d")
    leak = next(r for r in rows if r["split"] == "locate")
    with open(tmp_path / "d" / "descriptions.jsonl", "a") as handle:
        handle.write(json.dumps({**leak, "id": "leak", "split": "validate"}) + "\n")
    with pytest.raises(ValueError, match="in both the locate and the validate split"):
        load_value_data(str(tmp_path / "d"))


def test_scoring_key_covers_every_item(data):
    ids = [r["id"] for r in data.questionnaire]
    assert sorted(ids) == sorted(data.item_values)  # every item keyed, no stray key
    _, values = data.items()
    for value in BASIC_VALUES:
        assert values.count(value) >= 4
    assert set(data.value_dims) == set(BASIC_VALUES)
    assert set(data.value_dims.values()) == set(DIMENSIONS)
    assert len(data.scale) == 6


def test_bad_value_data_is_named(tmp_path, data):
    from values.data import DATA_DIR

    shutil.copytree(DATA_DIR, tmp_path / "d")
    (tmp_path / "d" / "questions.jsonl").write_text("")
    with pytest.raises(ValueError, match="questions.jsonl is empty"):
        load_value_data(str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_value_data(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a value dimension"):
        data.statements("hedonism_plus", "locate")
    # an instrument whose data lacks a pole is named
    for name, pole, message in (("dilemma_answers", "conservation", "answered for both poles"),
                                ("personas", "self_enhancement",
                                 "no persona for pole 'self_enhancement'")):
        folder = tmp_path / name
        shutil.copytree(DATA_DIR, folder)
        lines = (folder / f"{name}.jsonl").read_text().splitlines()
        (folder / f"{name}.jsonl").write_text(
            "\n".join(line for line in lines if f'"{pole}"' not in line) + "\n")
        with pytest.raises(ValueError, match=message):
            load_value_data(str(folder))


def test_expected_scores_by_hand():
    probs = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.5, 0.5], [0.25, 0, 0, 0, 0, 0.75],
                          [0, 0, 1, 0, 0, 0]], dtype=torch.float64)
    assert expected_scores(probs).tolist() == [1.0, 5.5, 4.75, 3.0]


@pytest.mark.parametrize("persona", ["", "You value tradition above all. "])
def test_answer_probabilities_equal_unpadded_forwards(char_tokenizer, persona):
    """Left padding and the cached prefixes give what one plain forward per prompt gives,
    unsteered and steered (the steered forward steers its last position); with a persona
    every prompt begins with, its tokens are prefilled once (CommonPrefix) for all."""
    from values.likelihood import CommonPrefix

    model = tiny_lm(vocab_size=len(char_tokenizer), seed=5)
    options = option_token_ids(char_tokenizer)
    prompts = [char_tokenizer.encode(persona + t, add_special_tokens=False)
               for t in ("How like you? ", "A much longer question here? ", "x:")]
    assert CommonPrefix(model, prompts).length == len(persona)
    cache = AnswerCache(model, prompts, char_tokenizer.pad_token_id, batch_size=2)
    neurons = ValueNeurons(torch.tensor([0, 0, 1]), torch.tensor([3, 8, 4]), torch.ones(3),
                           torch.full((3,), 30.0), {"model": model_signature(model)})
    plain = None
    for gamma in (None, 3.0):
        context = steer(model, neurons, gamma, fraction=1.0) if gamma else nullcontext()
        with context:
            got = answer_probabilities(model, prompts, options, char_tokenizer.pad_token_id, 2)
            reused = answer_probabilities(model, cache, options)
            expected = []
            for prompt in prompts:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
                expected.append(torch.softmax(logits[options].float(), -1))
        torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(reused, torch.stack(expected), atol=1e-6, rtol=1e-5)
        if plain is not None:  # steering the answer position moves the answer
            assert not torch.allclose(got, plain, atol=1e-4)
        plain = got


def test_questionnaire_prompt_ends_at_the_answer(char_tokenizer, data):
    ids = ValuePrompts(char_tokenizer).questionnaire_item("This person likes tea.", data.scale)
    text = char_tokenizer.decode(ids)
    assert text.endswith("Answer: ") and "6 = very much like me" in text


def test_text_scores_with_the_pyvalues_dictionary():
    scorer = TextValueScorer()
    scores = scorer.score(["I want power and wealth. The sky is blue.", ""])
    # independently: the classifier's own labels for each sentence
    first = scorer.labels("I want power and wealth.")
    assert "power" in first
    expected = torch.zeros(len(BASIC_VALUES), dtype=torch.float64)
    for sentence in ("I want power and wealth.", "The sky is blue."):
        for value in scorer.labels(sentence):
            expected[BASIC_VALUES.index(value)] += 0.5
    assert torch.equal(scores[0], expected) and scores[1].abs().sum() == 0


def test_perplexity_by_hand_and_steered_everywhere():
    model = tiny_lm(seed=6)
    texts = [[3, 7, 9, 11], [5, 6]]
    with torch.no_grad():
        nll = []
        for t in texts:
            logp = torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0, :-1], -1)
            nll += [-float(logp[k, t[k + 1]]) for k in range(len(t) - 1)]
    assert perplexity(model, texts) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    neurons = ValueNeurons(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.ones(2),
                           torch.full((2,), 5.0), {"model": model_signature(model)})
    with steer(model, neurons, 2.0, fraction=1.0) as steering:
        steered = perplexity(model, texts, steering)
        assert steering.positions is None  # reset after use
        # every position steered: equal to one-token-at-a-time decoding under steering
        with torch.no_grad():
            t = texts[0]
            out = model(input_ids=torch.tensor([t[:1]]), use_cache=True)
            nll = [-float(torch.log_softmax(out.logits[0, -1], -1)[t[1]])]
            for k in range(1, len(t) - 1):
                out = model(input_ids=torch.tensor([[t[k]]]), **past(model, out),
                            position_ids=torch.tensor([[k]]), use_cache=True)
                nll.append(-float(torch.log_softmax(out.logits[0, -1], -1)[t[k + 1]]))
    assert perplexity(model, texts) != pytest.approx(steered)
    assert perplexity(model, texts[:1], None) != pytest.approx(math.exp(sum(nll) / len(nll)))
    with steer(model, neurons, 2.0, fraction=1.0) as steering:
        assert perplexity(model, texts[:1], steering) == pytest.approx(
            math.exp(sum(nll) / len(nll)), rel=1e-6)
