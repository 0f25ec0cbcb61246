"""`full` sampler: the prompt is prefilled once and all G samples of its group decode together.

The decode engine runs with G slots and rounds of G (so each round is one prompt's group):
peak KV is G rows of (longest prompt + max_new_tokens), and a group takes as many decoding
steps as its longest completion. Random numbers come from the per-sample streams of
`samplers.base.uniforms`, so completions equal those of every other sampler for the same seed.

    python train.py sampler=full
"""
from __future__ import annotations

from typing import Any

from samplers.base import GenerationSpec, Rollouts, SamplerBase, validate_request
from samplers.engine import DecodeEngine, to_rollouts
from samplers.kv import check_prompt_kv
from samplers.scheduling import SampleQueue, fifo_order


class FullSampler(SamplerBase):
    """All G rows of a prompt in one batch; prompts of a batch run one after another."""

    def __init__(self, prompt_kv: str = "shared", gather_weights: bool = True) -> None:
        self.prompt_kv = check_prompt_kv(prompt_kv)
        self.gather_weights = bool(gather_weights)

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        queue = SampleQueue(fifo_order(len(prompts), group_size), rounds=True)
        result = DecodeEngine(model, prompts, spec, slots=group_size,
                              prompt_kv=self.prompt_kv).run(queue)
        return to_rollouts(result, len(prompts), group_size, spec)
