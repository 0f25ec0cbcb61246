"""Where a value-neuron location's activations come from (docs/ARCHITECTURE.md section 9, phase 1 of
values/experiment.py): per source (a pole, or "<pole>_reversed"), activation statistics pooled
and per unit.

- `location_statistics`: greedy responses to location prompts (a location statement of the
  source + a location question of its axis), counted while they are generated.
- `teacher_forced_statistics`: the location statements themselves, fed whole after the
  self-description question (no sampled answer: no sampling noise), one unit per statement.
- `response_statistics`: the counting forward over right-padded (context, response) rows that
  the teacher-forced source and the training callback (callbacks/values.py) share.

locate_values.py keys its cache of generated statistics on this module's source: what is here
decides them, and nothing else in the experiment does.

    stats = location_statistics(subject, settings, settings.sources(dims))
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from values.instruments import Subject
from values.likelihood import CommonPrefix
from values.statistics import ActivationStats, ActivationSummary, PromptCounts, \
    record_activations, record_decoding


def parse_source(source: str) -> tuple[str, bool]:
    """"<pole>" or "<pole>_reversed" -> (pole, reversed)."""
    return source.removesuffix("_reversed"), source.endswith("_reversed")


@dataclass
class SourceStats:
    summary: ActivationSummary  # pooled over the source's response tokens
    counts: PromptCounts  # per prompt
    texts: list[str] = field(default_factory=list)


def location_prompts(subject: Subject, source: str, pairs: int) -> list[list[int]]:
    """`pairs` prompts "statement of the source + location question of its axis"; the two
    poles of an axis and their negations get the same questions in the same order, and a
    pole and its negation the same statement slots."""
    pole, reversed_ = parse_source(source)
    statements = subject.data.statements(pole, "locate", reversed_)
    questions = list(subject.data.questions(pole, "locate"))
    random.Random(subject.seed).shuffle(questions)
    order = list(range(len(statements)))
    random.Random(subject.seed + 1).shuffle(order)
    return [subject.prompts.contrast(statements[order[k % len(order)]],
                                     questions[k % len(questions)]) for k in range(pairs)]


def pack(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """(context, response) rows -> right-padded ids [N, S] and the mask of the response
    tokens [N, S]."""
    width = max(len(c) + len(x) for c, x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, (context, response) in enumerate(rows):
        ids[r, : len(context) + len(response)] = torch.tensor(context + response)
        mask[r, len(context): len(context) + len(response)] = True
    return ids, mask


def sequences(prompts: list[list[int]], rollouts: Any, pad: int,
              limit: int | None = None) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt + completion ids [N, S] and the mask of completion tokens [N, S]
    (of the first `limit` rollouts, or all)."""
    count = len(rollouts) if limit is None else min(limit, len(rollouts))
    return pack([(list(prompts[int(rollouts.prompt_index[r])]),
                  rollouts.completion_ids[r, : int(rollouts.lengths[r])].tolist())
                 for r in range(count)], pad)


@torch.no_grad()
def response_statistics(model: Any, ids: torch.Tensor, mask: torch.Tensor,
                        stats: ActivationStats, batch_size: int = 8,
                        counts: PromptCounts | None = None) -> ActivationStats:
    """Feed right-padded sequences through the model, counting the masked tokens (pooled in
    `stats`, per sequence in `counts`)."""
    device = next(model.parameters()).device
    # the decoder alone where the model has one: the MLPs are all that is read, so the
    # vocabulary projection (a fifth of SmolLM2's forward) is skipped
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    # the tokens every row begins with before its first counted one (the chat template, a
    # shared question) are prefilled once, before recording: none of them is counted
    counted = mask.any(1)
    first = int(mask[counted].float().argmax(1).min()) if counted.any() else 0
    shared = CommonPrefix(body, ids[:, : first + 1].tolist(), limit=first)
    skip = shared.length
    with record_activations(model, stats, counts) as recorder:
        for start in range(0, len(ids), batch_size):
            chunk, chunk_mask = ids[start: start + batch_size], mask[start: start + batch_size]
            width = int(chunk_mask.nonzero()[:, 1].max()) + 1 if chunk_mask.any() else 1
            width = max(width, skip + 1)
            recorder.mask = chunk_mask[:, skip:width].to(device)
            positions = torch.arange(skip, width, device=device).expand(len(chunk), -1)
            body(input_ids=chunk[:, skip:width].to(device), position_ids=positions,
                 use_cache=skip > 0, **shared.inputs(body, len(chunk)))
    return stats


def location_statistics(subject: Subject, settings: Any, sources: list[str],
                        log: Callable[[str], None] = print) -> dict[str, SourceStats]:
    """Each source's responses (`settings.pairs` prompts, `settings.max_new_tokens` tokens:
    the `locate.*` settings), counted while they are generated (record_decoding)."""
    out = {}
    for source in sources:
        prompts = location_prompts(subject, source, settings.pairs)
        stats = ActivationStats.for_model(subject.model)
        counts = PromptCounts.for_model(subject.model, len(prompts))
        with record_decoding(subject.model, stats, counts) as recorder:
            rollouts, texts = subject.generate(prompts, settings.max_new_tokens,
                                               recorder.on_decode)
        out[source] = SourceStats(stats.compute(), counts, texts)
        log(f"source {source}: {settings.pairs} responses, {out[source].summary.tokens} "
            f"response tokens, {rollouts.stats.wall_time_s:.1f} s sampling")
    return out


def teacher_forced_rows(subject: Subject, source: str) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) per location statement of `source`: the statement (or, for
    "<pole>_reversed", its negation) as the model's own answer to the self-description
    question, as the statement instrument reads its held-out statements."""
    pole, reversed_ = parse_source(source)
    context = subject.prompts.self_description()
    return [(context, subject.prompts.continuation(text))
            for text in subject.data.statements(pole, "locate", reversed_)]


def teacher_forced_statistics(subject: Subject, sources: list[str],
                              log: Callable[[str], None] = print) -> dict[str, SourceStats]:
    """Each source's activation statistics over the tokens of its location statements, fed
    whole (teacher-forced): no sampled answer, so no sampling noise; one unit per statement
    (a pole and its negation pair up statement by statement)."""
    out = {}
    for source in sources:
        rows = teacher_forced_rows(subject, source)
        ids, mask = pack(rows, subject.pad)
        stats = ActivationStats.for_model(subject.model)
        counts = PromptCounts.for_model(subject.model)
        response_statistics(subject.model, ids, mask, stats, counts=counts)
        pole, reversed_ = parse_source(source)
        out[source] = SourceStats(stats.compute(), counts,
                                  subject.data.statements(pole, "locate", reversed_))
        log(f"source {source} (teacher-forced): {len(rows)} statements, "
            f"{out[source].summary.tokens} tokens")
    return out


__all__ = ["SourceStats", "location_prompts", "location_statistics", "pack", "parse_source",
           "response_statistics", "sequences", "teacher_forced_rows", "teacher_forced_statistics"]
