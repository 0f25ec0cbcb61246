"""Value data for locating and validating value neurons (DESIGN.md section 9).

Written for this project and shipped in `datamodules/value_data/` (no questionnaire or data
set text is copied from elsewhere), loaded offline with `datasets`:

- `descriptions.jsonl`: first-person descriptions per pole (`pole`, `value`, `text`);
- `questions.jsonl`: everyday dilemmas per axis (`axis`, `domain`, `split` locate|validate);
- `questionnaire.jsonl` + `scoring_key.json`: portrait items (`id`, `text`), the 6-point
  scale, item -> basic value and basic value -> dimension;
- `neutral_prompts.jsonl`, `neutral_passages.jsonl`: value-neutral requests and passages.

    data = load_value_data()                  # or load_value_data("my/folder")
    prompts = ValuePrompts(tokenizer)
    ids = prompts.contrast(data.descriptions_of("conservation")[0], data.questions(...)[0])
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.value_neurons import DIMENSIONS, check_dimension

DATA_DIR = Path(__file__).resolve().parent / "value_data"
AXIS_OF = {"openness_to_change": "openness_vs_conservation",
           "conservation": "openness_vs_conservation",
           "self_enhancement": "enhancement_vs_transcendence",
           "self_transcendence": "enhancement_vs_transcendence"}
FILES = ("descriptions", "questions", "questionnaire", "neutral_prompts", "neutral_passages")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file through `datasets` (offline; the Arrow cache stays in memory)."""
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"value data file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"value data file {path} is empty")
    datasets.disable_progress_bars()
    rows = datasets.Dataset.from_json(str(path), keep_in_memory=True).to_list()
    if not rows:
        raise ValueError(f"value data file {path} has no rows")
    return rows


@dataclass
class ValueData:
    descriptions: list[dict[str, Any]]
    question_rows: list[dict[str, Any]]
    questionnaire: list[dict[str, Any]]
    scale: list[str]
    item_values: dict[str, str]  # item id -> basic value
    value_dims: dict[str, str]  # basic value -> dimension
    neutral_prompts: list[str]
    neutral_passages: list[str]

    def descriptions_of(self, pole: str) -> list[str]:
        check_dimension(pole, "pole")
        texts = [r["text"] for r in self.descriptions if r["pole"] == pole]
        if not texts:
            raise ValueError(f"the value data has no description for pole {pole!r}")
        return texts

    def questions(self, dimension: str, split: str) -> list[str]:
        axis = AXIS_OF[check_dimension(dimension)]
        texts = [r["text"] for r in self.question_rows
                 if r["axis"] == axis and r["split"] == split]
        if not texts:
            raise ValueError(f"the value data has no {split!r} question for {dimension!r}")
        return texts

    def items(self) -> tuple[list[str], list[str]]:
        """(item texts, their basic values) in questionnaire order."""
        return ([r["text"] for r in self.questionnaire],
                [self.item_values[r["id"]] for r in self.questionnaire])


def load_value_data(path: str | None = None) -> ValueData:
    """The shipped value data, or the same files from another folder."""
    folder = Path(path) if path else DATA_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path={str(folder)!r} is not a folder")
    rows = {name: _read_jsonl(folder / f"{name}.jsonl") for name in FILES}
    key_path = folder / "scoring_key.json"
    if not key_path.exists():
        raise FileNotFoundError(f"value data file {key_path} does not exist")
    key = json.loads(key_path.read_text())
    data = ValueData(rows["descriptions"], rows["questions"], rows["questionnaire"],
                     list(key["scale"]), dict(key["items"]), dict(key["values"]),
                     [r["text"] for r in rows["neutral_prompts"]],
                     [r["text"] for r in rows["neutral_passages"]])
    check_key(data)
    return data


def check_key(data: ValueData) -> None:
    """Every item is keyed to a value, every value to a known dimension, every pole present."""
    ids = [r["id"] for r in data.questionnaire]
    missing = [i for i in ids if i not in data.item_values]
    if missing:
        raise ValueError(f"scoring_key.json does not key questionnaire items {missing}")
    for value in set(data.item_values.values()):
        if data.value_dims.get(value) not in DIMENSIONS:
            raise ValueError(f"scoring_key.json maps value {value!r} to no known dimension")
    if len(data.scale) < 2:
        raise ValueError("scoring_key.json needs a scale of at least two options")


class ValuePrompts:
    """Token ids of the three kinds of prompt, through the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, answer_sentences: int = 3) -> None:
        self.tokenizer = tokenizer
        self.answer_sentences = answer_sentences

    def _encode(self, messages: list[dict[str, str]], prefix: str = "") -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return self.tokenizer(text + prefix, add_special_tokens=False)["input_ids"]

    def contrast(self, description: str, question: str) -> list[int]:
        """A description of one pole as the persona, then a situational question."""
        system = (f"You are the person who says: \"{description}\" Answer as this person "
                  f"would, in {self.answer_sentences} sentences or fewer.")
        return self._encode([{"role": "system", "content": system},
                             {"role": "user", "content": question}])

    def open_question(self, question: str) -> list[int]:
        return self._encode([{"role": "user", "content": f"{question} Answer in "
                              f"{self.answer_sentences} sentences or fewer."}])

    def questionnaire_item(self, item: str, scale: list[str],
                           persona: str | None = None) -> list[int]:
        """The portrait, the scale, and the assistant turn opened up to the answer digit;
        with `persona`, answered as the person who says it (the instrument's control)."""
        options = "\n".join(f"{k} = {label}" for k, label in enumerate(scale, 1))
        user = (f"Here is a short description of a person:\n\n\"{item}\"\n\nHow much is this "
                f"person like you? Reply with one number:\n{options}")
        system = [] if persona is None else [
            {"role": "system", "content": f"You are the person who says: \"{persona}\""}]
        return self._encode([*system, {"role": "user", "content": user}], prefix="Answer: ")

    def plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
