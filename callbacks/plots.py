"""Rollout pictures: a slot Gantt chart (slots x decoding steps) from `SamplingStats.slot_trace`.

Used by the `SlotGantt` callback (TensorBoard image) and by the benchmarks (PNG files).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def gantt_figure(slot_trace: list[tuple[int, Any, int, int]], title: str = "") -> Any:
    """One bar per sample: row = slot, from its start step to its end step, coloured by prompt."""
    slots = 1 + max((slot for slot, *_ in slot_trace), default=0)
    fig, ax = plt.subplots(figsize=(10, 0.35 * slots + 1.2))
    cmap = plt.get_cmap("tab10")
    for slot, (prompt, _), start, end in slot_trace:
        ax.barh(slot, end - start + 1, left=start, height=0.8, color=cmap(prompt % 10),
                edgecolor="black", linewidth=0.3)
    ax.set_xlabel("decoding step")
    ax.set_ylabel("slot")
    ax.set_yticks(range(slots))
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    return fig


class SlotGantt(pl.Callback):
    """Logs the slot Gantt chart of the latest rollouts to TensorBoard every `every_n_steps`."""

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        rollouts = getattr(pl_module, "last_rollouts", None)
        trace = rollouts.stats.slot_trace if rollouts is not None else None
        if not trace or trainer.global_step % self.every_n_steps:
            return
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_figure"):
                title = f"step {trainer.global_step}: {rollouts.stats.decoding_steps} steps"
                logger.experiment.add_figure("sampling/slot_gantt", gantt_figure(trace, title),
                                             global_step=trainer.global_step)
