"""GRPOModule: one GRPO step per batch of B prompts x G completions (research code only).

training_step = sample (any Sampler) -> rewards -> group advantages -> micro-batched update.
The update runs `update_micro_batch` completions per forward/backward with gradient
accumulation and a global normaliser, so its peak memory does not grow with G. Memory, decoding
steps and predictor error are logged by callbacks, which the module notifies through the
`on_phase_start` / `on_phase_end` hooks ("sampling", "update").

    python train.py model.group_size=16 model.beta=0.04 model.loss_type=dr_grpo
"""
from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch

from modules.checkpoints import check_compatible
from modules.parallel import FSDP2Strategy, gradient_sync, is_sharded, sampling_weights, \
    shard_model
from modules.grpo_loss import (ADVANTAGE_SCALES, LOSS_MODES, aggregate_loss, batch_reward_std,
                               clipped_surrogate, entropy_from_logits, group_advantages, k3_kl,
                               token_log_probs)
from modules.policy import Policy
from modules.rewards import combine_rewards
from samplers.base import GenerationSpec, Rollouts, Sampler, check_sampling
from common.checks import check_number, check_positive


GRAD_SYNC = ("step", "micro_batch")  # gradient communication once per optimizer step or
# after every update micro-batch (FSDP: keeps gradients sharded, at one collective each)


