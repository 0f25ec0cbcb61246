"""GRPO training entry point.

    python train.py                                   # offline default (SmolLM2-135M, GSM8K-style)
    python train.py sampler=hf_generate policy=tiny   # any config group from configs/
    python train.py -m sampler=hf_generate,full       # Hydra multirun sweep
    python train.py ckpt_path=logs/train/runs/<date>/checkpoints/last.ckpt   # resume

`train(cfg)` is one flat, ordered function (seed -> policy -> data -> sampler -> module ->
callbacks -> loggers -> trainer -> fit) that returns (metrics, objects); tests call it directly.
"""
from __future__ import annotations

import logging
import os
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from entry.summary import log_run_summary  # noqa: E402
from modules.checkpoints import CheckpointError  # noqa: E402
from entry.run import (instantiate_group, metric_summary, run_and_report,  # noqa: E402,F401
                       trainer_metrics, user_error)
from modules.policy import describe  # noqa: E402
from samplers.base import context_length  # noqa: E402
from samplers.memory import check_budget  # noqa: E402

log = logging.getLogger("train")

def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    policy = hydra.utils.instantiate(cfg.policy)
    log.info(describe(policy))

    limit = context_length(policy.model)
    max_prompt = cfg.data.get("max_prompt_tokens")
    if limit is not None and cfg.model.max_new_tokens >= limit:
        raise ValueError(f"model.max_new_tokens={cfg.model.max_new_tokens} leaves no room for "
                         f"the prompt: the policy's context is {limit} tokens (use at most "
                         f"{limit - 1}, less the longest prompt)")
    if max_prompt is None and limit is not None:
        max_prompt = limit - cfg.model.max_new_tokens
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=policy.tokenizer,
                                         max_prompt_tokens=max_prompt)

    sampler = hydra.utils.instantiate(cfg.sampler)
    model = hydra.utils.instantiate(cfg.model, policy=policy, sampler=sampler)
    check_budget(sampler.settings, policy.model, cfg.model.max_new_tokens)

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks,
                                                  logger=loggers)
    hparams = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(hparams, resolve=True))

    ckpt_path = cfg.get("ckpt_path")
    try:
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    except CheckpointError as err:  # raised while restoring: name the file
        if str(err).startswith("ckpt_path="):
            raise
        raise CheckpointError(f"ckpt_path={str(ckpt_path)!r} {err}") from err

    if trainer.is_global_zero:
        log_run_summary(cfg, loggers)  # the HPARAMS tab: settings and the run's summary row
    return trainer_metrics(trainer), dict(
        cfg=cfg, policy=policy, datamodule=datamodule, sampler=sampler, model=model,
        callbacks=callbacks, loggers=loggers, trainer=trainer)


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> float | None:
    """What a user sees at the end: the last metrics, the reward's first and last steps."""
    trainer = objects["trainer"]
    if trainer.is_global_zero:
        summary = metric_summary(metrics, ("train/reward", "train/accuracy", "val/"))
        print(f"\nfinished {trainer.global_step} steps: {summary}")
        rewards = objects["model"].reward_log
        if rewards:
            n = min(5, len(rewards))
            print(f"train/reward: first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}; "
                  f"mean of the first {n} steps {sum(rewards[:n]) / n:.3f}, of the last {n} "
                  f"{sum(rewards[-n:]) / n:.3f}")
        output_dir = cfg.paths.output_dir
        print(f"logs: {output_dir}\nTensorBoard: tensorboard --logdir {output_dir}/tensorboard")
    return metrics.get(cfg.get("optimized_metric") or "")


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    return run_and_report(train, cfg, report)


if __name__ == "__main__":
    main()
