"""`predictor=history`: running length statistics of the same prompt, of similar prompts, or of
all prompts; no model, learns from the first observed group (the default of `infinite`).
"""
from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Any

import torch

from samplers.prediction import ProbeBatch, check_rows
from predictors.base import load_if_exists, load_predictor, save_predictor
from common.checks import check_number


class HistoryPredictor:
    """E[L - k | L > k] from observed full lengths L: of the same prompt if it has at least
    `min_count` such observations, else of the `neighbours` most similar prompts (Jaccard
    similarity of token sets, similarity-weighted), else of the last `global_window`
    completions of any prompt, else `default`. Memory is bounded: `max_per_prompt` lengths per
    prompt and `max_prompts` prompts (least recently observed evicted). No gradients."""

    name, needs_hidden, needs_oracle = "history", False, False

    def __init__(self, path: str | None = None, min_count: int = 2, neighbours: int = 4,
                 max_prompts: int = 1024, max_per_prompt: int = 64, global_window: int = 4096,
                 default: float = 64.0, save_on_refit: bool = False) -> None:
        self.min_count = check_number("min_count", min_count, 1, integer=True)
        self.neighbours = check_number("neighbours", neighbours, 0, integer=True)
        self.max_prompts = check_number("max_prompts", max_prompts, 1, integer=True)
        self.max_per_prompt = check_number("max_per_prompt", max_per_prompt, 1, integer=True)
        self.global_window = check_number("global_window", global_window, 1, integer=True)
        self.default = float(check_number("default", default, 0))
        self.path, self.save_on_refit = path, save_on_refit
        self.history: OrderedDict[tuple[int, ...], deque[int]] = OrderedDict()  # LRU order
        self.token_sets: dict[tuple[int, ...], frozenset[int]] = {}
        self.recent: deque[int] = deque(maxlen=global_window)
        load_if_exists(self, path)

    def bind(self, tokenizer: Any) -> None:
        pass

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        n = check_rows(batch)
        memo: dict[tuple[int, int], float] = {}  # (prompt, k) -> prediction
        out = torch.empty(n, dtype=torch.float64)  # [n]
        for row in range(n):
            p, k = int(batch.prompt_index[row]), len(batch.probe_ids[row])
            if (p, k) not in memo:
                memo[(p, k)] = self.estimate(tuple(batch.prompts[p]), k)
            out[row] = memo[(p, k)]
        return out.float()

    def estimate(self, key: tuple[int, ...], k: int) -> float:
        """Predicted remaining tokens after k probe tokens for the prompt `key`."""
        own = [L for L in self.history.get(key, ()) if L > k]
        if len(own) >= self.min_count:
            return sum(own) / len(own) - k
        similar = self.similar(key)
        weights = means = 0.0
        for similarity, other in similar:
            longer = [L for L in self.history[other] if L > k]
            if longer:
                weights += similarity
                means += similarity * sum(longer) / len(longer)
        if weights > 0:
            return means / weights - k
        longer = [L for L in self.recent if L > k]
        if longer:
            return sum(longer) / len(longer) - k
        return self.default

    def similar(self, key: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
        """The top `neighbours` other prompts by Jaccard similarity > 0, best first."""
        if self.neighbours == 0:
            return []
        tokens = frozenset(key)
        scored = []
        for other, other_tokens in self.token_sets.items():
            if other != key:
                union = len(tokens | other_tokens)
                similarity = len(tokens & other_tokens) / union if union else 0.0
                if similarity > 0:
                    scored.append((similarity, other))
        scored.sort(key=lambda item: item[0], reverse=True)
        return scored[: self.neighbours]

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        check_rows(batch)
        for row, left in enumerate(remaining.tolist()):
            key = tuple(batch.prompts[int(batch.prompt_index[row])])
            length = int(left) + len(batch.probe_ids[row])  # full completion length L
            if key not in self.history:
                self.history[key] = deque(maxlen=self.max_per_prompt)
                self.token_sets[key] = frozenset(key)
            self.history[key].append(length)
            self.history.move_to_end(key)
            self.recent.append(length)
            while len(self.history) > self.max_prompts:
                evicted, _ = self.history.popitem(last=False)
                del self.token_sets[evicted]
        if self.path and self.save_on_refit:
            self.save(self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": [list(key) for key in self.history],  # LRU order, oldest first
                "lengths": [list(lengths) for lengths in self.history.values()],
                "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.token_sets.clear()
        for prompt, lengths in zip(state["prompts"], state["lengths"]):
            key = tuple(int(t) for t in prompt)
            self.history[key] = deque((int(L) for L in lengths), maxlen=self.max_per_prompt)
            self.token_sets[key] = frozenset(key)
        while len(self.history) > self.max_prompts:
            del self.token_sets[self.history.popitem(last=False)[0]]
        self.recent = deque((int(L) for L in state["recent"]), maxlen=self.global_window)

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)
