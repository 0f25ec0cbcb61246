"""`micro` sampler: the G samples of a prompt run in rounds of m (micro groups).

The prompt is prefilled once; its KV is kept once and shared by the round's rows
(`prompt_kv: shared`, or copied into each row with `copied`), so peak KV is P + m·L (copied
m·(P + L)) whatever G is. Each round waits for its longest member before the next starts:
decoding steps = sum over rounds of the round's longest completion. Rounds follow (prompt,
sample) order and may span two prompts; G need not be a multiple of m. `micro_group_size:
auto` picks the largest m whose predicted peak (weights + KV + logits) fits
`memory_budget_gb`.

    python train.py sampler=micro sampler.micro_group_size=8
    python train.py sampler=micro sampler.micro_group_size=auto sampler.memory_budget_gb=2
"""
from __future__ import annotations

from typing import Any

from samplers.base import GenerationSpec, Rollouts, validate_request
from samplers.engine import to_rollouts
from samplers.memory import run_slots
from samplers.scheduling import SampleQueue, fifo_order
from samplers.slots import SlotSettings


class MicroSampler:
    predictor = None
    learning = True

    def __init__(self, micro_group_size: int | str, memory_budget_gb: float | None,
                 prompt_kv: str, gather_weights: bool) -> None:
        self.settings = SlotSettings(micro_group_size, memory_budget_gb, prompt_kv,
                                     gather_weights)
        self.gather_weights = gather_weights

    def bind(self, tokenizer: Any) -> None:
        """Nothing to bind: only length predictors read text."""

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        return sample_in_rounds(self.settings, model, prompts, group_size, spec)


def sample_in_rounds(settings: SlotSettings, model: Any, prompts: list[list[int]],
                     group_size: int, spec: GenerationSpec) -> Rollouts:
    """Rounds of m samples in (prompt, sample) order, each waiting for its longest member
    (`micro`; `full` is the case m = G)."""
    validate_request(model, prompts, group_size, spec)
    queue = SampleQueue(fifo_order(len(prompts), group_size), rounds=True)
    result = run_slots(model, prompts, group_size, spec, queue, settings, rounds=True)
    return to_rollouts(result, len(prompts), group_size, spec)
