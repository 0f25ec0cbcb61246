"""Shared pytest fixtures: tiny offline tokenizer (no network)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from modules.tiny_tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level ChatML tokenizer: printable ASCII + newline, `<|im_end|>` = eos = pad."""
    return build_char_tokenizer()
