"""Shared pytest fixtures: tiny offline tokenizer and Hydra configs for tiny runs (no network)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerFast

from modules.tiny_tokenizer import build_char_tokenizer
from tests.helpers import TINY, compose_entry, tiny_lm

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level ChatML tokenizer: printable ASCII + newline, `<|im_end|>` = eos = pad."""
    return build_char_tokenizer()


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The train config as `python train.py <overrides>` would see it, writing to output_dir."""
    return compose_entry("train", overrides, output_dir)


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """`tiny_cfg("sampler=full", ...)` -> a composed config for a tiny run under tmp_path."""
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, *overrides], output_dir or tmp_path)
    return make


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny random-init Llama in float64 (tests.helpers.tiny_lm), one per test module."""
    return tiny_lm("llama")
