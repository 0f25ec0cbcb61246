"""The instruments that measure a model's value orientation on one axis (docs/ARCHITECTURE.md
section 9). Each gives one score per unit (a dilemma, a statement, an item, a generated answer),
oriented toward the axis's first pole, and a sign per unit (+1: a unit of the first pole, -1: of the
second); an effect is the mean change over +1 units minus that over -1 units (values/effects.py).
Hydra picks them from configs/instruments/.

- `dilemmas`: log p(first pole's answer) - log p(second's) per held-out dilemma, per token,
  teacher-forced and steered at every answer-predicting position.
- `lettered`: the same dilemma with both answers lettered A/B, in both orders;
  log p(first pole's letter) - log p(the other letter), averaged over the two orders.
- `statements`: per-token log-likelihood of each held-out statement of either pole.
- `questionnaire`: expected answer (1..6) of the portrait items keyed to the axis's values.
- `embedding`, `pyvalues`: judges of open-ended answers to the held-out dilemmas, generated
  (greedy) under the condition.

Every instrument takes a `persona` (a system prompt of one pole: the positive control) and a
`SteerSettings` (None = unsteered).

    subject = Subject(policy, sampler, data)
    dilemmas = DilemmaMargin()
    dilemmas.score(subject, "openness_vs_conservation", persona=None, settings=settings)  # [n]
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any, Protocol, runtime_checkable

import torch

from samplers.base import GenerationSpec, Sampler
from values.data import AXES, ValueData
from values.judges import EmbeddingJudge, TextValueScorer
from values.likelihood import ContinuationScorer
from values.neurons import SteerSettings
from values.prompts import ValuePrompts
from values.questionnaire import BASIC_VALUES, AnswerCache, answer_probabilities, \
    expected_scores, option_token_ids


class Subject:
    """The model under test with everything the instruments share: prompts, data, the
    sampler for generated answers (greedy), and the answers already generated."""

    def __init__(self, policy: Any, sampler: Sampler, data: ValueData, seed: int = 0,
                 max_new_tokens: int = 48, batch_size: int = 16) -> None:
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.eos = policy.eos_token_ids
        self.pad = self.tokenizer.pad_token_id or 0
        self.sampler, self.data, self.seed = sampler, data, seed
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompts = ValuePrompts(self.tokenizer)
        self._answers: dict[tuple, list[str]] = {}

    def steering(self, settings: SteerSettings | None) -> Any:
        return nullcontext(None) if settings is None else settings.context(self.model)

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 on_decode: Any = None) -> tuple[Any, list[str]]:
        """Greedy responses (one per prompt) with the configured sampler, and their text
        (`on_decode`: the GenerationSpec's decode observer, e.g. a `record_decoding`'s)."""
        self.model.eval()
        spec = GenerationSpec(max_new_tokens, temperature=0.0, eos_token_ids=self.eos,
                              seed=self.seed, on_decode=on_decode)
        rollouts = self.sampler.sample(self.model, prompts, 1, spec)
        texts = self.tokenizer.batch_decode(
            [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids, rollouts.lengths)],
            skip_special_tokens=True)
        return rollouts, texts

    def answers(self, axis: str, persona: str | None,
                settings: SteerSettings | None) -> list[str]:
        """Open-ended answers to the axis's held-out dilemmas (memoised per condition)."""
        key = (axis, persona, None if settings is None else settings.name)
        if key not in self._answers:
            prompts = [self.prompts.open_question(q, persona)
                       for q, _ in self.data.dilemmas(axis)]
            with self.steering(settings):
                self._answers[key] = self.generate(prompts, self.max_new_tokens)[1]
        return self._answers[key]


@runtime_checkable
class Instrument(Protocol):
    name: str
    generates: bool  # needs generated answers (costly): run at fewer gammas

    def signs(self, subject: Subject, axis: str) -> torch.Tensor: ...

    def score(self, subject: Subject, axis: str, persona: str | None,
              settings: SteerSettings | None) -> torch.Tensor: ...

    def reset(self) -> None:
        """Forget what depends on the weights (cached prefix KV): they changed."""


def dilemma_signs(subject: Subject, axis: str) -> torch.Tensor:
    """One unit per held-out dilemma, each scored toward the axis's first pole."""
    return torch.ones(len(subject.data.dilemmas(axis)))


