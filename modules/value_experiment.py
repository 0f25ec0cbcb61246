"""The steps of a value-neuron experiment, shared by `locate_values.py` and the training
callback: generate pole responses, gather activation statistics, locate per dimension, and
measure a model (steered or not) on the questionnaire, open-ended answers and perplexity.

    experiment = ValueExperiment(policy, sampler, load_value_data())
    summaries = experiment.pole_statistics(pairs=64, max_new_tokens=48)
    neurons = experiment.locate(summaries, "conservation", top_k=100, min_delta=0.2)
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from datamodules.values import AXIS_OF, ValueData, ValuePrompts
from modules.value_eval import (AnswerCache, TextValueScorer, answer_probabilities,
                                dimension_text_scores, expected_scores, option_token_ids,
                                perplexity)
from modules.value_neurons import (DIMENSIONS, OPPOSITE, ActivationStats, ActivationSummary,
                                   ValueNeurons, model_signature, random_control,
                                   record_activations, select_lape, select_neurons, steer)
from samplers.base import GenerationSpec, Sampler


@dataclass
class Condition:
    """One way of running the model: unsteered, or steered toward a dimension."""
    name: str  # "base" or "<located|random>:<dimension>@<gamma>"
    target: ValueNeurons | None = None
    opposite: ValueNeurons | None = None
    gamma: float = 0.0

    def context(self, model: Any, fraction: float, seed: int) -> Any:
        if self.target is None:
            return nullcontext(None)
        return steer(model, self.target, self.gamma, self.opposite, fraction, seed)


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
                        stats: ActivationStats, batch_size: int = 8) -> ActivationStats:
    """Feed right-padded sequences through the model, counting the masked tokens."""
    device = next(model.parameters()).device
    with record_activations(model, stats) as recorder:
        for start in range(0, len(ids), batch_size):
            chunk, chunk_mask = ids[start: start + batch_size], mask[start: start + batch_size]
            width = int(chunk_mask.nonzero()[:, 1].max()) + 1 if chunk_mask.any() else 1
            recorder.mask = chunk_mask[:, :width].to(device)
            model(input_ids=chunk[:, :width].to(device), use_cache=False)
    return stats


class ValueExperiment:
    def __init__(self, policy: Any, sampler: Sampler, data: ValueData, seed: int = 0,
                 fraction: float = 0.9, steer_seed: int = 0) -> None:
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.eos = policy.eos_token_ids
        self.pad = self.tokenizer.pad_token_id or 0
        self.sampler, self.data, self.seed = sampler, data, seed
        self.fraction, self.steer_seed = fraction, steer_seed
        self.prompts = ValuePrompts(self.tokenizer)
        self._scorer: TextValueScorer | None = None
        self._answer_cache: AnswerCache | None = None
        self.pole_responses: dict[str, list[str]] = {}
        self._answers: dict[tuple, tuple[dict[str, float], list[str]]] = {}

    def spec(self, max_new_tokens: int) -> GenerationSpec:
        return GenerationSpec(max_new_tokens, temperature=0.0, eos_token_ids=self.eos,
                              seed=self.seed)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[Any, list[str]]:
        """Greedy responses (one per prompt) with the configured sampler, and their text."""
        self.model.eval()
        rollouts = self.sampler.sample(self.model, prompts, 1, self.spec(max_new_tokens))
        texts = self.tokenizer.batch_decode(
            [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids, rollouts.lengths)],
            skip_special_tokens=True)
        return rollouts, texts

    # ------------------------------------------------------------------ location

    def contrast_prompts(self, pole: str, pairs: int) -> list[list[int]]:
        """`pairs` prompts "description of `pole` + location question of its axis"; both poles
        of an axis get the same questions in the same order."""
        descriptions = self.data.descriptions_of(pole)
        questions = list(self.data.questions(pole, "locate"))
        random.Random(self.seed).shuffle(questions)
        order = list(range(len(descriptions)))
        random.Random(self.seed + 1).shuffle(order)
        return [self.prompts.contrast(descriptions[order[k % len(order)]],
                                      questions[k % len(questions)]) for k in range(pairs)]

    def pole_statistics(self, pairs: int, max_new_tokens: int, batch_size: int = 8,
                        poles: tuple[str, ...] = DIMENSIONS,
                        log: Callable[[str], None] = print) -> dict[str, ActivationSummary]:
        """Activation statistics of each pole's responses; the response texts are kept in
        `self.pole_responses` (they also serve as the open-ended instrument's control)."""
        summaries = {}
        for pole in poles:
            prompts = self.contrast_prompts(pole, pairs)
            rollouts, self.pole_responses[pole] = self.generate(prompts, max_new_tokens)
            ids, mask = sequences(prompts, rollouts, self.pad)
            stats = ActivationStats.for_model(self.model)
            summaries[pole] = response_statistics(self.model, ids, mask, stats,
                                                  batch_size).compute()
            log(f"pole {pole}: {pairs} responses, {summaries[pole].tokens} response tokens, "
                f"{rollouts.stats.wall_time_s:.1f} s sampling")
        return summaries

    def locate(self, summaries: dict[str, ActivationSummary], dimension: str, method: str,
               top_k: int, min_delta: float) -> ValueNeurons:
        pos, neg = summaries[dimension], summaries[OPPOSITE[dimension]]
        if method == "contrast":
            neurons = select_neurons(pos.prob, neg.prob, top_k, min_delta, scale=pos.p95)
        elif method == "lape":
            probs = torch.stack([summaries[d].prob for d in DIMENSIONS])
            neurons = select_lape(probs, DIMENSIONS.index(dimension), top_k,
                                  DIMENSIONS.index(OPPOSITE[dimension]), scale=pos.p95)
        else:
            raise ValueError(f"locate.method must be contrast or lape, got {method!r}")
        neurons.meta.update(dimension=dimension, model=model_signature(self.model),
                            top_k=top_k, min_delta=min_delta)
        return neurons

    @staticmethod
    def controls(located: dict[str, ValueNeurons], d_ff: int,
                 seed: int) -> dict[str, ValueNeurons]:
        return {d: random_control(n, d_ff, seed + k, exclude=[located[OPPOSITE[d]]])
                for k, (d, n) in enumerate(located.items())}

    # ------------------------------------------------------------------ measurement

    def questionnaire(self, condition: Condition, batch_size: int = 16) -> torch.Tensor:
        """[items] expected scores (1..6) under a condition."""
        return expected_scores(self.questionnaire_probs(condition, batch_size))

    def questionnaire_probs(self, condition: Condition, batch_size: int = 16) -> torch.Tensor:
        """[items, 6] option probabilities under a condition."""
        if self._answer_cache is None:  # the unsteered prefixes, shared by every condition
            texts, _ = self.data.items()
            prompts = [self.prompts.questionnaire_item(t, self.data.scale) for t in texts]
            self._answer_cache = AnswerCache(self.model, prompts, self.pad, batch_size)
        options = option_token_ids(self.tokenizer, len(self.data.scale))
        with condition.context(self.model, self.fraction, self.steer_seed):
            return answer_probabilities(self.model, self._answer_cache, options)

    def persona_questionnaire(self, pole: str, personas: int,
                              batch_size: int = 16) -> torch.Tensor:
        """[items] expected scores, averaged over `personas` descriptions of `pole` given as
        the system prompt: how far a prompt moves the instrument (its positive control)."""
        texts, _ = self.data.items()
        options = option_token_ids(self.tokenizer, len(self.data.scale))
        scores = []
        for persona in self.data.descriptions_of(pole)[:personas]:
            prompts = [self.prompts.questionnaire_item(t, self.data.scale, persona) for t in texts]
            probs = answer_probabilities(self.model, prompts, options, self.pad, batch_size)
            scores.append(expected_scores(probs))
        return torch.stack(scores).mean(0)

    def open_ended(self, condition: Condition, dimension: str, count: int,
                   max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
        """Dimension scores of answers to `count` held-out questions of the dimension's axis
        (memoised: steering toward a pole serves both dimensions of its axis)."""
        key = (condition.name, AXIS_OF[dimension], count, max_new_tokens)
        if key not in self._answers:
            self._answers[key] = self._open_ended(condition, dimension, count, max_new_tokens)
        return self._answers[key]

    def _open_ended(self, condition: Condition, dimension: str, count: int,
                    max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
        questions = self.data.questions(dimension, "validate")[:count]
        prompts = [self.prompts.open_question(q) for q in questions]
        with condition.context(self.model, self.fraction, self.steer_seed):
            _, texts = self.generate(prompts, max_new_tokens)
        return self.text_scores(texts), texts

    def text_scores(self, texts: list[str]) -> dict[str, float]:
        if self._scorer is None:
            self._scorer = TextValueScorer()
        return dimension_text_scores(self._scorer.score(texts), self.data.value_dims)

    def perplexity(self, condition: Condition, passages: int | None = None) -> float:
        texts = [self.prompts.plain(t) for t in self.data.neutral_passages[:passages]]
        with condition.context(self.model, self.fraction, self.steer_seed) as steering:
            return perplexity(self.model, texts, steering, pad_token_id=self.pad)
