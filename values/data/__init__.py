"""Value data for locating and validating value neurons (docs/ARCHITECTURE.md section 9), with its
loader.

Written for this project and shipped beside this file (no questionnaire or data-set text is
copied from elsewhere), read as plain JSON lines:

- `descriptions.jsonl`: first-person statements per pole (`pole`, `value`, `split`, `text`,
  `reversed`: the same statement negated). `split: locate` statements make location prompts;
  `split: validate` ones are held out for the statement instrument and the embedding judge's
  centroids. No text is in both splits.
- `questions.jsonl`: everyday dilemmas per axis (`axis`, `domain`, `split` locate|validate).
- `dilemma_answers.jsonl`: for every validate dilemma, one matched first-person answer per pole.
- `personas.jsonl`: instructions to be a person of one pole (the instruments' positive control),
  6 wordings per pole, and 6 of a neutral person (`pole: neutral`), the control's baseline.
- `questionnaire.jsonl` + `scoring_key.json`: portrait items (`id`, `text`), the 6-point
  scale, item -> basic value and basic value -> dimension;
- `neutral_prompts.jsonl`, `neutral_passages.jsonl`: value-neutral requests and passages.

    data = load_value_data()                  # or load_value_data("my/folder")
    data.statements("conservation", "validate")
    data.dilemmas("openness_vs_conservation")  # [(question, {pole: answer})]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from values.neurons import DIMENSIONS, OPPOSITE, check_dimension

DATA_DIR = Path(__file__).resolve().parent
AXES = {"openness_vs_conservation": ("openness_to_change", "conservation"),
        "enhancement_vs_transcendence": ("self_enhancement", "self_transcendence")}
AXIS_OF = {pole: axis for axis, poles in AXES.items() for pole in poles}
SPLITS = ("locate", "validate")
NEUTRAL = "neutral"  # the pole of the neutral personas: the persona control's baseline
FILES = ("descriptions", "questions", "dilemma_answers", "personas", "questionnaire",
         "neutral_prompts", "neutral_passages")


def toward(dimension: str) -> int:
    """+1 when `dimension` is its axis's first pole, -1 when it is the second: instrument
    scores are oriented toward the first pole."""
    return 1 if AXES[AXIS_OF[dimension]][0] == dimension else -1


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, every row with every key seen in the file (None where absent)."""
    if not path.exists():
        raise FileNotFoundError(f"value data file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"value data file {path} is empty")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError("a line is not a JSON object")
    except (OSError, ValueError) as err:  # any unreadable file (a directory too) is the same error
        raise ValueError(f"value data file {path} is not JSON lines: {err}") from err
    keys = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{key: row.get(key) for key in keys} for row in rows]
    if not rows:
        raise ValueError(f"value data file {path} has no rows")
    return rows


