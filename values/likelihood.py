"""Teacher-forced log-likelihood of continuations after contexts, steered at every position
that predicts a continuation token: the measure behind the dilemma, lettered and statement
instruments (values/instruments.py).

Steering acts only at positions that predict a continuation token: the context's last
position and every continuation position but the last. Everything before the context's last
token is therefore the same under every steering condition, so its KV is computed once,
unsteered, and each condition costs one forward over (last context token + continuation).
The tokens every context begins with (a persona's system prompt and the chat template around
it) are prefilled once for all rows (`CommonPrefix`), not once per context.

    scorer = ContinuationScorer(model, [(context_ids, answer_ids), ...], pad_token_id=0)
    mean_logp = scorer.mean_logprobs(model)                  # [n]: nats per answer token
    with settings.context(model) as steering:
        steered = scorer.mean_logprobs(model, steering)
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from common.compat import cache_keyword, output_cache
from values.hooks import steering_paused


def common_prefix_length(seqs: Sequence[Sequence[int]], limit: int | None = None) -> int:
    """How many leading tokens all `seqs` share, at most `limit`, leaving each sequence at
    least one token of its own."""
    most = min(len(s) for s in seqs) - 1
    most = most if limit is None else min(most, limit)
    first, k = seqs[0], 0
    while k < most and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


class CommonPrefix:
    """The KV of the tokens that every sequence of a condition begins with, computed once
    (one row, unsteered) instead of once per row; `inputs(model, rows)` gives each batch a
    copy to prefill the rest after. `length` is 0 (no shared KV) when `seqs` share fewer
    than `min_tokens` tokens or hold a single sequence, and for a model with sliding-window
    layers (their window counts cache slots, so the padding between the shared tokens and
    a shorter row's own would narrow that row's window).

        shared = CommonPrefix(model, prompts)
        rest = [p[shared.length:] for p in prompts]   # left-padded after the shared tokens
        model(input_ids=..., attention_mask=[ones(L) | rest mask], position_ids=...,
              use_cache=True, **shared.inputs(model, rows))
    """

    @torch.no_grad()
    def __init__(self, model: Any, seqs: Sequence[Sequence[int]], limit: int | None = None,
                 min_tokens: int = 4) -> None:
        self.length = common_prefix_length(seqs, limit) if len(seqs) > 1 else 0
        self._cache = None
        if self.length < min_tokens:
            self.length = 0
            return
        device = next(model.parameters()).device
        ids = torch.tensor([list(seqs[0][: self.length])], device=device)
        with steering_paused(model):
            out = model(input_ids=ids, position_ids=torch.arange(self.length, device=device)[None],
                        use_cache=True)
        cache = output_cache(out)
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            self._cache = cache
        else:
            self.length = 0

    def inputs(self, model: Any, rows: int) -> dict[str, Any]:
        """The forward's cache argument for a batch of `rows` (a fresh copy), or nothing."""
        if self._cache is None:
            return {}
        cache = copy.deepcopy(self._cache)
        device = next(model.parameters()).device
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=device))
        return {cache_keyword(model): cache}

    def attention(self, rows: int) -> torch.Tensor:
        """[rows, length] ones: the shared tokens' part of an attention mask."""
        return torch.ones(rows, self.length, dtype=torch.long)