class GRPOModule(pl.LightningModule):
    def __init__(
        self,
        policy: Policy,
        sampler: Sampler,
        rewards: dict[str, dict[str, Any]],
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        max_grad_norm: float,
        beta: float,
        epsilon_low: float,
        epsilon_high: float,
        num_iterations: int,
        loss_type: str,
        advantage_scale: str,
        advantage_eps: float,
        mask_truncated_completions: bool,
        update_micro_batch: int,
        grad_sync: str,
        accuracy_reward: str | None,
        val_max_new_tokens: int | None,
        seed: int,
    ) -> None:
        super().__init__()
        check_positive("group_size", group_size)
        check_positive("max_new_tokens", max_new_tokens)
        check_positive("num_iterations", num_iterations)
        check_positive("update_micro_batch", update_micro_batch)
        if grad_sync not in GRAD_SYNC:
            raise ValueError(f"grad_sync must be one of {GRAD_SYNC}, got {grad_sync!r}")
        if loss_type not in LOSS_MODES:
            raise ValueError(f"loss_type must be one of {LOSS_MODES}, got {loss_type!r}")
        if advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(f"advantage_scale must be one of {ADVANTAGE_SCALES}, "
                             f"got {advantage_scale!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (0 = no reference model), got {beta}")
        check_sampling(temperature, top_p, top_k)
        check_number("lr", lr, 0.0, strict=True)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("warmup_steps", warmup_steps, 0, integer=True)
        check_number("max_grad_norm", max_grad_norm, 0.0, strict=True)
        check_number("advantage_eps", advantage_eps, 0.0)
        check_number("epsilon_high", epsilon_high, 0.0)
        if check_number("epsilon_low", epsilon_low, 0.0) >= 1.0:
            raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low!r}")
        if val_max_new_tokens is not None:
            check_positive("val_max_new_tokens", val_max_new_tokens)
        self.save_hyperparameters(ignore=["policy", "sampler", "rewards"])
        self.automatic_optimization = False
        self.policy = policy.model.train()  # from_pretrained returns eval mode
        self.tokenizer = policy.tokenizer
        self.eos_token_ids = policy.eos_token_ids
        self.sampler = sampler
        self.steering = policy.steering  # value neurons steered while sampling (and training)
        sampler.bind(self.tokenizer)  # text length predictors decode prompts and probes
        self.reward_fns = parse_rewards(rewards)
        # The frozen reference lives outside the module's state_dict (it never changes).
        self._ref: list[torch.nn.Module] = []
        if beta > 0 and not hasattr(self.policy, "disable_adapter"):
            self._ref.append(copy.deepcopy(self.policy).requires_grad_(False).eval())
        self.last_rollouts: Rollouts | None = None
        self.last_step: StepRecord | None = None  # the latest training step (completions log)
        self.last_validation: StepRecord | None = None
        self.reward_log: list[float] = []  # this process's mean reward per step of this run

    # ------------------------------------------------------------------ lightning plumbing

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (FSDP2Strategy): shard the policy, and the frozen reference the
        same way (its forward gathers layer by layer, once per update micro-batch)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        for model in [self.policy, *self._ref]:
            shard_model(model, mesh, strategy.reshard_after_forward)

    def on_fit_start(self) -> None:
        # the reference follows the policy's device and dtype (a `*-true` precision converted
        # the policy, not the reference, which is outside the module's state)
        dtype = next(self.policy.parameters()).dtype
        for ref in self._ref:
            ref.to(device=self.device, dtype=dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain tensors, lists and ints only, so `torch.load(weights_only=True)` accepts it.
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        if self.sampler.predictor is not None:  # an online-refitted predictor resumes as it was
            checkpoint["length_predictor"] = self.sampler.predictor.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP2Strategy checked and loaded it already
            check_compatible(checkpoint, self,
                             sum(1 for p in self.policy.parameters() if p.requires_grad))
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            if states["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        if self.sampler.predictor is not None and "length_predictor" in checkpoint:
            self.sampler.predictor.load_state_dict(checkpoint["length_predictor"])

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip the gradient norm here, inside `optimizer.step()`: under `16-mixed` Lightning
        unscales the gradients just before this hook, so the clip sees true gradients (clipped
        before the step, they would still carry the loss scale)."""
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                            gradient_clip_algorithm="norm")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Tell callbacks that implement on_phase_start/on_phase_end (memory, timing)."""
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        hooked = [c for c in callbacks if hasattr(c, "on_phase_start")]
        for callback in hooked:
            callback.on_phase_start(self.trainer, self, name)
        yield
        for callback in hooked:
            callback.on_phase_end(self.trainer, self, name)

    # ------------------------------------------------------------------ the GRPO step

    def spec(self, temperature: float | None = None, max_new_tokens: int | None = None,
             salt: int = 0) -> GenerationSpec:
        """Generation settings; the seed moves with the step and rank (resumes reproduce it)."""
        hp = self.hparams
        step_seed = (hp.seed * 1_000_003 + self.global_step * 7919 + salt) * 64 + self.global_rank
        return GenerationSpec(
            max_new_tokens=max_new_tokens or hp.max_new_tokens,
            temperature=hp.temperature if temperature is None else temperature,
            top_p=hp.top_p, top_k=hp.top_k, eos_token_ids=self.eos_token_ids, seed=step_seed)

    def generate(self, prompts: list[list[int]], group_size: int,
                 spec: GenerationSpec) -> Rollouts:
        was_training = self.policy.training
        self.policy.eval()
        steering = self.steering.context(self.policy) if self.steering else nullcontext()
        gather = self.sampler.gather_weights
        try:  # under FSDP: weights gathered once for the phase (or in lockstep, layer by layer)
            with sampling_weights(self.policy, gather), steering:
                return self.sampler.sample(self.policy, prompts, group_size, spec)
        finally:
            self.policy.train(was_training)

    def score(self, batch: dict[str, list], rollouts: Rollouts) -> tuple[torch.Tensor, dict]:
        """Decode completions and run the reward functions on per-completion batch fields."""
        texts = self.tokenizer.batch_decode(
            [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids, rollouts.lengths)],
            skip_special_tokens=True)
        owners = rollouts.prompt_index.tolist()
        expanded = {k: [v[p] for p in owners] for k, v in batch.items() if k != "prompt_ids"}
        return combine_rewards(self.reward_fns, texts, expanded)

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        hp = self.hparams
        clock = {"start": time.perf_counter()}
        with self.phase("sampling"):
            rollouts = self.generate(batch["prompt_ids"], hp.group_size, self.spec())
        clock["sampled"] = time.perf_counter()
        self.last_rollouts = rollouts
        rewards, per_fn = self.score(batch, rollouts)
        batch_std = None
        if hp.advantage_scale == "batch":  # the std of the whole batch, over every rank
            sums = self.all_ranks_sum(torch.stack([
                torch.tensor(float(len(rewards)), dtype=torch.float64),
                rewards.double().sum(), rewards.double().square().sum()]))
            batch_std = batch_reward_std(*sums).float()
        advantages = group_advantages(rewards, rollouts.prompt_index, hp.advantage_scale,
                                      hp.advantage_eps, batch_std=batch_std)
        clock["scored"] = time.perf_counter()
        with self.phase("update"):
            update = self.update(batch["prompt_ids"], rollouts, advantages)
        clock["updated"] = time.perf_counter()
        self.last_step = StepRecord(batch["prompt_ids"], rollouts, rewards, advantages)
        self.log_step(rollouts, rewards, per_fn, update, {
            "time/sampling_s": clock["sampled"] - clock["start"],
            "time/reward_s": clock["scored"] - clock["sampled"],
            "time/update_s": clock["updated"] - clock["scored"],
            "time/step_s": time.perf_counter() - clock["start"]})

    def update(self, prompts: list[list[int]], rollouts: Rollouts,
               advantages: torch.Tensor) -> dict[str, float]:
        """num_iterations optimizer steps over the rollouts, each in micro-batches."""
        hp = self.hparams
        mask = rollouts.completion_mask.clone()  # [N, T]
        if hp.mask_truncated_completions:
            mask &= rollouts.finished[:, None]
        chunks = torch.arange(len(rollouts)).split(hp.update_micro_batch)
        # Normalisers of the whole batch over every rank. DDP averages the ranks' gradients,
        # so each rank's loss is scaled by the world size: the averaged gradient then equals
        # the gradient of one process on the whole batch.
        sequences, tokens = self.all_ranks_sum(
            torch.tensor([len(rollouts), int(mask.sum())], dtype=torch.float64)).long().tolist()
        world = self.trainer.world_size if self._trainer is not None else 1
        totals = dict(num_sequences=sequences, num_tokens=tokens,
                      max_new_tokens=hp.max_new_tokens)
        frozen = lambda model: [  # noqa: E731
            self.log_probs(model, prompts, rollouts, rows, with_entropy=False)[0]
            for rows in chunks]
        with torch.no_grad():
            old = frozen(self.policy) if hp.num_iterations > 1 else None
            ref = frozen(self.reference()) if hp.beta > 0 else None
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        sums = dict(loss=0.0, kl=0.0, entropy=0.0, clipped=0.0)
        for _ in range(hp.num_iterations):
            optimizer.zero_grad()
            for c, rows in enumerate(chunks):
                # one gradient all-reduce (DDP) or reduce-scatter (FSDP) per optimizer step:
                # the micro-batches before the last accumulate on this rank
                last = c == len(chunks) - 1 or hp.grad_sync == "micro_batch"
                sync = gradient_sync(self.trainer.model if self._trainer is not None else None,
                                     self.policy, last)
                rows_mask = mask[rows, : rollouts.lengths[rows].max()].to(self.device)
                logp, entropy = self.log_probs(self.policy, prompts, rollouts, rows)
                per_token, clipped = clipped_surrogate(
                    logp, logp.detach() if old is None else old[c],
                    advantages[rows].to(self.device), hp.epsilon_low, hp.epsilon_high)
                if ref is not None:
                    kl = k3_kl(logp, ref[c])
                    per_token = per_token + hp.beta * kl
                    sums["kl"] += float((kl.detach() * rows_mask).sum())
                loss = aggregate_loss(per_token, rows_mask, hp.loss_type, **totals)
                with sync:
                    self.manual_backward(loss * world if world > 1 else loss)
                sums["loss"] += float(loss.detach())
                sums["entropy"] += float((entropy * rows_mask).sum())
                sums["clipped"] += float((clipped & rows_mask).sum())
            optimizer.step()  # clips in on_before_optimizer_step (after AMP's unscale)
            schedule.step()
        # Whole-batch values (each rank holds its share): summed over ranks, then normalised.
        names = list(sums)
        totals_all = self.all_ranks_sum(torch.tensor([sums[k] for k in names],
                                                     dtype=torch.float64)).tolist()
        per_token = max(1, tokens) * hp.num_iterations
        return {k: v / (hp.num_iterations if k == "loss" else per_token)
                for k, v in zip(names, totals_all)}

    def all_ranks_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the data-parallel ranks (itself with one process), on the CPU."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        reduced = self.trainer.strategy.reduce(values.to(self.device), reduce_op="sum")
        return reduced.cpu()

    def reference(self) -> torch.nn.Module | Any:
        if self._ref:
            return self._ref[0]
        return _AdapterDisabled(self.policy)

    def log_probs(self, model: Any, prompts: list[list[int]], rollouts: Rollouts,
                  rows: torch.Tensor,
                  with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies of completions `rows`: two [b, T] tensors, under
        the sampling distribution softmax(logits / temperature), for the ratio, KL and entropy.

        Prompts are left-padded to a common width so that every completion starts at the same
        column; positions restart at 0 after the padding of each row.
        """
        lengths = rollouts.lengths[rows]
        width = int(lengths.max())
        completions = rollouts.completion_ids[rows, :width]  # [b, T]
        owners = rollouts.prompt_index[rows].tolist()
        prompt_width = max(len(prompts[p]) for p in owners)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(owners), prompt_width + width), pad, dtype=torch.long)  # [b, S]
        attention = torch.zeros_like(ids)
        for r, p in enumerate(owners):
            start = prompt_width - len(prompts[p])
            ids[r, start:prompt_width] = torch.tensor(prompts[p])
            attention[r, start: prompt_width + int(lengths[r])] = 1
        ids[:, prompt_width:] = completions
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        ids, attention, positions = (x.to(self.device) for x in (ids, attention, positions))
        with self.steered_scoring(model, prompt_width, lengths):
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                           use_cache=False, logits_to_keep=width + 1).logits[:, :-1]  # [b, T, V]
        # scored under the distribution that sampled (as TRL): logits / temperature, divided
        # after the float32 upcast (a bf16 policy's logits are never divided in bf16)
        temperature = self.hparams.temperature if self.hparams.temperature > 0 else 1.0
        targets = completions.to(self.device)
        logp = token_log_probs(logits, targets, temperature=temperature)  # float32 [b, T]
        if not with_entropy:  # old/reference passes only need log-probs
            return logp, None
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature=temperature)
        return logp, entropy

    @contextmanager
    def steered_scoring(self, model: Any, prompt_width: int,
                        lengths: torch.Tensor) -> Iterator[Any]:
        """With `policy.steer.train`, steer the scoring forward at exactly the positions that
        predict completion tokens (the ones steered while sampling), for the policy and the
        reference alike; otherwise nothing."""
        if not (self.steering and self.steering.train):
            yield None
            return
        inner = model._model[0] if isinstance(model, _AdapterDisabled) else model
        sites = torch.zeros(len(lengths), prompt_width + int(lengths.max()), dtype=torch.bool)
        for r, n in enumerate(lengths.tolist()):
            sites[r, prompt_width - 1: prompt_width - 1 + n] = True  # predicts token 0..n-1
        with self.steering.context(inner) as steering:
            steering.positions = sites.to(self.device)
            yield steering

    # ------------------------------------------------------------------ logging

    def log_step(self, rollouts: Rollouts, rewards: torch.Tensor, per_fn: dict[str, torch.Tensor],
                 update: dict[str, float], seconds: dict[str, float] | None = None) -> None:
        group = rollouts.prompt_index
        num_groups = int(group.max()) + 1
        self.reward_log.append(float(rewards.mean()))
        rewards = rewards.float()  # [N]; every statistic below is float32 (`*-true` makes
        # a half dtype the default, so each created tensor names its dtype)
        maxima = torch.zeros(num_groups, dtype=torch.float32).scatter_reduce(
            0, group, rewards, "amax", include_self=False)
        minima = torch.zeros(num_groups, dtype=torch.float32).scatter_reduce(
            0, group, rewards, "amin", include_self=False)
        metrics = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std() if len(rewards) > 1 else float32(0.0),
            "train/frac_reward_zero_std": (maxima == minima).float().mean(),
            "train/completion_len_mean": rollouts.lengths.float().mean(),
            "train/truncated_ratio": (~rollouts.finished).float().mean(),
            "train/loss": float32(update["loss"]),
            "train/entropy": float32(update["entropy"]),
            "train/clip_frac": float32(update["clipped"]),
            "train/lr": float32(self.optimizers().param_groups[0]["lr"]),
        }
        if self.hparams.beta > 0:
            metrics["train/kl"] = float32(update["kl"])
        for name, value in (seconds or {}).items():  # this rank's wall time per phase
            metrics[name] = float32(value)
        for name, values in per_fn.items():
            metrics[f"train/rewards/{name}"] = values.mean()
        accuracy = self.hparams.accuracy_reward
        if accuracy in per_fn:
            metrics["train/accuracy"] = (per_fn[accuracy] >= 1.0).float().mean()
        self.log_dict({k: v.float() for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, sync_dist=True, batch_size=num_groups)
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, logger=False,
                 batch_size=num_groups)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        """Greedy accuracy: one completion per validation prompt."""
        hp = self.hparams
        spec = self.spec(temperature=0.0, max_new_tokens=hp.val_max_new_tokens)
        learning, self.sampler.learning = self.sampler.learning, False
        try:  # greedy G = 1 lengths are another distribution: they must not refit a predictor
            rollouts = self.generate(batch["prompt_ids"], 1, spec)
        finally:
            self.sampler.learning = learning
        rewards, per_fn = self.score(batch, rollouts)
        self.last_validation = StepRecord(batch["prompt_ids"], rollouts, rewards, None)
        size = len(batch["prompt_ids"])
        metrics = {"val/reward": rewards.float().mean(),
                   "val/completion_len_mean": rollouts.lengths.float().mean()}
        if hp.accuracy_reward in per_fn:
            metrics["val/accuracy"] = (per_fn[hp.accuracy_reward] >= 1.0).float().mean()
        self.log_dict(metrics, on_epoch=True, sync_dist=True, batch_size=size)


@dataclass
class StepRecord:
    """What a step sampled and how it was judged: prompts, rollouts, rewards [N] and
    advantages [N] (None in validation)."""
    prompts: list[list[int]]
    rollouts: Rollouts
    rewards: torch.Tensor
    advantages: torch.Tensor | None


class _AdapterDisabled(torch.nn.Module):
    """The LoRA base model as the KL reference: the policy with its adapters switched off."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model = [model]

    def forward(self, **kwargs: Any) -> Any:
        model = self._model[0]
        context = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with context:
            return model(**kwargs)


def float32(value: float) -> torch.Tensor:
    """A 0-dim float32 tensor: a logged number, whatever the default dtype."""
    return torch.tensor(value, dtype=torch.float32)


def parse_rewards(rewards: dict[str, Any]) -> dict[str, tuple[Callable, float]]:
    """`{name: {fn: callable, weight: float}}` from config -> `{name: (fn, weight)}`."""
    if not rewards:
        raise ValueError("model.rewards is empty: list at least one reward function")
    parsed = {}
    for name, entry in rewards.items():
        fn, weight = entry.get("fn"), entry.get("weight", 1.0)
        if not callable(fn):
            raise ValueError(f"model.rewards.{name}.fn must be a callable, got {fn!r}")
        parsed[name] = (fn, float(weight))
    return parsed
