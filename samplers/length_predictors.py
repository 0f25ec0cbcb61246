"""Length predictors of the `infinite` sampler: remaining tokens of a sample after its probe.

The sampler decodes the first k = probe_tokens tokens of every sample, asks the predictor for
the REMAINING length (full length L incl. EOS minus k) of the samples still running, schedules
on the predictions, and after sampling hands the true remaining lengths to `observe()`, so the
predictor follows the policy's drifting length distribution (DESIGN.md section 6).

    oracle   true lengths from a pre-pass with the same seeds (ablations, upper bound)
    history  running length statistics of the same prompt, similar prompts, or all prompts
    minilm   frozen MiniLM embedding of decoded prompt + probe -> MLP head (text_encoder.py)
    hidden   the policy's own last hidden state at the probe's last token -> MLP head

Each is built by Hydra from configs/predictor/<name>.yaml (`python train.py sampler=infinite
predictor=minilm`); the learned heads live in samplers/predictor_head.py and can also be trained
offline on saved rollouts with `python train_predictor.py predictor=hidden rollouts=<file>`.
"""
from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from samplers.predictor_head import HeadLearner, MLPHead, check_number, initial_output
from samplers.text_encoder import EncoderHead, load_encoder


@dataclass
class ProbeBatch:
    prompts: list[list[int]]  # token ids of the B prompts of this sample() call
    prompt_index: torch.Tensor  # long [n]: prompt of each sample to predict
    sample_index: torch.Tensor  # long [n]: j within its group
    probe_ids: list[list[int]]  # [n] the first k completion tokens of each sample (k may be 0)
    hidden: torch.Tensor | None = None  # float [n, H]: policy's last hidden state at the last
    # probe token (the prompt's last token when k = 0); set only when predictor.needs_hidden
    true_remaining: torch.Tensor | None = None  # long [n]: set only when predictor.needs_oracle

    def __len__(self) -> int:
        return int(self.prompt_index.numel())


class LengthPredictor(Protocol):
    name: str
    needs_hidden: bool
    needs_oracle: bool

    def bind(self, tokenizer: Any) -> None: ...
    def predict(self, batch: ProbeBatch) -> torch.Tensor: ...  # float [n] >= 0, CPU
    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None: ...
    def save(self, path: str | os.PathLike) -> None: ...
    def load(self, path: str | os.PathLike) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- shared functions