def _fields(rows: list[dict[str, Any]], name: str, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise ValueError(f"value data file {name}.jsonl lacks the field(s) {missing}")


@dataclass
class ValueData:
    descriptions: list[dict[str, Any]]
    question_rows: list[dict[str, Any]]
    answer_rows: list[dict[str, Any]]
    persona_rows: list[dict[str, Any]]
    questionnaire: list[dict[str, Any]]
    scale: list[str]
    item_values: dict[str, str]  # item id -> basic value
    value_dims: dict[str, str]  # basic value -> dimension
    neutral_prompts: list[str]
    neutral_passages: list[str]

    def statements(self, pole: str, split: str, reversed_: bool = False) -> list[str]:
        """The `split` statements of `pole` (or their negations, `reversed_`)."""
        check_dimension(pole, "pole")
        texts = [r["reversed" if reversed_ else "text"] for r in self.descriptions
                 if r["pole"] == pole and r["split"] == split]
        if not texts:
            raise ValueError(f"the value data has no {split!r} statement for pole {pole!r}")
        return texts

    def questions(self, dimension: str, split: str) -> list[str]:
        axis = AXIS_OF[check_dimension(dimension)]
        texts = [r["text"] for r in self.question_rows
                 if r["axis"] == axis and r["split"] == split]
        if not texts:
            raise ValueError(f"the value data has no {split!r} question for {dimension!r}")
        return texts

    def dilemmas(self, axis: str) -> list[tuple[str, dict[str, str]]]:
        """(question, {pole: answer}) for every validate dilemma of `axis` with an answer
        for both poles."""
        answers: dict[str, dict[str, str]] = {}
        for r in self.answer_rows:
            answers.setdefault(r["question"], {})[r["pole"]] = r["text"]
        out = [(q["text"], answers[q["id"]]) for q in self.question_rows
               if q["axis"] == axis and q["split"] == "validate"
               and set(answers.get(q["id"], {})) >= set(AXES[axis])]
        if not out:
            raise ValueError(f"dilemma_answers.jsonl has no dilemma of {axis!r} answered for "
                             f"both poles {AXES[axis]}")
        return out

    def personas(self, pole: str) -> list[str]:
        """Every wording of `pole`'s persona, or (pole "neutral") of the neutral persona that
        is the persona control's baseline."""
        if pole != NEUTRAL:
            check_dimension(pole)
        texts = [r["text"] for r in self.persona_rows if r["pole"] == pole]
        if not texts:
            raise ValueError(f"personas.jsonl has no persona for pole {pole!r}")
        return texts

    def items(self) -> tuple[list[str], list[str]]:
        """(item texts, their basic values) in questionnaire order."""
        return ([r["text"] for r in self.questionnaire],
                [self.item_values[r["id"]] for r in self.questionnaire])


def load_value_data(path: str | None = None) -> ValueData:
    """The shipped value data, or the same files from another folder (`data.path`)."""
    folder = Path(path) if path else DATA_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path={str(folder)!r} is not a folder")
    rows = {name: _read_jsonl(folder / f"{name}.jsonl") for name in FILES}
    key_path = folder / "scoring_key.json"
    if not key_path.exists():
        raise FileNotFoundError(f"value data file {key_path} does not exist")
    try:
        key = json.loads(key_path.read_text())
        scale, items, values = list(key["scale"]), dict(key["items"]), dict(key["values"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"value data file {key_path} is not a scoring key: {err}") from err
    data = ValueData(rows["descriptions"], rows["questions"], rows["dilemma_answers"],
                     rows["personas"], rows["questionnaire"], scale, items, values,
                     [r["text"] for r in rows["neutral_prompts"]],
                     [r["text"] for r in rows["neutral_passages"]])
    check_data(data)
    return data


def check_data(data: ValueData) -> None:
    """Every file has its fields; every pole has statements in both splits, personas and
    answered dilemmas; no statement is in both splits; the scoring key covers every item."""
    _fields(data.descriptions, "descriptions", ("pole", "value", "split", "text", "reversed"))
    _fields(data.question_rows, "questions", ("id", "axis", "split", "text"))
    _fields(data.answer_rows, "dilemma_answers", ("question", "pole", "text"))
    _fields(data.persona_rows, "personas", ("pole", "text"))
    for pole in DIMENSIONS:
        for split in SPLITS:
            data.statements(pole, split)
        data.personas(pole)
    data.personas(NEUTRAL)
    unknown = {r["pole"] for r in data.persona_rows} - {*DIMENSIONS, NEUTRAL}
    if unknown:
        raise ValueError(f"personas.jsonl has personas of unknown pole(s) {sorted(unknown)}: "
                         f"a pole is one of {', '.join(DIMENSIONS)} or {NEUTRAL!r}")
    for axis in AXES:
        data.dilemmas(axis)
    splits: dict[str, set[str]] = {}
    for r in data.descriptions:
        for text in (r["text"], r["reversed"]):
            splits.setdefault(" ".join(text.lower().split()), set()).add(r["split"])
    both = sorted(t for t, s in splits.items() if len(s) > 1)
    if both:
        raise ValueError(f"descriptions.jsonl has {len(both)} statement(s) in both the locate "
                         f"and the validate split, e.g. {both[0]!r}: a validation statement "
                         "must not be a location statement")
    ids = [r["id"] for r in data.questionnaire]
    missing = [i for i in ids if i not in data.item_values]
    if missing:
        raise ValueError(f"scoring_key.json does not key questionnaire items {missing}")
    for value in set(data.item_values.values()):
        if data.value_dims.get(value) not in DIMENSIONS:
            raise ValueError(f"scoring_key.json maps value {value!r} to no known dimension")
    if len(data.scale) < 2:
        raise ValueError("scoring_key.json needs a scale of at least two options")


__all__ = ["AXES", "AXIS_OF", "DATA_DIR", "OPPOSITE", "ValueData", "load_value_data", "toward"]
