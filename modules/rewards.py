"""Reward functions: pure `(completions: list[str], **batch) -> list[float]`.

`batch` holds the datamodule's per-prompt fields expanded to one entry per completion (so
`answer[i]` is the gold answer for `completions[i]`). Every function ignores the keys it does not
need, so any set of rewards can be combined over the same batch with `combine_rewards`:

    total, parts = combine_rewards(
        {"correct": (gsm8k_reward, 1.0), "format": (format_reward, 0.1)},
        completions, {"answer": answers},
    )
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float]]

# An integer or decimal, with optional sign, `$` and thousands separators: "-5", "$1,234.50".
_NUMBER = r"[-+]?\$?\s?[-+]?\d(?:[\d,]*\d)?(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASH_ANSWER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
# The completion ends with "#### <number>", tolerating trailing spaces, "." "!" and markdown "*".
_FINAL_LINE_RE = re.compile(r"####[ \t]*" + _NUMBER + r"[ \t.!*]*\s*\Z")


class RewardError(ValueError):
    """A reward function raised or returned something unusable; the message names the function."""


def normalize_number(text: str) -> str:
    """Canonical string form of a number: "-5" -> "-5", "1,234" -> "1234", "$12.00" -> "12".

    Strips whitespace, `$`, `,`, a leading `+`, a trailing `.` and trailing zeros of a decimal
    part. Text that is not a number comes back stripped but otherwise unchanged.
    """
    s = re.sub(r"[\s,$]", "", str(text)).rstrip(".")
    s = s.removeprefix("+")
    if "." in s and re.fullmatch(r"-?\d*\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, else the last number anywhere; normalised. None if none."""
    hashed = _HASH_ANSWER_RE.findall(text)
    if hashed:
        return normalize_number(hashed[-1])
    numbers_found = _NUMBER_RE.findall(text)
    if numbers_found:
        return normalize_number(numbers_found[-1])
    return None


def gsm8k_reward(completions: list[str], answer: Sequence[str | None], **batch: Any) -> list[float]:
    """1.0 where the completion's extracted answer equals the normalised gold answer, else 0.0."""
    if len(answer) != len(completions):
        raise ValueError(
            f"answer has {len(answer)} entries but there are {len(completions)} completions"
        )
    rewards = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            rewards.append(0.0)
            continue
        predicted = extract_answer(completion)
        rewards.append(float(predicted is not None and predicted == normalize_number(gold)))
    return rewards


def format_reward(completions: list[str], **batch: Any) -> list[float]:
    """1.0 where the completion ends with a `#### <number>` answer line, else 0.0."""
    return [float(_FINAL_LINE_RE.search(c) is not None) for c in completions]


def _check_batch(completions: list[str], batch: dict[str, Sequence[Any]]) -> None:
    for key, values in batch.items():
        if len(values) != len(completions):
            raise ValueError(
                f"batch[{key!r}] has {len(values)} entries but there are {len(completions)} "
                "completions; expand the batch to one entry per completion first"
            )


def _call_reward(name: str, fn: RewardFn, completions: list[str], batch: dict) -> torch.Tensor:
    """Run one reward function and validate its output. Returns float32 [N]."""
    try:
        values = fn(completions, **batch)
    except Exception as err:
        raise RewardError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
    if hasattr(values, "tolist"):  # torch / numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a list")
    if len(values) != len(completions):
        raise RewardError(
            f"reward function {name!r} returned {len(values)} values "
            f"for {len(completions)} completions"
        )
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {name!r} returned a non-number at index {i}: {v!r}"
            )
        if not math.isfinite(v):
            raise RewardError(f"reward function {name!r} returned {v} at index {i}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)  # [N]


def combine_rewards(
    reward_fns: dict[str, tuple[RewardFn, float]],
    completions: list[str],
    batch: dict[str, Sequence[Any]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of reward functions.

    Args:
        reward_fns: name -> (fn, weight); each fn is called as `fn(completions, **batch)`.
        completions: N decoded completions.
        batch: per-completion fields, every value of length N.

    Returns:
        total: float32 [N], sum of weight * raw values.
        parts: name -> float32 [N], the raw (unweighted) values of each function.

    Raises:
        RewardError: naming the function, if it raises or returns the wrong number of values,
            non-numbers, NaN or inf.
        ValueError: for an empty `reward_fns`, a non-finite weight or a mis-sized `batch` field.
    """
    if not reward_fns:
        raise ValueError("reward_fns is empty: give at least one name -> (fn, weight)")
    _check_batch(completions, batch)
    total = torch.zeros(len(completions), dtype=torch.float32)  # [N]
    parts: dict[str, torch.Tensor] = {}
    for name, (fn, weight) in reward_fns.items():
        if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"reward_fns[{name!r}] weight must be a finite number, got {weight!r}")
        parts[name] = _call_reward(name, fn, completions, batch)  # [N]
        total += float(weight) * parts[name]
    return total, parts
