"""`full` sampler: the prompt is prefilled once and all G samples of its group decode together.

The decode engine runs with G slots and rounds of G (so each round is one prompt's group):
peak KV is G rows of max_new_tokens plus the prompt once (`prompt_kv: shared`), or G rows of
(longest prompt + max_new_tokens) (`copied`), and a group takes as many decoding steps as its
longest completion. Random numbers come from the per-sample streams of
`samplers.base.uniforms`, so completions equal those of every other sampler for the same seed.

    python train.py sampler=full
"""
from __future__ import annotations

from typing import Any

from samplers.base import GenerationSpec, Rollouts
from samplers.micro import sample_in_rounds
from samplers.slots import SlotSettings


class FullSampler:
    """All G rows of a prompt in one batch; prompts of a batch run one after another."""

    predictor = None
    learning = True

    def __init__(self, prompt_kv: str, gather_weights: bool) -> None:
        self.settings = SlotSettings(None, None, prompt_kv, gather_weights)
        self.gather_weights = gather_weights

    def bind(self, tokenizer: Any) -> None:
        """Nothing to bind: only length predictors read text."""

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        return sample_in_rounds(self.settings, model, prompts, group_size, spec)
