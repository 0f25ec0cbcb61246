"""The memory planner of the engine samplers: predicted peak bytes, and the run on the slot
count m that fits a budget (`micro_group_size: auto` with `memory_budget_gb`, resolved by
`SlotSettings.resolve`, samplers/slots.py).

The model is the engine's own allocation: weights + the KV of its layout (samplers/layout.py:
shared, m slot rows of max_new_tokens + the prompts alive at once; copied, m rows of (longest
prompt + max_new_tokens) + up to two prompts' KV while samples are placed) + the float32
logits buffers of one step. `tests/test_engine.py` checks it against the bytes the engine's
tensors really hold, and bench Table A against measured peaks.

    python train.py sampler=micro sampler.micro_group_size=auto sampler.memory_budget_gb=2
"""
from __future__ import annotations

from typing import Any

import torch

from samplers.base import GenerationSpec
from samplers.engine import DecodeEngine, EngineResult, Queue
from samplers.layout import KVLayout
from samplers.slots import SlotSettings


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """K and V bytes of one token over all layers, from the model config."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element


def weight_bytes(model: Any) -> int:
    """Bytes of weights on this device while the model decodes. Unsharded (or FSDP-sharded
    but gathered for sampling, `sampler.gather_weights`): every parameter in full. Sharded and
    decoding layer by layer (`gather_weights: false`): each parameter's local shard, plus
    what one forward gathers at most: the root unit (embeddings, norm, head; it stays
    gathered) and the largest decoder-layer unit."""
    params = list(model.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    held = sum(t.numel() * t.element_size() for t in local)
    units = fsdp_units(model)
    if not units or not any(hasattr(p, "to_local") for p in params):
        return held
    # each parameter belongs to the innermost unit that holds it: walk the units inner first
    owner: dict[int, int] = {}
    for k in reversed(range(len(units))):
        for q in units[k].parameters():
            owner.setdefault(id(q), k)
    gathered = [0] * len(units)  # full - local bytes of the parameters each all-gather moves
    for q in params:
        shard = q.to_local() if hasattr(q, "to_local") else q
        gathered[owner.get(id(q), 0)] += (q.numel() - shard.numel()) * q.element_size()
    return held + gathered[0] + max(gathered[1:], default=0)


def fsdp_units(model: Any) -> list[Any]:
    """The FSDP2 units of `model`, root first (none when it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older PyTorch
        from torch.distributed._composable.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def predict_peak_bytes(model: Any, prompts: list[list[int]], spec: GenerationSpec,
                       slots: int, layout: KVLayout, live_prompts: int | None = None,
                       weights: int | None = None) -> int:
    """Weights + the engine's KV + logits buffers, for the `layout` (samplers/layout.py:
    `peak_tokens`). The shared layout holds the prompts alive at once, bounded by the
    `live_prompts` longest ones (default min(B, m + 1): m rows belong to at most m prompts, and
    one more is prefilled when a row frees; rounds need fewer, see `live_prompt_bound`).
    """
    params = list(model.parameters())
    weights = weight_bytes(model) if weights is None else weights
    per_token = kv_bytes_per_token(model.config, params[0].dtype)
    lengths = sorted((len(p) for p in prompts), reverse=True)
    live = min(len(lengths), slots + 1) if live_prompts is None else live_prompts
    tokens = layout.peak_tokens(lengths, slots, spec.max_new_tokens, live)
    vocab = model.config.get_text_config().vocab_size
    logits = 4 * slots * vocab * 4  # row logits, forward output, probabilities, CDF (float32)
    return weights + tokens * per_token + logits


def live_prompt_bound(num_prompts: int, group_size: int, slots: int, rounds: bool) -> int:
    """Most prompts whose KV the shared layout holds at once. Rounds of m samples in (prompt,
    sample) order (`full`, `micro`) span at most ceil(m / G) + 1 prompts, and the next round's
    first prompt is prefilled while a prompt split across rounds is still held; refilled slots
    (`continuous`) can hold m prompts plus the one being prefilled."""
    bound = -(-slots // group_size) + 2 if rounds else slots + 1
    return min(num_prompts, bound)


def check_budget(settings: SlotSettings | None, model: Any, max_new_tokens: int) -> None:
    """Where a run is built: a `micro_group_size: auto` budget must hold at least the weights
    and one slot of a one-token prompt (real prompts are checked again when sampled)."""
    if settings is not None and settings.auto:
        spec = GenerationSpec(max_new_tokens)
        settings.resolve(lambda m: predict_peak_bytes(model, [[0]], spec, m, settings.layout),
                         1, 1)


def run_slots(model: Any, prompts: list[list[int]], group_size: int, spec: GenerationSpec,
              queue: Queue, settings: SlotSettings, rounds: bool = False) -> EngineResult:
    """Resolve m (fixed, or `auto` under the budget), run the engine on m slots, and record
    the predicted peak in its stats: in total (what the budget bounds) and above the weights
    (comparable with the measured `memory/peak_sampling_gb`)."""
    weights = weight_bytes(model)

    def peak(m: int) -> int:
        live = live_prompt_bound(len(prompts), group_size, m, rounds)
        return predict_peak_bytes(model, prompts, spec, m, settings.layout, live, weights)

    m = settings.resolve(peak, group_size, len(prompts) * group_size)
    result = DecodeEngine(model, prompts, spec, m, settings.layout).run(queue)
    result.stats.predicted_peak_bytes = peak(m)
    result.stats.predicted_sampling_bytes = result.stats.predicted_peak_bytes - weights
    return result
