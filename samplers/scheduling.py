"""Who decodes when: refill queues for the engine, and the closed forms they are checked against.

Queues (the engine's `Queue` protocol, samplers/engine.py):
- `SampleQueue(order, rounds=True)`: micro groups. A round of m samples starts only when every
  slot is idle, so each round waits for its longest member (`full` is the case m = G).
- `SampleQueue(order, rounds=False)`: continuous Fixed-Slot. A freed slot takes the next pending
  sample at the very next step.
- `DynamicQueue`: continuous Dynamic-Slot. Keeps launching fresh samples of the earliest
  unfinished prompt and stops that prompt once G of its samples have finished, cancelling the
  rest. Fewer steps, but the kept samples are biased toward short completions.

Closed forms: `rounds_steps` (micro), `list_schedule_makespan` (continuous in its refill order)
and `steps_lower_bound` = max(max L, ceil(sum L / m)) for any schedule on m slots.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from typing import Sequence

SampleId = tuple[int, int]


def fifo_order(num_prompts: int, group_size: int) -> list[SampleId]:
    """(prompt, sample) order: prompt 0's group, then prompt 1's, ..."""
    return [(i, j) for i in range(num_prompts) for j in range(group_size)]


class SampleQueue:
    """Pending samples in a fixed order; `rounds=True` admits only into an all-idle engine."""

    def __init__(self, order: Sequence[SampleId], rounds: bool = False) -> None:
        self.pending: deque[SampleId] = deque(order)
        self.rounds = rounds
        self.left = Counter(i for i, _ in order)  # samples of each prompt not yet admitted

    def admit(self, free: int, running: int) -> list[SampleId]:
        if self.rounds and running > 0:
            return []
        admitted = [self.pending.popleft() for _ in range(min(free, len(self.pending)))]
        for i, _ in admitted:
            self.left[i] -= 1
        return admitted

    def on_finished(self, sample: SampleId) -> list[SampleId]:
        return []

    def remaining(self, prompt: int) -> int:
        return self.left[prompt]


class DynamicQueue:
    """Dynamic-Slot: launch samples j = 0, 1, 2, ... until G of a prompt have finished."""

    def __init__(self, num_prompts: int, group_size: int) -> None:
        self.group_size = group_size
        self.launched = [0] * num_prompts
        self.done = [0] * num_prompts
        self.running: list[set[int]] = [set() for _ in range(num_prompts)]

    def current(self) -> int | None:
        for i, done in enumerate(self.done):
            if done < self.group_size:
                return i
        return None

    def admit(self, free: int, running: int) -> list[SampleId]:
        i = self.current()
        if i is None:
            return []
        admitted = [(i, self.launched[i] + k) for k in range(free)]
        self.launched[i] += free
        self.running[i].update(j for _, j in admitted)
        return admitted

    def on_finished(self, sample: SampleId) -> list[SampleId]:
        i, j = sample
        self.running[i].discard(j)
        self.done[i] += 1
        if self.done[i] < self.group_size:
            return []
        cancelled = [(i, k) for k in sorted(self.running[i])]
        self.running[i].clear()
        return cancelled

    def remaining(self, prompt: int) -> int:
        return 0 if self.done[prompt] >= self.group_size else 1


# ----------------------------------------------------------------------------- closed forms


def rounds_steps(lengths: Sequence[int], slots: int) -> int:
    """Micro groups: consecutive rounds of `slots` samples, each as long as its longest."""
    return sum(max(lengths[k: k + slots]) for k in range(0, len(lengths), slots))


def list_schedule_makespan(lengths: Sequence[int], slots: int) -> int:
    """Continuous refill: each sample, in order, starts on the slot that frees first."""
    free_at = [0] * min(slots, len(lengths))
    heapq.heapify(free_at)
    end = 0
    for length in lengths:
        start = heapq.heappop(free_at)
        end = max(end, start + length)
        heapq.heappush(free_at, start + length)
    return end


def steps_lower_bound(lengths: Sequence[int], slots: int) -> int:
    """No schedule on `slots` rows beats max(max L, ceil(sum L / m))."""
    if not lengths:
        return 0
    return max(max(lengths), math.ceil(sum(lengths) / slots))
