"""The memory planner of the engine samplers: predicted peak bytes, and the slot count m that
fits a budget (`micro_group_size: auto` with `memory_budget_gb`).

The model is the engine's own allocation: weights + m slot rows of (longest prompt +
max_new_tokens) KV + up to two prompts' KV alive while samples are placed + the float32
logits buffers of one step. `tests/test_engine.py` checks it against the bytes the engine's
tensors really hold, and bench Table A against measured peaks.

    python train.py sampler=micro sampler.micro_group_size=auto sampler.memory_budget_gb=2
"""
from __future__ import annotations

from typing import Any

import torch

from samplers.base import GenerationSpec, check_positive
from samplers.engine import DecodeEngine, EngineResult, Queue


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """K and V bytes of one token over all layers, from the model config."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element


def predict_peak_bytes(model: Any, prompts: list[list[int]], spec: GenerationSpec,
                       slots: int) -> int:
    """Weights + the engine's KV (slots, plus up to two prompts' KV alive) + logits buffers."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    per_token = kv_bytes_per_token(model.config, params[0].dtype)
    longest = max(len(p) for p in prompts)
    slot_kv = slots * (longest + spec.max_new_tokens) * per_token
    prompt_kv = 2 * longest * per_token
    vocab = model.config.get_text_config().vocab_size
    logits = 4 * slots * vocab * 4  # row logits, forward output, probabilities, CDF (float32)
    return weights + slot_kv + prompt_kv + logits


def check_slots(micro_group_size: int | str, memory_budget_gb: float | None) -> None:
    """Validate the `micro_group_size` / `memory_budget_gb` pair of a sampler config."""
    if micro_group_size != "auto":
        check_positive("micro_group_size", micro_group_size)
    elif memory_budget_gb is None or memory_budget_gb <= 0:
        raise ValueError("micro_group_size=auto needs memory_budget_gb > 0 (GiB for weights, "
                         f"KV and logits), got {memory_budget_gb!r}")


def resolve_slots(micro_group_size: int | str, memory_budget_gb: float | None, model: Any,
                  prompts: list[list[int]], group_size: int, spec: GenerationSpec) -> int:
    """m itself, or with `auto` the largest m whose predicted peak fits `memory_budget_gb`."""
    check_slots(micro_group_size, memory_budget_gb)
    if micro_group_size != "auto":
        return micro_group_size
    budget = memory_budget_gb * (1 << 30)
    most = len(prompts) * group_size
    if predict_peak_bytes(model, prompts, spec, 1) > budget:
        need = predict_peak_bytes(model, prompts, spec, 1) / (1 << 30)
        raise ValueError(f"memory_budget_gb={memory_budget_gb} is below the {need:.3f} GiB "
                         "that weights plus one slot need")
    low, high = 1, most  # largest m with predicted peak <= budget (monotone in m)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if predict_peak_bytes(model, prompts, spec, mid) <= budget \
            else (low, mid - 1)
    return low


def run_slots(model: Any, prompts: list[list[int]], group_size: int, spec: GenerationSpec,
              queue: Queue, micro_group_size: int | str,
              memory_budget_gb: float | None) -> EngineResult:
    """Resolve m (an int, or `auto` under the budget), run the engine on m slots, and record
    the predicted peak in the result: in total (what the budget bounds) and above the weights
    (comparable with the measured `memory/peak_sampling_gb`)."""
    m = resolve_slots(micro_group_size, memory_budget_gb, model, prompts, group_size, spec)
    result = DecodeEngine(model, prompts, spec, slots=m).run(queue)
    predicted = predict_peak_bytes(model, prompts, spec, m)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result.predicted_peak_bytes = predicted
    result.predicted_sampling_bytes = predicted - weights
    return result
