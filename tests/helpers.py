"""Test-only reward functions and tiny models (seeded, offline)."""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config


def char_fraction_reward(completions: list[str], chars: str = "0123456789",
                         **batch: Any) -> list[float]:
    """Fraction of characters that are in `chars` (digits): trivially learnable by a tiny
    random policy, and dense enough (~10% at random init) that groups have reward variance."""
    return [sum(ch in chars for ch in c) / max(1, len(c)) for c in completions]


def raising_reward(completions: list[str], **batch: Any) -> list[float]:
    raise RuntimeError("scorer crashed")


def nan_reward(completions: list[str], **batch: Any) -> list[float]:
    return [math.nan for _ in completions]


FAMILIES = {"llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_lm(family: str = "llama", vocab_size: int = 48, attn: str = "sdpa",
            dtype: torch.dtype = torch.float64, seed: int = 0, max_positions: int = 256) -> Any:
    """A 2-layer random-init causal LM of the given family, in eval mode."""
    config = FAMILIES[family](
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
        head_dim=8, tie_word_embeddings=True)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
