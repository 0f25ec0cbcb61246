"""Sampler contract: what every sampler takes and returns, plus the shared sampling maths.

A sampler turns B prompts into B*G completions (a group of G per prompt). Every sampler
returns `Rollouts` ordered by (prompt_index, sample_index) and draws the random numbers of
sample (i, j) from its own counter-based stream `uniforms(seed, i, j, t)`, so the same seed
gives the same completions whatever slot, round or order a sample ran in (schedule
invariance, docs/ARCHITECTURE.md section 4).

    from samplers.base import GenerationSpec
    rollouts = sampler.sample(model, [[1, 2, 3]], group_size=8, spec=GenerationSpec(64))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0
    # called with the prompt index of each row ([n] long) before every decode forward of the
    # engine, and with None after it: lets an activation recorder count generated tokens per
    # prompt while they are decoded (values/statistics.py: record_decoding)
    on_decode: Callable[[torch.Tensor | None], None] | None = field(default=None, compare=False)


@dataclass
class PredictorRecord:
    """What the `infinite` sampler's length predictor said and what came true, per parked
    sample (the ones that outlived the probe); read by `callbacks/predictor.py`."""
    name: str
    probe_tokens: int
    predicted: torch.Tensor  # float [n]: predicted remaining tokens after the probe
    true: torch.Tensor  # long [n]: true remaining tokens (L - probe_tokens)


SlotSpan = tuple[int, tuple[int, int], int, int]  # (slot, (prompt, sample), first step, last)


@dataclass
class SamplingStats:
    """What one sample() call did: written directly by the decode engine's run (or by
    hf_generate), the samplers' own fields added after."""
    decoding_steps: int = 0  # token-emitting batched decode iterations (prefills not counted)
    prefill_passes: int = 0  # forward passes that consumed prompt tokens
    prefill_tokens: int = 0  # prompt tokens run through the model (1x per prompt when shared)
    generated_tokens: int = 0
    peak_kv_bytes: int = 0  # max bytes of KV tensors alive at once, from the sampler's own tensors
    max_concurrency: int = 0  # max rows decoded in one step
    wall_time_s: float = 0.0
    # Set by the samplers that have them (None / empty / 0 otherwise):
    prefill_time_s: float = 0.0  # engine samplers: the part of wall_time_s spent in prefills
    slots: int | None = None  # m rows the engine decodes on (engine samplers)
    slot_trace: list[SlotSpan] = field(default_factory=list)  # the steps each sample held a slot
    predicted_peak_bytes: int | None = None  # the memory planner's peak: weights + KV + logits
    predicted_sampling_bytes: int | None = None  # the same above the weights
    steps_lower_bound: int | None = None  # infinite: max(max L, ceil(sum L / m)) of the call
    predictor: PredictorRecord | None = None  # infinite: predicted vs true remaining lengths
    schedule: str | None = None  # infinite: the schedule taken ("attained" or "predicted")
    parks: int = 0  # infinite: samples parked at a boundary (each costs one step of its own)
    biased_to_short: bool = False  # continuous dynamic: the kept samples finished first
    launched: int | None = None  # continuous dynamic: samples started (>= those returned)


@dataclass
class Rollouts:
    prompt_index: torch.Tensor  # long [N]: which prompt of the batch
    sample_index: torch.Tensor  # long [N]: 0..G-1 within its group
    completion_ids: torch.Tensor  # long [N, T], right-padded
    completion_mask: torch.Tensor  # bool [N, T]
    lengths: torch.Tensor  # long [N]; an EOS token, when produced, is included
    finished: torch.Tensor  # bool [N]: ended with EOS (False = truncated at max_new_tokens)
    stats: SamplingStats

    def __len__(self) -> int:
        return int(self.lengths.numel())


@runtime_checkable
class Sampler(Protocol):
    """What `GRPOModule`, the value experiments and the benchmarks read of a sampler (every
    sampler is a plain class that has all of it; its settings' defaults are its config's).

    - `sample`: B prompts -> B x G completions (docs/ARCHITECTURE.md section 4).
    - `settings`: the slot settings of an engine sampler (samplers/slots.py: m or `auto`, the
      memory budget, the prompt-KV layout), None for `hf_generate`.
    - `gather_weights`: under trainer=fsdp, gather the policy once per sampling phase.
    - `predictor`: the length predictor it schedules with (`infinite`), or None. Its state is
      saved in, and restored from, the training checkpoint.
    - `learning`: set False while the caller samples another distribution than training's
      (greedy validation); a predictor is then asked but not refitted.
    - `bind(tokenizer)`: called once with the policy's tokenizer (text predictors decode
      prompts and probes with it).
    """

    settings: Any | None
    gather_weights: bool
    predictor: Any | None
    learning: bool

    def bind(self, tokenizer: Any) -> None: ...

    def sample(
        self, model: Any, prompts: list[list[int]], group_size: int, spec: GenerationSpec
    ) -> Rollouts: ...


