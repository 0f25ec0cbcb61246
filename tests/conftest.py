"""Shared pytest fixtures: tiny offline tokenizer and Hydra configs for tiny runs (no network)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from transformers import PreTrainedTokenizerFast

from modules.tiny_tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# A whole GRPO run in a few seconds: random-init tiny policy, easy arithmetic prompts.
TINY = [
    "policy=tiny", "data=arithmetic", "data.source.size=64", "data.val_size=4",
    "data.batch_size=2", "data.val_batch_size=2", "model.group_size=4",
    "model.max_new_tokens=8", "model.update_micro_batch=4", "trainer.accelerator=cpu",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
]


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level ChatML tokenizer: printable ASCII + newline, `<|im_end|>` = eos = pad."""
    return build_char_tokenizer()


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The train config as `python train.py <overrides>` would see it, writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """`tiny_cfg("sampler=full", ...)` -> a composed config for a tiny run under tmp_path."""
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, *overrides], output_dir or tmp_path)
    return make
