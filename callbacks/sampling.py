"""Sampling metrics: decoding steps, prefill tokens, throughput, lengths and KV peak.

Reads `pl_module.last_rollouts.stats` (a `SamplingStats`) after every training batch and logs
`sampling/*` and `memory/kv_peak_gb` (docs/ARCHITECTURE.md section 7). Works with any sampler.
`sampling/steps_lower_bound` is max(max L, ceil(sum L / m)) over the batch with m = the
sampler's slots (its max concurrency when it has none). `sampling/slot_utilization` means the
same for every sampler: busy row-steps (each slot-trace span's steps; generated tokens for
samplers without a trace) / (steps x m); it is at most 1. `infinite` adds `sampling/parks`
(samples parked at a boundary) and the schedule of the call as `sampling/schedule_attained`
and `sampling/schedule_predicted` (1 for the one taken; both 0 for `continuous`).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from common.units import GB
from samplers.scheduling import list_schedule_makespan, steps_lower_bound



def sampling_metrics(rollouts: Any) -> dict[str, float]:
    """The per-step sampling metrics of one `Rollouts`."""
    stats = rollouts.stats
    lengths = rollouts.lengths.float()
    slots = stats.slots or stats.max_concurrency
    bound = stats.steps_lower_bound
    if bound is None:
        bound = steps_lower_bound(rollouts.lengths.tolist(), slots)
    extra = {}
    steps = stats.decoding_steps
    busy = (sum(end - start + 1 for _, _, start, end in stats.slot_trace) if stats.slot_trace
            else stats.generated_tokens)
    if stats.schedule is not None:  # infinite
        extra["sampling/parks"] = float(stats.parks)
        extra["sampling/schedule_attained"] = float(stats.schedule == "attained")
        extra["sampling/schedule_predicted"] = float(stats.schedule == "predicted")
    if stats.slots is not None and not stats.biased_to_short:  # an engine sampler on m slots
        extra.update(whole_call_metrics(rollouts.lengths.tolist(), steps, stats.slots))
    if stats.predicted_peak_bytes is not None:  # engine samplers: the `auto` planner's model
        extra["memory/predicted_peak_gb"] = stats.predicted_peak_bytes / GB
        extra["memory/predicted_sampling_gb"] = stats.predicted_sampling_bytes / GB
    return {
        **extra,
        "sampling/steps_lower_bound": float(bound),
        "sampling/steps_over_lb": stats.decoding_steps / bound if bound else 1.0,
        "sampling/slot_utilization": busy / max(1, steps * slots),
        "sampling/decoding_steps": float(stats.decoding_steps),
        "sampling/prefill_tokens": float(stats.prefill_tokens),
        "sampling/prefill_passes": float(stats.prefill_passes),
        "sampling/generated_tokens": float(stats.generated_tokens),
        "sampling/max_concurrency": float(stats.max_concurrency),
        "sampling/tokens_per_s": stats.generated_tokens / max(stats.wall_time_s, 1e-9),
        "sampling/wall_time_s": float(stats.wall_time_s),
        "sampling/avg_length": float(lengths.mean()),
        "sampling/clipped_ratio": float((~rollouts.finished).float().mean()),
        "memory/kv_peak_gb": stats.peak_kv_bytes / GB,
    }


def whole_call_metrics(lengths: list[int], steps: int, slots: int) -> dict[str, float]:
    """The whole call's decoding steps against the lower bound of all its lengths and against
    `continuous` on the same lengths (list scheduling in (prompt, sample) order on the same m
    slots): what a length-aware schedule must beat."""
    bound = steps_lower_bound(lengths, slots)
    continuous = list_schedule_makespan(lengths, slots)
    return {"sampling/total_steps": float(steps),
            "sampling/total_over_lb": steps / bound if bound else 1.0,
            "sampling/continuous_steps": float(continuous),
            "sampling/total_over_continuous": steps / continuous if continuous else 1.0}


class SamplingStatsLogger(pl.Callback):
    """Logs `sampling/*` after each training batch; keeps the latest values in `self.last`."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        rollouts = getattr(pl_module, "last_rollouts", None)
        if rollouts is None:
            return
        self.last = sampling_metrics(rollouts)
        pl_module.log_dict({k: torch.tensor(v, dtype=torch.float32)
                            for k, v in self.last.items()},
                           on_step=True, on_epoch=False, batch_size=len(rollouts))
