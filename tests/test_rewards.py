"""Hand-written cases for the reward functions. Run: pytest -q tests/test_rewards.py"""

from __future__ import annotations

import math

import pytest
import torch

from modules.rewards import (
    RewardError,
    combine_rewards,
    extract_answer,
    format_reward,
    gsm8k_reward,
    normalize_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-5", "-5"),
        ("1,234", "1234"),
        ("$12.00", "12"),
        ("12.0", "12"),
        ("12.", "12"),
        (" 7 ", "7"),
        ("+3", "3"),
        ("$1,234.50", "1234.5"),
        ("-0", "0"),
        ("abc", "abc"),
    ],
)
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 3 + 4 = 7.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### $12.00", "12"),
        ("#### -5", "-5"),
        ("#### 3\nwait, no.\n#### 8", "8"),  # the last #### wins
        ("#### 7\nand then 9 more", "7"),  # a #### answer beats later numbers
        ("She has 3 apples and buys 4, so 7 apples.", "7"),  # fallback: last number
        ("The total is $2,500.00.", "2500"),
        ("no digits here", None),
        ("#### nothing", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_gsm8k_reward_matches_normalised_answers() -> None:
    completions = [
        "... #### 1,234",  # commas
        "... #### $12.00",  # dollar and .00
        "... #### 5.0",  # .0
        "so the answer is 42",  # fallback to the last number
        "I don't know",  # no number
        "#### 41",  # wrong
        "#### 3",  # gold is None
    ]
    answers = ["1234", "12", "5", "42", "42", "42", None]
    assert gsm8k_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_gsm8k_reward_normalises_gold_and_ignores_other_keys() -> None:
    rewards = gsm8k_reward(["#### 1234"], answer=["1,234"], question=["q"], index=[0])
    assert rewards == [1.0]


def test_gsm8k_reward_rejects_mis_sized_answer() -> None:
    with pytest.raises(ValueError, match="answer"):
        gsm8k_reward(["#### 1", "#### 2"], answer=["1"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Work.\n#### 42", 1.0),
        ("Work.\n#### 42.  \n\n", 1.0),  # trailing punctuation and whitespace
        ("Work.\n####42", 1.0),
        ("Work.\n**#### -3**", 1.0),  # markdown bold
        ("Work.\n#### 1,234", 1.0),
        ("#### 42\nthen more text", 0.0),  # not the final line
        ("The answer is 42", 0.0),
        ("#### forty-two", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward([completion], answer=["42"]) == [expected]


def test_combine_rewards_weights_and_parts() -> None:
    completions = ["#### 4", "it is 4", "#### 5"]
    batch = {"answer": ["4", "4", "4"], "index": [0, 0, 0]}
    total, parts = combine_rewards(
        {"correct": (gsm8k_reward, 1.0), "format": (format_reward, 0.5)}, completions, batch
    )
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert torch.equal(parts["correct"], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(parts["format"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(total, torch.tensor([1.5, 1.0, 0.5]))


def test_combine_rewards_accepts_tensor_and_bool_values() -> None:
    total, _ = combine_rewards(
        {
            "t": (lambda c, **b: torch.tensor([1.0, 2.0]), 2.0),
            "b": (lambda c, **b: [True, False], 1.0),
        },
        ["a", "b"],
        {},
    )
    assert torch.allclose(total, torch.tensor([3.0, 4.0]))


def _raises(completions: list[str], **batch: object) -> list[float]:
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_raises, "'broken' raised KeyError"),
        (lambda c, **b: [1.0], "'broken' returned 1 values for 2 completions"),
        (lambda c, **b: [1.0, "x"], "'broken' returned a non-number at index 1"),
        (lambda c, **b: [1.0, None], "'broken' returned a non-number"),
        (lambda c, **b: [math.nan, 1.0], "'broken' returned nan at index 0"),
        (lambda c, **b: [1.0, math.inf], "'broken' returned inf at index 1"),
        (lambda c, **b: 1.0, "'broken' returned float, not a list"),
        (lambda c, **b: "10", "'broken' returned str, not a list"),
    ],
)
def test_combine_rewards_errors_name_the_function(fn, match: str) -> None:
    fns = {"ok": (format_reward, 1.0), "broken": (fn, 1.0)}
    with pytest.raises(RewardError, match=match) as info:
        combine_rewards(fns, ["#### 1", "#### 2"], {"answer": ["1", "2"]})
    assert isinstance(info.value, ValueError)
    if fn is _raises:
        assert isinstance(info.value.__cause__, KeyError)  # the original error is chained


def test_combine_rewards_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reward_fns is empty"):
        combine_rewards({}, ["a"], {})
    with pytest.raises(ValueError, match=r"batch\['answer'\] has 1 entries"):
        combine_rewards({"f": (format_reward, 1.0)}, ["a", "b"], {"answer": ["1"]})
    with pytest.raises(ValueError, match=r"reward_fns\['f'\] weight"):
        combine_rewards({"f": (format_reward, math.nan)}, ["a"], {})
