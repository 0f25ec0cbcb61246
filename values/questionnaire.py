"""The portrait questionnaire (DESIGN.md section 9): at the answer position the model's
probabilities over the six option tokens "1".."6" give an expected score per item; scores are
centred on the respondent's mean over all items (the usual correction for scale use), then
averaged per value, and the values per dimension.

    probs = answer_probabilities(model, prompts, option_token_ids(tokenizer))   # [n, 6]
    values, dims = centred_scores(expected_scores(probs), item_values, value_dims)
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from values.hooks import steering_paused
from samplers.base import cache_keyword, output_cache

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


def _left_padded(prompts: Sequence[Sequence[int]], pad: int,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [b, S]
    attention = torch.zeros_like(ids)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(list(prompt))
        attention[r, width - len(prompt):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
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
        self.batches = []
        for start in range(0, len(prompts), batch_size):
            ids, attention, positions = _left_padded(prompts[start: start + batch_size],
                                                     pad_token_id, device)
            with steering_paused(model):
                out = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1],
                            position_ids=positions[:, :-1], use_cache=True)
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
    else:  # one condition only: a plain forward per batch, no cache to build and copy
        device, out = next(model.parameters()).device, []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                ids, attention, positions = _left_padded(prompts[start: start + batch_size],
                                                         pad_token_id, device)
                out.append(model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                 use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
        logits = torch.cat(out)
    return torch.softmax(logits[:, option_ids], dim=-1)


def expected_scores(probs: torch.Tensor) -> torch.Tensor:
    """[n, K] option probabilities -> [n] expected answer in 1..K."""
    levels = torch.arange(1, probs.shape[-1] + 1, dtype=probs.dtype)
    return (probs * levels).sum(-1) / probs.sum(-1)


def centred_scores(scores: torch.Tensor, item_values: Sequence[str],
                   value_dims: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    """Item scores [n] -> (value -> mean centred score, dimension -> mean of its values)."""
    centred = scores.double() - scores.double().mean()
    values = {}
    for value in dict.fromkeys(item_values):
        rows = torch.tensor([v == value for v in item_values])
        values[value] = float(centred[rows].mean())
    dims: dict[str, list[float]] = {}
    for value, score in values.items():
        dims.setdefault(value_dims[value], []).append(score)
    return values, {d: sum(s) / len(s) for d, s in dims.items()}


def dimension_shift(base: torch.Tensor, steered: torch.Tensor, item_values: Sequence[str],
                    value_dims: dict[str, str], dimension: str, boot: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Centred dimension score of `steered` minus that of `base` (both [n], paired by item),
    with a 95% bootstrap interval over items (resampled within each value)."""
    diff = (steered.double() - steered.double().mean()) - (base.double() - base.double().mean())
    groups = [torch.tensor([i for i, v in enumerate(item_values) if v == value])
              for value in dict.fromkeys(item_values) if value_dims[value] == dimension]
    if not groups:
        raise ValueError(f"the questionnaire has no item for dimension {dimension!r}")
    point = sum(float(diff[g].mean()) for g in groups) / len(groups)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.zeros(boot, dtype=torch.float64)
    for g in groups:
        picks = g[torch.randint(len(g), (boot, len(g)), generator=gen)]  # [boot, n_value]
        draws += diff[picks].mean(-1)
    draws /= len(groups)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return point, float(low), float(high)
