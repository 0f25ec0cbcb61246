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
import re
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from modules.policy import describe  # noqa: E402
from samplers.base import context_length  # noqa: E402

log = logging.getLogger("train")

# Errors that come from the user's config or data: printed as one clear line, no traceback.
USER_ERRORS = (ValueError, ImportError, FileNotFoundError)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a _target_."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values()
            if isinstance(node, DictConfig) and "_target_" in node]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    log.info("policy <%s>", cfg.policy._target_)
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

    log.info("sampler <%s>", cfg.sampler._target_)
    sampler = hydra.utils.instantiate(cfg.sampler)
    model = hydra.utils.instantiate(cfg.model, policy=policy, sampler=sampler)

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks,
                                                  logger=loggers)
    hparams = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(hparams, resolve=True))

    trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    objects = dict(cfg=cfg, policy=policy, datamodule=datamodule, sampler=sampler, model=model,
                   callbacks=callbacks, loggers=loggers, trainer=trainer)
    return metrics, objects


def config_key(err: BaseException | None) -> str | None:
    """The config node Hydra was instantiating when `err` was raised (its `full_key`)."""
    while err is not None:
        found = re.search(r"full_key: ([\w.\[\]]+)", str(err))
        if found:
            return found.group(1)
        err = err.__cause__ or err.__context__
    return None


def user_error(err: BaseException) -> BaseException | None:
    """The config/data error at the root of `err`, if there is one (Hydra wraps them)."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


def run_reporting_errors(run: Callable[[DictConfig], tuple], cfg: DictConfig) -> tuple:
    """Save the config tree, then run; a bad-input error becomes one `error:` line and exit 1
    (the traceback goes to the run's log), anything else is re-raised."""
    output_dir = Path(cfg.paths.output_dir)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    log.info("config:\n%s", text)
    (output_dir / "config_tree.yaml").write_text(text)
    try:
        return run(cfg)
    except Exception as err:  # noqa: BLE001 - reported below, then re-raised or exited
        cause = user_error(err)
        log.exception("run failed; output dir: %s", output_dir)
        if cause is None:
            raise
        key = config_key(err)
        where = f"in the config `{key}`; " if key else ""
        print(f"\nerror: {type(cause).__name__}: {cause}\n({where}details: {output_dir})",
              file=sys.stderr)
        raise SystemExit(1) from None


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, objects = run_reporting_errors(train, cfg)
    trainer = objects["trainer"]
    if trainer.is_global_zero:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                            if k.startswith(("train/reward", "train/accuracy", "val/")))
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


if __name__ == "__main__":
    main()