# ----------------------------------------------------------------------------- validation


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length, when its config states one."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_sampling(temperature: Any, top_p: Any, top_k: Any) -> None:
    """The sampling settings, checked where a run is built and again per request."""
    number = (int, float)
    if isinstance(temperature, bool) or not isinstance(temperature, number) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, number) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")


def validate_request(
    model: Any, prompts: Sequence[Sequence[int]], group_size: int, spec: GenerationSpec
) -> None:
    """Raise a ValueError that names the bad argument (docs/ARCHITECTURE.md section 4)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if spec.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {spec.max_new_tokens}")
    check_sampling(spec.temperature, spec.top_p, spec.top_k)
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    limit = context_length(model)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if limit is not None and len(prompt) + spec.max_new_tokens > limit:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens; with max_new_tokens="
                f"{spec.max_new_tokens} it exceeds the model's context of {limit} tokens"
            )


def decoding_mode(model: Any) -> Any:
    """`torch.inference_mode()` for decoding, but `torch.no_grad()` for an FSDP2-sharded model:
    FSDP allocates its all-gather buffers once and reuses them in training, which refuses
    inference tensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - PyTorch without FSDP2
        return torch.inference_mode()
    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a model's attention computes in for `tensor`'s device: autocast's where
    autocast is on (`trainer.precision=bf16-mixed`: the model's own SDPA then runs in bf16, and
    its keys leave RoPE in float32 while its values are bf16), else the tensor's own."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


# ----------------------------------------------------------------------------- random streams


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (C. Wellons), elementwise on int64 tensors holding uint32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(
    seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Counter-based U[0, 1) in float64, one per row, a pure function of (seed, i, j, t).

    All index tensors are long [R] on the same device; the result is float64 [R].
    """
    s = torch.full_like(prompt_index, seed & _MASK32)
    h = _hash32(s ^ _hash32(((seed >> 32) & _MASK32) + prompt_index * 0x9E3779B1))
    h = _hash32(h ^ _hash32(sample_index + 0x632BE5AB))
    h = _hash32(h ^ _hash32(step + 0x85EBCA77))
    hi = _hash32(h ^ 0x27D4EB2F)  # 32 random bits
    lo = _hash32(h ^ 0x165667B1) >> 11  # 21 random bits
    return (hi.double() * 2.0**21 + lo.double()) / 2.0**53


# ----------------------------------------------------------------------------- token sampling


def filter_logits(logits: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering; logits [R, V] -> [R, V]."""
    logits = logits / spec.temperature
    if 0 < spec.top_k < logits.shape[-1]:
        kth = torch.topk(logits, spec.top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [R, V]
        drop_sorted = mass_before >= spec.top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
    """Draw one token per row by inverse CDF with the given uniforms.

    logits [R, V], u float64 [R] -> long [R]. Same distribution as torch.multinomial, ~5x
    cheaper on CPU, and deterministic given u (which is what schedule invariance needs).
    """
    if spec.temperature == 0.0:
        return logits.argmax(dim=-1)
    if logits.dtype != torch.float64:
        logits = logits.float()
    probs = torch.softmax(filter_logits(logits, spec), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)  # [R, V]
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # [R, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=logits.shape[-1] - 1)


# ----------------------------------------------------------------------------- packing


def kv_bytes(cache: Any) -> int:
    """Bytes held by a transformers Cache's key/value tensors right now."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def pack_rollouts(
    completions: list[list[int]],
    finished: list[bool],
    num_prompts: int,
    group_size: int,
    stats: SamplingStats,
    pad_token_id: int = 0,
) -> Rollouts:
    """Build Rollouts from completions already ordered by (prompt, sample)."""
    n = len(completions)
    if n != num_prompts * group_size or len(finished) != n:
        raise ValueError(f"expected {num_prompts * group_size} completions, got {n}")
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)  # [N]
    width = max(1, int(lengths.max()))
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)  # [N, T]
    for row, tokens in enumerate(completions):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]  # [N, T]
    prompt_index = torch.arange(num_prompts).repeat_interleave(group_size)
    sample_index = torch.arange(group_size).repeat(num_prompts)
    return Rollouts(prompt_index, sample_index, ids, mask, lengths,
                    torch.tensor(finished, dtype=torch.bool), stats)


def truncate_at_eos(tokens: list[int], eos_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut a token list after its first EOS (kept); return (tokens, finished)."""
    eos = set(eos_token_ids)
    for pos, token in enumerate(tokens):
        if token in eos:
            return tokens[: pos + 1], True
    return tokens, False