class _TeacherForced(ABC):
    """Shared by the log-likelihood instruments: (context, continuation) rows per axis and
    persona; the unsteered rows' prefix KV is kept (every steering condition reuses it), a
    persona's is built, used once and dropped."""

    name = ""
    generates = False

    def __init__(self, batch_size: int = 32) -> None:
        self.batch_size = batch_size
        self._scorers: dict[str, ContinuationScorer] = {}

    @abstractmethod
    def rows(self, subject: Subject, axis: str,
             persona: str | None) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) token ids, rows sharing a context adjacent."""

    def reduce(self, logp: torch.Tensor) -> torch.Tensor:
        return logp

    def reset(self) -> None:
        self._scorers.clear()

    def score(self, subject: Subject, axis: str, persona: str | None,
              settings: SteerSettings | None) -> torch.Tensor:
        if persona is None and axis in self._scorers:
            scorer = self._scorers[axis]
        else:
            scorer = ContinuationScorer(subject.model, self.rows(subject, axis, persona),
                                        subject.pad, self.batch_size)
            if persona is None:
                self._scorers[axis] = scorer
        with subject.steering(settings) as steering:
            return self.reduce(scorer.mean_logprobs(subject.model, steering))


class DilemmaMargin(_TeacherForced):
    name = "dilemmas"

    def rows(self, subject: Subject, axis: str,
             persona: str | None) -> list[tuple[list[int], list[int]]]:
        rows = []
        for question, answers in subject.data.dilemmas(axis):
            context = subject.prompts.dilemma(question, persona)
            rows += [(context, subject.prompts.continuation(answers[p])) for p in AXES[axis]]
        return rows

    def reduce(self, logp: torch.Tensor) -> torch.Tensor:
        return logp[0::2] - logp[1::2]  # first pole's answer minus the second's

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        return dilemma_signs(subject, axis)


class LetteredChoice(_TeacherForced):
    """Each dilemma in both answer orders (the first pole's answer as A, then as B); a unit's
    score is the mean over the two orders, so a preference for a letter or a position
    cancels within every unit."""
    name = "lettered"

    def rows(self, subject: Subject, axis: str,
             persona: str | None) -> list[tuple[list[int], list[int]]]:
        rows = []
        first, second = AXES[axis]
        letters = [subject.prompts.continuation(x) for x in ("A", "B")]
        for question, answers in subject.data.dilemmas(axis):
            for a, b in ((answers[first], answers[second]), (answers[second], answers[first])):
                context = subject.prompts.lettered(question, a, b, persona)
                rows += [(context, letters[0]), (context, letters[1])]
        return rows

    def reduce(self, logp: torch.Tensor) -> torch.Tensor:
        a_minus_b = (logp[0::2] - logp[1::2]).view(-1, 2)  # [dilemma, order]
        return (a_minus_b[:, 0] - a_minus_b[:, 1]) / 2  # the first pole's letter minus the other

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        return dilemma_signs(subject, axis)


class StatementLikelihood(_TeacherForced):
    name = "statements"

    def rows(self, subject: Subject, axis: str,
             persona: str | None) -> list[tuple[list[int], list[int]]]:
        context = subject.prompts.self_description(persona)
        return [(context, subject.prompts.continuation(s))
                for pole in AXES[axis] for s in subject.data.statements(pole, "validate")]

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        first, second = AXES[axis]
        return torch.tensor([1.0] * len(subject.data.statements(first, "validate")) +
                            [-1.0] * len(subject.data.statements(second, "validate")))


class Questionnaire:
    """Expected answers of the items keyed to the axis's two poles (sign: the item's pole)."""
    name = "questionnaire"
    generates = False

    def __init__(self, batch_size: int = 32) -> None:
        self.batch_size = batch_size
        self._cache: AnswerCache | None = None

    def _rows(self, subject: Subject, axis: str) -> tuple[list[int], torch.Tensor]:
        _, values = subject.data.items()
        first = AXES[axis][0]
        rows = [k for k, v in enumerate(values) if subject.data.value_dims[v] in AXES[axis]]
        signs = torch.tensor([1.0 if subject.data.value_dims[values[k]] == first else -1.0
                              for k in rows])
        return rows, signs

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        return self._rows(subject, axis)[1]

    def reset(self) -> None:
        self._cache = None

    def score(self, subject: Subject, axis: str, persona: str | None,
              settings: SteerSettings | None) -> torch.Tensor:
        texts, _ = subject.data.items()
        rows = self._rows(subject, axis)[0]
        options = option_token_ids(subject.tokenizer, len(subject.data.scale))
        if persona is None:
            if self._cache is None:  # unsteered prefixes of every item, shared by all axes
                self._cache = AnswerCache(subject.model, [
                    subject.prompts.questionnaire_item(t, subject.data.scale) for t in texts],
                    subject.pad, self.batch_size)
            with subject.steering(settings):
                probs = answer_probabilities(subject.model, self._cache, options)[rows]
        else:  # a persona's items, once: only the axis's
            prompts = [subject.prompts.questionnaire_item(texts[k], subject.data.scale, persona)
                       for k in rows]
            with subject.steering(settings):
                probs = answer_probabilities(subject.model, prompts, options, subject.pad,
                                             self.batch_size)
        return expected_scores(probs).double()


class EmbeddingMargin:
    """MiniLM projection of generated answers onto the axis (first pole minus second)."""
    name = "embedding"
    generates = True

    def __init__(self, encoder_path: str | None = None) -> None:
        self.encoder_path = encoder_path
        self._judge: EmbeddingJudge | None = None

    def reset(self) -> None:
        """The judge does not depend on the policy's weights (answers are memoised by the
        Subject, which is rebuilt when they change)."""

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        return dilemma_signs(subject, axis)

    def score(self, subject: Subject, axis: str, persona: str | None,
              settings: SteerSettings | None) -> torch.Tensor:
        if self._judge is None:
            self._judge = EmbeddingJudge({p: subject.data.statements(p, "validate")
                                          for poles in AXES.values() for p in poles},
                                         self.encoder_path)
        return self._judge.margin(subject.answers(axis, persona, settings), *AXES[axis])


class PyvaluesMargin:
    """pyvalues dictionary scores of generated answers: the mean fraction of sentences
    labelled with the first pole's values minus the second's."""
    name = "pyvalues"
    generates = True

    def __init__(self) -> None:
        self._scorer: TextValueScorer | None = None

    def reset(self) -> None:
        """The dictionaries do not depend on the policy's weights."""

    def signs(self, subject: Subject, axis: str) -> torch.Tensor:
        return dilemma_signs(subject, axis)

    def score(self, subject: Subject, axis: str, persona: str | None,
              settings: SteerSettings | None) -> torch.Tensor:
        if self._scorer is None:
            self._scorer = TextValueScorer()
        scores = self._scorer.score(subject.answers(axis, persona, settings))  # [n, 10]
        first, second = AXES[axis]
        dims = [subject.data.value_dims[v] for v in BASIC_VALUES]
        of_first = torch.tensor([d == first for d in dims])  # [10] bool
        of_second = torch.tensor([d == second for d in dims])
        return scores[:, of_first].mean(-1) - scores[:, of_second].mean(-1)
