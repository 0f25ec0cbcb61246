"""Completions in TensorBoard's TEXT tab: what the policy wrote, and how it was judged.

Every `every_n_steps` training steps (and at step 0) a Markdown table per prompt of the batch
(up to `max_groups`): the prompt, then each of its G completions cut to `max_chars`, its reward,
length in tokens, whether it was truncated (hit max_new_tokens) and its advantage, under the tag
`completions/train`. After each validation, the greedy completions of the validation batch
under `completions/val`. Reads the module's `last_step` / `last_validation` (modules/grpo.py);
writes through every TensorBoard logger of the trainer (none: nothing).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger


def cell(text: str, max_chars: int) -> str:
    """One Markdown table cell: cut, newlines shown as ⏎, pipes escaped."""
    text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ") or " "


def completions_markdown(record: Any, tokenizer: Any, max_chars: int = 300,
                         max_groups: int = 4) -> str:
    """The Markdown text of one step's record (prompts, rollouts, rewards, advantages)."""
    r = record.rollouts
    texts = tokenizer.batch_decode(
        [ids[:n].tolist() for ids, n in zip(r.completion_ids, r.lengths)],
        skip_special_tokens=True)
    owners = r.prompt_index.tolist()
    sections = []
    for p in list(dict.fromkeys(owners))[:max_groups]:
        prompt = tokenizer.decode(record.prompts[p], skip_special_tokens=True)
        lines = [f"**prompt {p}:** {cell(prompt, 2 * max_chars)}", "",
                 "| # | completion | reward | length | truncated | advantage |",
                 "|---|---|---|---|---|---|"]
        for k, row in enumerate(i for i, o in enumerate(owners) if o == p):
            advantage = ("" if record.advantages is None
                         else f"{float(record.advantages[row]):+.3f}")
            lines.append(f"| {k} | {cell(texts[row], max_chars)} | "
                         f"{float(record.rewards[row]):.3f} | {int(r.lengths[row])} | "
                         f"{'yes' if not bool(r.finished[row]) else 'no'} | {advantage} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


class CompletionsLogger(pl.Callback):
    def __init__(self, every_n_steps: int = 10, max_chars: int = 300,
                 max_groups: int = 4) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or \
                every_n_steps < 1:
            raise ValueError("callbacks.completions.every_n_steps must be an int >= 1, got "
                             f"{every_n_steps!r}")
        self.every, self.max_chars, self.max_groups = every_n_steps, max_chars, max_groups
        self._step = 0

    def write(self, trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, text, global_step=step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's rollouts belong to

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is None or self._step % self.every or not trainer.is_global_zero:
            return
        self.write(trainer, "completions/train", completions_markdown(
            record, pl_module.tokenizer, self.max_chars, self.max_groups), self._step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = getattr(pl_module, "last_validation", None)
        if record is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.write(trainer, "completions/val", completions_markdown(
            record, pl_module.tokenizer, self.max_chars, self.max_groups),
            trainer.global_step)
