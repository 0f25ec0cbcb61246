"""`continuous` sampler: m slots kept busy; a finished slot takes the next sample at once.

`mode: fixed` (Fixed-Slot, the default) decodes exactly the G samples of each prompt, each to
EOS or max_new_tokens; decoding steps are the makespan of list scheduling of the completion
lengths on m slots, never more than `micro`'s rounds. Groups of consecutive prompts interleave:
slots freed by one prompt's group go to the next prompt's pending samples.

`mode: dynamic` (Dynamic-Slot) keeps launching fresh samples of a prompt and keeps the first G
to finish, cancelling the rest. It takes fewer steps but is BIASED toward short completions
(the paper: average length 21 vs 186 tokens); it exists to measure that bias, never as a
default. Its Rollouts say so: `stats.biased_to_short = True`, with the number of
launched and cancelled samples, and `sample_index` is the finish rank within the group.

    python train.py sampler=continuous sampler.micro_group_size=8
    python train.py sampler=continuous sampler.mode=dynamic
"""
from __future__ import annotations

from typing import Any

from samplers.base import GenerationSpec, Rollouts, validate_request
from samplers.engine import to_rollouts
from samplers.memory import run_slots
from samplers.scheduling import DynamicQueue, SampleQueue, fifo_order
from samplers.slots import SlotSettings

MODES = ("fixed", "dynamic")


class ContinuousSampler:
    predictor = None
    learning = True

    def __init__(self, micro_group_size: int | str, mode: str, memory_budget_gb: float | None,
                 prompt_kv: str, gather_weights: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.settings = SlotSettings(micro_group_size, memory_budget_gb, prompt_kv,
                                     gather_weights)
        self.mode, self.gather_weights = mode, gather_weights

    def bind(self, tokenizer: Any) -> None:
        """Nothing to bind: only length predictors read text."""

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        dynamic = self.mode == "dynamic"
        queue = (DynamicQueue(len(prompts), group_size) if dynamic
                 else SampleQueue(fifo_order(len(prompts), group_size), rounds=False))
        result = run_slots(model, prompts, group_size, spec, queue, self.settings)
        if not dynamic:
            return to_rollouts(result, len(prompts), group_size, spec)
        result.stats.biased_to_short = True
        result.stats.launched = sum(queue.launched)
        order = finish_ranks(result.finish_order, group_size)
        return to_rollouts(result, len(prompts), group_size, spec, order)


def finish_ranks(finish_order: list[tuple[int, int]], group_size: int) -> dict:
    """The first G finished samples of each prompt -> their finish rank 0..G-1."""
    ranks: dict[tuple[int, int], int] = {}
    count: dict[int, int] = {}
    for sample in finish_order:
        rank = count.get(sample[0], 0)
        if rank < group_size:
            ranks[sample] = rank
            count[sample[0]] = rank + 1
    return ranks
