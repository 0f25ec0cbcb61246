"""Saved rollouts for offline length-predictor training, and the `predictor` datamodule.

File format: one torch.save of plain tensors and lists (readable with weights_only=True):

    {"format": "rollouts-v1",
     "prompts": list[list[int]],       # the B prompts' token ids
     "prompt_index": long [N], "sample_index": long [N],   # rows ordered (prompt, sample)
     "completion_ids": long [N, T], "lengths": long [N],   # lengths include the EOS
     "finished": bool [N],
     "hidden": {k: float [N, H]}}      # optional: policy hidden state at the last probe token

Record one after sampling with `save_rollouts(path, prompts, rollouts)`; train on it with
`python train_predictor.py predictor=hidden rollouts=<path> probe_tokens=16`. Hidden states
missing from the file are recomputed with `hidden_states_at` from the policy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from samplers.base import Rollouts
from samplers.prediction import ProbeBatch
from common.checks import check_number

FORMAT = "rollouts-v1"
KEYS = ("prompts", "prompt_index", "sample_index", "completion_ids", "lengths", "finished")
HIDDEN_CHUNK = 32  # rows per forward when recomputing hidden states


def save_rollouts(path: str | os.PathLike, prompts: list[list[int]], rollouts: Rollouts,
                  hidden: dict[int, torch.Tensor] | None = None) -> None:
    """Save one sample() call's prompts and rollouts (+ optional hidden states per k)."""
    n = len(rollouts)
    for k, states in (hidden or {}).items():
        if states.dim() != 2 or states.shape[0] != n:
            raise ValueError(f"hidden[{k}] must be [N={n}, H], got {tuple(states.shape)}")
    record = {"format": FORMAT, "prompts": [[int(t) for t in p] for p in prompts],
              "prompt_index": rollouts.prompt_index.cpu(),
              "sample_index": rollouts.sample_index.cpu(),
              "completion_ids": rollouts.completion_ids.cpu(),
              "lengths": rollouts.lengths.cpu(), "finished": rollouts.finished.cpu(),
              "hidden": {int(k): v.detach().float().cpu() for k, v in (hidden or {}).items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)


def load_rollouts(path: str | os.PathLike | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        raise ValueError(f"rollouts={str(path)!r} is not a file: record one with "
                         f"predictors.rollouts.save_rollouts")
    record = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in KEYS if key not in record]
    if record.get("format") != FORMAT or missing:
        raise ValueError(f"rollouts={str(path)!r} is not a {FORMAT} file (missing {missing})")
    record.setdefault("hidden", {})
    return record


@torch.inference_mode()
def final_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of equal-length rows ids [R, T] -> float [R, T, H] on CPU."""
    device = next(model.parameters()).device
    positions = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)  # [R, T]
    out = model(input_ids=ids.to(device), position_ids=positions, output_hidden_states=True,
                use_cache=False, logits_to_keep=1)
    return out.hidden_states[-1].float().cpu()


def hidden_states_at(model: Any, prompt_ids: list[int], completion_ids: list[int],
                     ks: Sequence[int]) -> torch.Tensor:
    """The policy's last hidden state after k completion tokens, for each k: float [len(ks), H].

    One forward of prompt + completion[:max(ks)]; the state of k sits at position
    len(prompt) - 1 + k (the prompt's last token for k = 0)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if not ks or min(ks) < 0 or max(ks) > len(completion_ids):
        raise ValueError(f"ks must be in [0, {len(completion_ids)}] (the completion's length), "
                         f"got {list(ks)}")
    ids = torch.tensor([list(prompt_ids) + list(completion_ids[: max(ks)])])  # [1, T]
    states = final_hidden(model, ids)[0]  # [T, H]
    return states[[len(prompt_ids) - 1 + k for k in ks]]


def probe_hidden(model: Any, prompts: list[list[int]], prompt_index: torch.Tensor,
                 probe_ids: list[list[int]]) -> torch.Tensor:
    """hidden_states_at for many rows with the same k, batched per prompt: float [n, H]."""
    rows_of: dict[int, list[int]] = {}
    for row, p in enumerate(prompt_index.tolist()):
        rows_of.setdefault(p, []).append(row)
    states: dict[int, torch.Tensor] = {}
    for p, rows in rows_of.items():
        for start in range(0, len(rows), HIDDEN_CHUNK):
            chunk = rows[start:start + HIDDEN_CHUNK]
            ids = torch.tensor([prompts[p] + probe_ids[r] for r in chunk])  # [c, P + k]
            for r, state in zip(chunk, final_hidden(model, ids)[:, -1]):
                states[r] = state
    return torch.stack([states[r] for r in range(len(probe_ids))])  # [n, H]


def examples(records: dict[str, Any], k: int, prompts: Sequence[int] | None = None,
             model: Any = None, needs_hidden: bool = False) -> tuple[ProbeBatch, torch.Tensor]:
    """(ProbeBatch, remaining long [n]) for probe length k: the samples with L > k (those the
    sampler asks about: still running after k tokens; all of them when k = 0), of the given
    prompt indices (all by default). `true_remaining` is always set; `hidden` when
    needs_hidden (from the file, else recomputed with `model`)."""
    check_number("probe_tokens", k, 0, integer=True)
    lengths = records["lengths"]  # [N]
    keep = lengths > k  # [N]
    if prompts is not None:
        keep &= torch.isin(records["prompt_index"], torch.as_tensor(list(prompts),
                                                                      dtype=torch.long))
    rows = keep.nonzero().squeeze(-1)  # [n]
    remaining = lengths[rows] - k  # [n]
    batch = ProbeBatch(prompts=records["prompts"], prompt_index=records["prompt_index"][rows],
                       sample_index=records["sample_index"][rows],
                       probe_ids=records["completion_ids"][rows, :k].tolist(),
                       true_remaining=remaining.clone())
    if needs_hidden:
        if k in records["hidden"]:
            batch.hidden = records["hidden"][k][rows]
        elif model is not None:
            batch.hidden = probe_hidden(model, records["prompts"], batch.prompt_index,
                                        batch.probe_ids) if len(rows) else torch.zeros(0, 0)
        else:
            raise ValueError(f"the rollouts file has no hidden states for probe_tokens={k} "
                             f"(has {sorted(records['hidden'])}); pass the policy model")
    return batch, remaining


def split_prompts(num_prompts: int, val_fraction: float, seed: int) -> tuple[list[int],
                                                                             list[int]]:
    """Held-out prompts: a seeded permutation, the first round(val_fraction * B) go to val
    (at least one when val_fraction > 0 and B > 1)."""
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(val_fraction * num_prompts)
    if val_fraction > 0 and num_prompts > 1:
        n_val = min(max(n_val, 1), num_prompts - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


class PredictorDataModule(pl.LightningDataModule):
    """(features, remaining) tensors of a saved-rollouts file, split by prompt.

    `featurize(ProbeBatch) -> Tensor [n, ...]` is the predictor's feature function (MiniLM
    embeddings, or hidden states); features are computed once in setup()."""

    def __init__(self, rollouts: str, probe_tokens: int,
                 featurize: Callable[[ProbeBatch], torch.Tensor], model: Any = None,
                 needs_hidden: bool = False, batch_size: int = 64, val_fraction: float = 0.2,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.probe_tokens = check_number("probe_tokens", probe_tokens, 0, integer=True)
        self.batch_size = check_number("batch_size", batch_size, 1, integer=True)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if not Path(rollouts or "").is_file():
            raise ValueError(f"rollouts={rollouts!r} is not a file: record one with "
                             f"predictors.rollouts.save_rollouts")
        self.rollouts, self.featurize, self.model = rollouts, featurize, model
        self.needs_hidden, self.val_fraction = needs_hidden, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = load_rollouts(self.rollouts)
        train, val = split_prompts(len(records["prompts"]), self.val_fraction, self.seed)
        self.train_set = self.dataset(records, train)
        self.val_set = self.dataset(records, val)
        if len(self.train_set) == 0:
            raise ValueError(f"rollouts={self.rollouts!r} has no training sample longer than "
                             f"probe_tokens + 1 = {self.probe_tokens + 1} tokens")

    def dataset(self, records: dict[str, Any], prompts: list[int]) -> TensorDataset:
        batch, remaining = examples(records, self.probe_tokens, prompts, self.model,
                                    self.needs_hidden)
        features = self.featurize(batch).clone() if len(batch) else torch.zeros(0, 1)
        return TensorDataset(features, remaining)  # ([n, ...], long [n])

    @property
    def train_features(self) -> torch.Tensor:
        return self.train_set.tensors[0]  # [n, ...]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=generator, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size,
                          num_workers=self.num_workers)
