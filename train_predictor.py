"""Offline training of a length predictor (minilm or hidden) on saved rollouts.

    python train_predictor.py predictor=hidden rollouts=bench_results/rollouts.pt probe_tokens=16
    python train_predictor.py predictor=minilm rollouts=<file> max_epochs=50 policy=tiny
    python train_predictor.py predictor=hidden predictor.path=predictors/hidden.pt rollouts=<file>

Record the rollouts file with `predictors.rollouts.save_rollouts`. The predictor is trained on
the prompts of the file minus `val_fraction` held-out prompts (logged as predictor/* on val) and
saved to `predictor.path`, or to `output_path` (the run dir) when that is null; the `infinite`
sampler loads it with `predictor=<name> predictor.path=<file>`.

`train_predictor(cfg)` is one flat, ordered function (seed -> policy -> predictor -> module ->
data -> loggers -> trainer -> fit -> save) that returns (metrics, objects); tests call it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from predictors.rollouts import PredictorDataModule  # noqa: E402
from predictors.module import PredictorModule  # noqa: E402
from common.checks import check_number  # noqa: E402
from entry.run import (instantiate_group, metric_summary, run_and_report,  # noqa: E402
                       trainer_metrics)

log = logging.getLogger("train_predictor")


def train_predictor(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    check_number("probe_tokens", cfg.probe_tokens, 0, integer=True)
    if not cfg.get("rollouts") or not Path(cfg.rollouts).is_file():
        raise ValueError(f"rollouts={cfg.get('rollouts')!r} is not a file: record one with "
                         f"predictors.rollouts.save_rollouts")
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)

    log.info("policy <%s>", cfg.policy._target_)
    policy = hydra.utils.instantiate(cfg.policy)
    log.info("predictor <%s>", cfg.predictor._target_)
    predictor = hydra.utils.instantiate(cfg.predictor)
    predictor.bind(policy.tokenizer)

    module = PredictorModule(predictor)  # checks that the predictor has a trainable head
    datamodule = PredictorDataModule(
        cfg.rollouts, cfg.probe_tokens, featurize=predictor.featurizer.features, model=policy.model,
        needs_hidden=predictor.needs_hidden, batch_size=cfg.batch_size,
        val_fraction=cfg.val_fraction, seed=cfg.seed or 0)

    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False)
    hparams = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(hparams, resolve=True))

    trainer.fit(model=module, datamodule=datamodule)

    path = cfg.predictor.get("path") or cfg.output_path
    predictor.save(path)
    log.info("saved the %s predictor to %s", predictor.name, path)
    return trainer_metrics(trainer), dict(
        cfg=cfg, policy=policy, predictor=predictor, datamodule=datamodule, module=module,
        loggers=loggers, trainer=trainer, path=str(path))


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> float:
    summary = metric_summary(metrics, ("predictor/",))
    print(f"\ntrained the {objects['predictor'].name} predictor: {summary}")
    print(f"saved: {objects['path']}\nlogs: {cfg.paths.output_dir}")
    return metrics.get("predictor/mae")


@hydra.main(version_base="1.3", config_path="configs", config_name="train_predictor.yaml")
def main(cfg: DictConfig) -> float | None:
    return run_and_report(train_predictor, cfg, report)


if __name__ == "__main__":
    main()
