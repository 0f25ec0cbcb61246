"""PromptDataModule: tokenised chat prompts (+ gold answers) for GRPO, resumable mid-epoch.

A batch is a dict of lists, one entry per prompt (no tensors: prompts have different lengths and
the sampler wants token-id lists):

    {"prompt_ids": list[list[int]], "answer": list[str | None], "question": list[str],
     "index": list[int]}                # index = position of the record in the source

Sharding across ranks is done here, not by Lightning: build the Trainer with
`use_distributed_sampler=False`. Every rank gets the same number of batches per epoch.

Mid-epoch resume: the train loader is a `ResumableDataLoader`, which has `state_dict()` /
`load_state_dict()`. Lightning's fit loop stores the state of such loaders in the checkpoint
(`loops.fit_loop.state_dict.combined_loader`) and restores it before the first batch of the
resumed run, so the resumed run continues with exactly the batch the killed run would have seen
next. Each epoch is shuffled with (seed, trainer.current_epoch).

    dm = PromptDataModule(functools.partial(sources.arithmetic, size=64), tokenizer, batch_size=4)
    trainer.fit(module, datamodule=dm)
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

DEFAULT_INSTRUCTION = "Solve the problem. Write the final answer after '####'."
BATCH_KEYS = ("prompt_ids", "answer", "question", "index")


class ShardedSampler(Sampler[int]):
    """This rank's share of a (per-epoch shuffled) permutation of `range(num_records)`.

    Train use (`drop_remainder=True`): the permutation is cut to a multiple of
    `world_size * batch_size`, so every rank yields the same whole number of batches. Val use
    (`shuffle=False, drop_remainder=False`): every record is yielded by exactly one rank.
    Rank r takes positions r, r + world_size, ... of the permutation (like DistributedSampler).
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_records, self.batch_size = num_records, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.epoch = 0
        self.start = 0  # one-shot: positions of this rank's shard to skip on the next __iter__

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle (`ResumableDataLoader` sets it when a pass starts)."""
        self.epoch = epoch

    def shard(self) -> list[int]:
        """This rank's record indices for the current epoch, in order."""
        order = list(range(self.num_records))
        if self.shuffle:
            # string seeding is stable across Python versions and avoids (seed, epoch) collisions
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        if self.drop_remainder:
            per_rank = len(order) // (self.world_size * self.batch_size) * self.batch_size
            order = order[: per_rank * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.shard()[start:]

    def __len__(self) -> int:
        """Full epoch length (a resumed epoch yields fewer; Lightning counts the skipped ones)."""
        if self.drop_remainder:
            return self.num_records // (self.world_size * self.batch_size) * self.batch_size
        return len(range(self.rank, self.num_records, self.world_size))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ShardedSampler` that Lightning checkpoints and restores mid-epoch.

    Takes DataLoader's arguments plus `epoch_fn`; pass `sampler=ShardedSampler(...)` (any other
    sampler works but is not resumed mid-epoch).

    Lightning treats any loader with `state_dict`/`load_state_dict` as stateful
    (`lightning.fabric.utilities.types._Stateful`). The state counts batches *delivered* to the
    training loop (not indices drawn by workers), so it is exact for any `num_workers`; Lightning
    does not prefetch from loaders that have a length.

    The epoch (which seeds the shuffle) is decided when a pass starts: `epoch_fn()` if it returns
    an int (the datamodule passes `trainer.current_epoch`), else one more than the previous pass.
    Lightning's own `set_epoch` is not used: after resuming from an end-of-epoch checkpoint it
    passes `epoch_progress.processed`, which is then one ahead of `current_epoch`.
    """

    def __init__(
        self, *args: Any, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any
    ) -> None:
        # DataLoader's own signature, so Lightning can re-instantiate it (overfit_batches).
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn
        self._epoch = 0  # epoch of the current (or last) pass
        self._delivered = 0  # batches delivered in that pass, skipped ones included
        self._started = False
        self._pending: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._delivered, "num_batches": len(self)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict.get("num_batches", len(self)) != len(self):
            warnings.warn(
                f"resuming a train loader that had {state_dict['num_batches']} batches per epoch "
                f"with one that has {len(self)} (batch size, world size or data changed): "
                "the resumed epoch will not continue exactly where the checkpoint stopped"
            )
        self._pending = dict(state_dict)

    def _start_pass(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the pass that starts now; consumes a loaded state."""
        pending, self._pending = self._pending, None
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        if epoch is None and pending is not None:  # no trainer: continue the saved pass
            finished = pending["batches"] >= len(self)
            epoch = pending["epoch"] + 1 if finished else pending["epoch"]
        elif epoch is None:
            epoch = self._epoch + 1 if self._started else 0
        same_pass = pending is not None and pending["epoch"] == epoch
        # a checkpoint taken after the last batch of its epoch resumes in the next epoch: skip 0
        skip = min(pending["batches"], len(self)) if same_pass else 0
        return epoch, skip

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first `next`, once the trainer's epoch is current.
        epoch, skip = self._start_pass()
        if isinstance(self.sampler, ShardedSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.start = skip * self.batch_size
        else:
            skip = 0
        self._epoch, self._delivered, self._started = epoch, skip, True
        for batch in super().__iter__():
            self._delivered += 1
            yield batch


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    """List of per-prompt dicts -> dict of lists (keys: prompt_ids, answer, question, index)."""
    return {key: [item[key] for item in items] for key in BATCH_KEYS}


class PromptDataModule(LightningDataModule):
    """Prompts from a zero-argument `source` callable, tokenised with the policy's chat template.

    Args:
        source: returns records `{"question": str, "answer": str | None}`, optionally with
            `"system": str` (appended to the system message), see `sources.py`.
        tokenizer: a HF tokenizer; its chat template is used when it has one.
        batch_size: prompts per rank per training step.
        val_size: records held out for validation (chosen with `seed`).
        val_batch_size: prompts per rank per validation step (default: batch_size).
        instruction: appended to every question after a blank line (None: nothing).
        system_prompt: optional system message.
        max_prompt_tokens: a longer prompt raises ValueError (None: no limit).
        seed: seeds the validation split and the per-epoch shuffle.
    """

    def __init__(
        self,
        source: Callable[[], list[dict]],
        tokenizer: Any = None,
        batch_size: int = 2,
        val_size: int = 16,
        val_batch_size: int | None = None,
        instruction: str | None = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not callable(source):
            raise ValueError(
                f"source must be a zero-argument callable (Hydra `_partial_: true`), got {source!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.val_size = batch_size, val_size
        self.val_batch_size = val_batch_size or batch_size
        self.instruction, self.system_prompt = instruction, system_prompt
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self.train_items: list[dict[str, Any]] | None = None
        self.val_items: list[dict[str, Any]] | None = None

    # ---- data preparation -------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the records once, split off validation and tokenise every prompt."""
        if self.train_items is not None:
            return
        if self.tokenizer is None:
            raise ValueError(
                "tokenizer is None: pass one, e.g. instantiate(cfg.data, tokenizer=tokenizer)"
            )
        records = self.source()
        name = getattr(self.source, "func", self.source)
        name = getattr(name, "__qualname__", repr(self.source))
        if not records:
            raise ValueError(f"data source {name} returned no records")
        if self.val_size >= len(records):
            raise ValueError(
                f"val_size={self.val_size} must be smaller than the {len(records)} records "
                f"of data source {name}"
            )
        order = list(range(len(records)))
        random.Random(f"split/{self.seed}").shuffle(order)
        val_indices, train_indices = sorted(order[: self.val_size]), sorted(order[self.val_size :])
        self.val_items = [self._item(i, records[i]) for i in val_indices]
        self.train_items = [self._item(i, records[i]) for i in train_indices]

    def messages(self, question: str, system: str | None = None) -> list[dict[str, str]]:
        """Chat messages for one question: an optional system message (`system_prompt`, then the
        record's own `system` text), then the user turn."""
        content = f"{question}\n\n{self.instruction}" if self.instruction else question
        system = "\n\n".join(text for text in (self.system_prompt, system) if text)
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": content}]

    def prompt_text(self, question: str, system: str | None = None) -> str:
        """The prompt string fed to the tokenizer (chat template, or plain text without one)."""
        messages = self.messages(question, system)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return "\n\n".join(m["content"] for m in messages)

    def _item(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        question = record.get("question")
        if not isinstance(question, str):
            raise ValueError(f"record {index} has no string 'question': {record!r}")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"record {index}: 'system' must be a string or absent, got {system!r}")
        text = self.prompt_text(question, system)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"record {index}: prompt has {len(ids)} tokens, more than "
                f"max_prompt_tokens={self.max_prompt_tokens}"
            )
        answer = record.get("answer")
        return {
            "prompt_ids": list(ids),
            "answer": None if answer is None else str(answer),
            "question": question,
            "index": index,
        }

    # ---- loaders ----------------------------------------------------------------------------

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        rank, world = int(self.trainer.global_rank), int(self.trainer.world_size)
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            # Lightning would replace our sampler (losing the shuffle, the shard and the resume)
            raise ValueError(
                "PromptDataModule shards the data itself: build the Trainer with "
                "use_distributed_sampler=False"
            )
        return rank, world

    def _items(self, split: str) -> list[dict[str, Any]]:
        items = self.train_items if split == "train" else self.val_items
        if items is None:
            raise RuntimeError(f"call setup() before {split}_dataloader()")
        return items

    def train_dataloader(self) -> ResumableDataLoader:
        items = self._items("train")
        rank, world = self._rank_and_world()
        if len(items) < world * self.batch_size:
            raise ValueError(
                f"{len(items)} training records cannot fill one batch of "
                f"batch_size={self.batch_size} "
                f"on each of {world} ranks"
            )
        sampler = ShardedSampler(
            len(items), self.batch_size, rank, world, shuffle=True, seed=self.seed
        )
        return ResumableDataLoader(
            _ListDataset(items),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate_prompts,
            epoch_fn=self._trainer_epoch,
        )

    def _trainer_epoch(self) -> int | None:
        """The attached trainer's `current_epoch` (None without a real trainer)."""
        epoch = getattr(self.trainer, "current_epoch", None)
        return epoch if isinstance(epoch, int) else None

    def val_dataloader(self) -> DataLoader:
        items = self._items("val")
        rank, world = self._rank_and_world()
        sampler = ShardedSampler(len(items), 1, rank, world, shuffle=False, drop_remainder=False)
        return DataLoader(
            _ListDataset(items),
            sampler=sampler,
            batch_size=self.val_batch_size,
            collate_fn=collate_prompts,
        )