class ContinuationScorer:
    """Rows (context ids, continuation ids); contexts of >= 2 tokens, continuations >= 1.
    Rows that share a context (the two answers of a dilemma, every statement after the same
    question) share its prefill within a batch: keep them adjacent."""

    @torch.no_grad()
    def __init__(self, model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                 pad_token_id: int = 0, batch_size: int = 16) -> None:
        if not rows:
            raise ValueError("nothing to score: no (context, continuation) row")
        if any(len(c) < 2 or len(x) < 1 for c, x in rows):
            raise ValueError("every context needs two tokens and every continuation one")
        device = next(model.parameters()).device
        # the tokens every context starts with (the chat template, a persona): prefilled once
        shared = CommonPrefix(model, [c[:-1] for c, _ in rows])
        skip = shared.length
        self.batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            contexts = list(dict.fromkeys(tuple(c) for c, _ in chunk))  # each prefilled once
            of_row = torch.tensor([contexts.index(tuple(c)) for c, _ in chunk])
            prefix = [list(c[skip:-1]) for c in contexts]  # after the shared tokens
            suffix = [[c[-1], *x] for c, x in chunk]
            width, tail = max(map(len, prefix)), max(map(len, suffix))
            ids = torch.full((len(prefix), width), pad_token_id, dtype=torch.long)  # [u, P]
            # [b, L+P+S]: the shared tokens, each context left-padded, its continuation
            attention = torch.zeros(len(chunk), skip + width + tail, dtype=torch.long)
            attention[:, :skip] = 1
            tail_ids = torch.full((len(chunk), tail), pad_token_id, dtype=torch.long)  # [b, S]
            for u, p in enumerate(prefix):
                ids[u, width - len(p):] = torch.tensor(p)
            for r, s in enumerate(suffix):
                p = len(prefix[int(of_row[r])])
                attention[r, skip + width - p: skip + width + len(s)] = 1
                tail_ids[r, : len(s)] = torch.tensor(s)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [b, L+P+S]
            lengths = torch.tensor([len(s) - 1 for s in suffix])  # continuation tokens
            first = torch.tensor([int((of_row == u).nonzero()[0]) for u in range(len(prefix))])
            unique_attention = attention[:, : skip + width].index_select(0, first)
            with steering_paused(model):
                out = model(input_ids=ids.to(device), attention_mask=unique_attention.to(device),
                            position_ids=(unique_attention.cumsum(-1) - 1).clamp(min=0)[
                                :, skip:].to(device), use_cache=True,
                            **shared.inputs(model, len(prefix)))
            cache = output_cache(out)
            cache.reorder_cache(of_row.to(device))  # one row of KV per continuation
            self.batches.append((cache, tail_ids.to(device), attention.to(device),
                                 positions[:, skip + width:].to(device), lengths))

    def __len__(self) -> int:
        return sum(len(b[4]) for b in self.batches)

    @torch.no_grad()
    def sum_logprobs(self, model: Any, steering: Any = None) -> tuple[torch.Tensor, ...]:
        """([n] summed log-probability of each continuation, [n] its token count), float64
        on the CPU. With a `steer(...)` context's Steering, the continuation-predicting
        positions are steered."""
        sums, counts = [], []
        for cache, tail, attention, positions, lengths in self.batches:
            predicts = torch.arange(tail.shape[1])[None, :] < lengths[:, None]  # [b, S]
            if steering is not None:
                steering.positions = predicts
            # The forward appends the tail to the cache: a DynamicLayer concatenates into new
            # tensors, so keeping the prefix's and putting them back restores it; other layer
            # types (sliding windows) get a copy.
            plain = all(type(layer) is DynamicLayer for layer in cache.layers)
            prefix = [(layer.keys, layer.values) for layer in cache.layers] if plain else None
            try:
                logits = model(input_ids=tail, attention_mask=attention, position_ids=positions,
                               use_cache=True, **{cache_keyword(model): cache if plain
                                                  else copy.deepcopy(cache)}
                               ).logits.float()  # [b, S, V]
            finally:
                if steering is not None:
                    steering.positions = None
                for layer, (keys, values) in zip(cache.layers, prefix or []):
                    layer.keys, layer.values = keys, values
            logp = torch.log_softmax(logits[:, :-1], -1).gather(
                -1, tail[:, 1:, None]).squeeze(-1).double().cpu()  # [b, S-1]
            sums.append((logp * predicts[:, :-1]).sum(-1))
            counts.append(lengths.double())
        return torch.cat(sums), torch.cat(counts)

    def mean_logprobs(self, model: Any, steering: Any = None) -> torch.Tensor:
        """[n]: nats per continuation token (the length-normalised log-likelihood)."""
        total, count = self.sum_logprobs(model, steering)
        return total / count


@torch.no_grad()
def perplexity(model: Any, texts: Sequence[Sequence[int]], steering: Any = None,
               batch_size: int = 8, pad_token_id: int = 0) -> float:
    """exp(mean next-token NLL) over all tokens of `texts` after their first. With a
    `steer(...)` context's Steering, every position is steered (not only a response's)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        width = max(len(t) for t in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for r, tokens in enumerate(chunk):
            ids[r, : len(tokens)] = torch.tensor(list(tokens))
            valid[r, : len(tokens)] = True
        ids, valid = ids.to(device), valid.to(device)
        if steering is not None:
            steering.positions = valid
        try:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        finally:
            if steering is not None:
                steering.positions = None
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = valid[:, 1:]
        nll -= float(logp[mask].sum())
        count += int(mask.sum())
    return math.exp(nll / max(1, count))
