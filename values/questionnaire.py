"""The portrait questionnaire (docs/ARCHITECTURE.md section 9): at the answer position the model's
probabilities over the six option tokens "1".."6" give an expected score per item. The
`questionnaire` instrument (values/instruments.py) contrasts the items of an axis's two poles,
which removes the respondent's overall scale use (the usual centring) by construction.

    probs = answer_probabilities(model, prompts, option_token_ids(tokenizer))   # [n, 6]
    scores = expected_scores(probs)                                              # [n], 1..6
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from values.hooks import steering_paused
from values.likelihood import CommonPrefix
from common.compat import cache_keyword, output_cache

BASIC_VALUES = ("self_direction", "stimulation", "hedonism", "achievement", "power",
                "security", "conformity", "tradition", "benevolence", "universalism")


def option_token_ids(tokenizer: Any, options: int = 6) -> list[int]:
    """The token id of each answer digit "1".."options" (each must be a single token)."""
    ids = []
    for k in range(1, options + 1):
        tokens = tokenizer.encode(str(k), add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer splits the answer option {k!r} into {tokens}; "
                             "the questionnaire needs one token per option")
        ids.append(tokens[0])
    return ids


def _left_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device,
                 skip: int = 0) -> tuple[torch.Tensor, ...]:
    """ids [b, S] of each prompt after its first `skip` tokens (shared, already in a cache),
    left-padded; the attention mask [b, skip+S] and the ids' positions [b, S]."""
    width = max(len(p) for p in prompts) - skip
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [b, S]
    attention = torch.zeros(len(prompts), skip + width, dtype=torch.long)
    attention[:, :skip] = 1
    for r, prompt in enumerate(prompts):
        own = list(prompt[skip:])
        ids[r, width - len(own):] = torch.tensor(own)
        attention[r, skip + width - len(own):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, skip:]
    return ids.to(device), attention.to(device), positions.to(device)


class AnswerCache:
    """The KV of every prompt but its last token, computed once.

    Steering changes only the positions that predict a response token, here each prompt's
    last one, so everything before it is the same under every steering condition: each
    condition then costs one one-token forward per prompt instead of a whole prefill.
    Valid while the model's weights do not change; built unsteered even inside `steer`.
    """

    @torch.no_grad()
    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], pad_token_id: int = 0,
                 batch_size: int = 16) -> None:
        if any(len(p) < 2 for p in prompts):
            raise ValueError("every questionnaire prompt needs at least two tokens")
        device = next(model.parameters()).device
        shared = CommonPrefix(model, [p[:-1] for p in prompts])  # the template, prefilled once
        self.batches = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start: start + batch_size]
            ids, attention, positions = _left_padded(chunk, pad_token_id, device, shared.length)
            with steering_paused(model):
                out = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1],
                            position_ids=positions[:, :-1], use_cache=True,
                            **shared.inputs(model, len(chunk)))
            self.batches.append((output_cache(out), ids[:, -1:], attention,
                                 positions[:, -1:]))

    @torch.no_grad()
    def last_logits(self, model: Any) -> torch.Tensor:
        """[n, V] next-token logits at every prompt's last token (float32, on the CPU)."""
        out = []
        for cache, last, attention, positions in self.batches:
            cached = {cache_keyword(model): copy.deepcopy(cache)}  # the forward appends to it
            logits = model(input_ids=last, attention_mask=attention, position_ids=positions,
                           use_cache=True, **cached).logits[:, -1]
            out.append(logits.float().cpu())
        return torch.cat(out)


def answer_probabilities(model: Any, prompts: Sequence[Sequence[int]] | AnswerCache,
                         option_ids: list[int], pad_token_id: int = 0,
                         batch_size: int = 16) -> torch.Tensor:
    """[n, options]: next-token probabilities of the option tokens after each prompt,
    renormalised over the options. Prompts are left-padded; the answer position is each
    row's last (the one a `steer` context steers). Pass an `AnswerCache` to reuse prefixes."""
    if isinstance(prompts, AnswerCache):
        logits = prompts.last_logits(model)
    else:  # one condition only: the shared tokens (a persona's) prefilled once, then a
        # forward per batch over the rest
        device, out = next(model.parameters()).device, []
        shared = CommonPrefix(model, prompts)
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start: start + batch_size]
                ids, attention, positions = _left_padded(chunk, pad_token_id, device,
                                                         shared.length)
                out.append(model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                 use_cache=shared.length > 0, logits_to_keep=1,
                                 **shared.inputs(model, len(chunk))).logits[:, -1].float().cpu())
        logits = torch.cat(out)
    return torch.softmax(logits[:, option_ids], dim=-1)


def expected_scores(probs: torch.Tensor) -> torch.Tensor:
    """[n, K] option probabilities -> [n] expected answer in 1..K."""
    levels = torch.arange(1, probs.shape[-1] + 1, dtype=probs.dtype)
    return (probs * levels).sum(-1) / probs.sum(-1)