def save_predictor(predictor: LengthPredictor, path: str | os.PathLike) -> None:
    """torch.save {name, state} atomically (tensors, lists, dicts, numbers, strings only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"name": predictor.name, "state": predictor.state_dict()}, tmp)
    os.replace(tmp, path)


def load_predictor(predictor: LengthPredictor, path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise ValueError(f"predictor path={str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("name") != predictor.name:
        raise ValueError(f"predictor path={str(path)!r} holds a {payload.get('name')!r} "
                         f"predictor, not {predictor.name!r}")
    predictor.load_state_dict(payload["state"])


def load_if_exists(predictor: LengthPredictor, path: str | os.PathLike | None) -> None:
    if path and Path(path).is_file():
        load_predictor(predictor, path)


def check_rows(batch: ProbeBatch) -> int:
    n = len(batch)
    if batch.sample_index.numel() != n or len(batch.probe_ids) != n:
        raise ValueError(f"ProbeBatch fields disagree: {n} prompt_index, "
                         f"{batch.sample_index.numel()} sample_index, {len(batch.probe_ids)} "
                         f"probe_ids")
    return n


# ----------------------------------------------------------------------------- oracle


class OraclePredictor:
    """Returns `batch.true_remaining` (a pre-pass with the same seeds): ablations only."""

    name, needs_hidden, needs_oracle = "oracle", False, True

    def bind(self, tokenizer: Any) -> None:
        pass

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0)
        if batch.true_remaining is None:
            raise ValueError("OraclePredictor needs batch.true_remaining (the sampler sets it "
                             "from a same-seed pre-pass when predictor.needs_oracle)")
        return batch.true_remaining.detach().float().cpu().clamp_min(0)  # [n]

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)


# ----------------------------------------------------------------------------- history


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


# ----------------------------------------------------------------------------- learned heads


class MiniLMPredictor:
    """Decoded prompt + probe (policy tokenizer from bind()) -> MiniLM, the last
    `max_input_tokens` tokens, mean-pooled -> MLP head on log1p(remaining).

    The encoder is frozen by default and its embeddings cached (text_encoder.py);
    `finetune_encoder: true` trains a copy of it with the head (slow, no cache). `head` holds
    the HeadLearner options (refit_every, refit_steps, buffer_size, batch_size, lr,
    weight_decay, log_target, default, seed)."""

    name, needs_hidden, needs_oracle = "minilm", False, False

    def __init__(self, path: str | None = None, encoder_path: str | None = None,
                 max_input_tokens: int = 128, finetune_encoder: bool = False,
                 device: str = "cpu", head_width: int = 128, save_on_refit: bool = False,
                 **head: Any) -> None:
        self.max_input_tokens = check_number("max_input_tokens", max_input_tokens, 8,
                                             integer=True)
        check_number("head_width", head_width, 1, integer=True)
        self.finetune_encoder, self.path, self.save_on_refit = finetune_encoder, path, save_on_refit
        self.encoder = load_encoder(encoder_path, device)
        init = initial_output(head.get("log_target", True), head.get("default", 64.0))
        build = ((lambda _: EncoderHead(self.encoder, head_width, init)) if finetune_encoder
                 else (lambda size: MLPHead(size, head_width, init)))
        self.learner = HeadLearner(build, device=device, **head)
        self.tokenizer: Any = None
        load_if_exists(self, path)

    def bind(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def texts(self, batch: ProbeBatch) -> list[str]:
        """Decoded prompt + probe of every row (special tokens dropped)."""
        if self.tokenizer is None:
            raise ValueError("MiniLMPredictor has no policy tokenizer to decode prompt and probe "
                             "ids: call predictor.bind(policy.tokenizer) first")
        decode = self.tokenizer.decode
        prompts = {p: decode(batch.prompts[p], skip_special_tokens=True)
                   for p in set(batch.prompt_index.tolist())}
        return [prompts[int(p)] + decode(probe, skip_special_tokens=True)
                for p, probe in zip(batch.prompt_index.tolist(), batch.probe_ids)]

    def features(self, batch: ProbeBatch) -> torch.Tensor:
        """Embeddings float [n, 384], or MiniLM token ids long [n, T] when fine-tuning."""
        texts = self.texts(batch)
        if self.finetune_encoder:
            return self.encoder.token_ids(texts, self.max_input_tokens)
        return self.encoder.embed(texts, self.max_input_tokens)

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0)
        return self.learner.predict(self.features(batch))

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        features = self.features(batch) if check_rows(batch) else torch.zeros(0, 0)
        if self.learner.observe(features, remaining) and self.path and self.save_on_refit:
            self.save(self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"finetune_encoder": self.finetune_encoder, "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["finetune_encoder"] != self.finetune_encoder:
            raise ValueError(f"saved predictor has finetune_encoder={state['finetune_encoder']}"
                             f", this one {self.finetune_encoder}")
        self.learner.load_state_dict(state["learner"])

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)


class HiddenPredictor:
    """The policy's last hidden state at the probe's last token [n, H] -> standardized (running
    mean/std) -> MLP head on log1p(remaining). The head is built on the first call (H is not
    known before). `head` holds the HeadLearner options, as for MiniLMPredictor."""

    name, needs_hidden, needs_oracle = "hidden", True, False

    def __init__(self, path: str | None = None, head_width: int = 128,
                 save_on_refit: bool = False, **head: Any) -> None:
        check_number("head_width", head_width, 1, integer=True)
        init = initial_output(head.get("log_target", True), head.get("default", 64.0))
        self.learner = HeadLearner(lambda size: MLPHead(size, head_width, init), **head)
        self.path, self.save_on_refit = path, save_on_refit
        load_if_exists(self, path)

    def bind(self, tokenizer: Any) -> None:
        pass

    def features(self, batch: ProbeBatch) -> torch.Tensor:
        n = check_rows(batch)
        if batch.hidden is None:
            raise ValueError("HiddenPredictor needs batch.hidden, the policy's hidden state at "
                             "the last probe token (the sampler sets it when needs_hidden)")
        if batch.hidden.dim() != 2 or batch.hidden.shape[0] != n:
            raise ValueError(f"batch.hidden must be [n={n}, H], got {tuple(batch.hidden.shape)}")
        return batch.hidden.detach().float().cpu()  # [n, H]

    def predict(self, batch: ProbeBatch) -> torch.Tensor:
        if check_rows(batch) == 0:
            return torch.zeros(0)
        return self.learner.predict(self.features(batch))

    def observe(self, batch: ProbeBatch, remaining: torch.Tensor) -> None:
        features = self.features(batch) if check_rows(batch) else torch.zeros(0, 0)
        if self.learner.observe(features, remaining) and self.path and self.save_on_refit:
            self.save(self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])

    def save(self, path: str | os.PathLike) -> None:
        save_predictor(self, path)

    def load(self, path: str | os.PathLike) -> None:
        load_predictor(self, path)
