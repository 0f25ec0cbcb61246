"""Token ids of every prompt of a value-neuron experiment, through the tokenizer's chat
template. Each kind takes an optional `persona` (a system prompt telling the model to be a
person of one pole): the positive control of every instrument.

    prompts = ValuePrompts(tokenizer)
    ids = prompts.contrast(statement, question)                 # a location prompt
    context = prompts.dilemma(question, persona=None)           # + an answer, teacher-forced
"""
from __future__ import annotations

from typing import Any


class ValuePrompts:
    def __init__(self, tokenizer: Any, answer_sentences: int = 3) -> None:
        self.tokenizer = tokenizer
        self.answer_sentences = answer_sentences

    def _encode(self, user: str, system: str | None = None, prefix: str = "") -> list[int]:
        messages = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return self.tokenizer(text + prefix, add_special_tokens=False)["input_ids"]

    def contrast(self, description: str, question: str) -> list[int]:
        """A statement (of a pole, or its negation) as the persona, then a location question."""
        system = (f"You are the person who says: \"{description}\" Answer as this person "
                  f"would, in {self.answer_sentences} sentences or fewer.")
        return self._encode(question, system)

    def open_question(self, question: str, persona: str | None = None) -> list[int]:
        return self._encode(f"{question} Answer in {self.answer_sentences} sentences or fewer.",
                            persona)

    def dilemma(self, question: str, persona: str | None = None) -> list[int]:
        """The context whose continuation is one first-person answer (teacher-forced)."""
        return self._encode(f"{question} Answer in one sentence.", persona)

    def lettered(self, question: str, first: str, second: str,
                 persona: str | None = None) -> list[int]:
        """The dilemma with two lettered answers; the continuation is the letter."""
        user = (f"{question}\n\nA) {first}\nB) {second}\n\nWhich answer is closer to what you "
                "would do? Reply with the letter only.")
        return self._encode(user, persona)

    def self_description(self, persona: str | None = None) -> list[int]:
        """The context whose continuation is one first-person value statement."""
        return self._encode("Tell me one thing about yourself: what you do or want in everyday "
                            "life, in one sentence.", persona)

    def questionnaire_item(self, item: str, scale: list[str],
                           persona: str | None = None) -> list[int]:
        """The portrait, the scale, and the assistant turn opened up to the answer digit."""
        options = "\n".join(f"{k} = {label}" for k, label in enumerate(scale, 1))
        user = (f"Here is a short description of a person:\n\n\"{item}\"\n\nHow much is this "
                f"person like you? Reply with one number:\n{options}")
        return self._encode(user, persona, prefix="Answer: ")

    def continuation(self, text: str) -> list[int]:
        """An answer's own tokens, as the model would write them after the context."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
