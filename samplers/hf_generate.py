"""`hf_generate` sampler: the peer baseline, `model.generate(num_return_sequences=G)`.

This is what TRL does without vLLM: the prompt is expanded to G rows before prefill, so the
prompt is prefilled G times and its KV is held G times, and every row decodes until the
longest one ends. Sampling uses torch's global RNG (seeded per prompt from spec.seed inside a
forked RNG state), so only greedy decoding matches the other samplers token for token.

    python train.py sampler=hf_generate
"""
from __future__ import annotations

import time
from typing import Any

import torch
from transformers import GenerationConfig

from samplers.base import (GenerationSpec, Rollouts, SamplingStats, decoding_mode, kv_bytes,
                           pack_rollouts, truncate_at_eos, validate_request)
from common.compat import output_cache


class HFGenerateSampler:
    """One `generate` call per prompt on G copies of it."""

    settings = None  # no slots: generate() decodes the G copies of a prompt together
    predictor = None
    learning = True

    def __init__(self, gather_weights: bool) -> None:
        if not isinstance(gather_weights, bool):
            raise ValueError(f"gather_weights must be true or false, got {gather_weights!r}")
        self.gather_weights = gather_weights

    def bind(self, tokenizer: Any) -> None:
        """Nothing to bind: only length predictors read text."""

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        start = time.perf_counter()
        device = next(model.parameters()).device
        config = generation_config(spec)
        completions: list[list[int]] = []
        finished: list[bool] = []
        steps = peak = 0
        for i, prompt in enumerate(prompts):
            # generate() expands num_return_sequences the same way; doing it here also
            # covers greedy decoding, which refuses num_return_sequences > 1.
            ids = torch.tensor([prompt], device=device).expand(group_size, -1)  # [G, P]
            forked = [device] if device.type == "cuda" else []
            with decoding_mode(model), torch.random.fork_rng(devices=forked):
                torch.manual_seed(spec.seed * 1_000_003 + i)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     generation_config=config)
            peak = max(peak, kv_bytes(output_cache(out)))
            new = out.sequences[:, len(prompt):].tolist()  # [G, L_max]
            steps += len(new[0])
            for row in new:
                tokens, done = truncate_at_eos(row, spec.eos_token_ids)
                completions.append(tokens)
                finished.append(done)
        stats = SamplingStats(
            decoding_steps=steps,
            prefill_passes=len(prompts),
            prefill_tokens=group_size * sum(len(p) for p in prompts),
            generated_tokens=sum(len(c) for c in completions),
            peak_kv_bytes=peak,
            max_concurrency=group_size,
            wall_time_s=time.perf_counter() - start,
        )
        pad = spec.eos_token_ids[0] if spec.eos_token_ids else 0
        return pack_rollouts(completions, finished, len(prompts), group_size, stats, pad)


def generation_config(spec: GenerationSpec) -> GenerationConfig:
    """A GenerationConfig that states every option, so model defaults (top_k=50) never leak in."""
    greedy = spec.temperature == 0.0
    eos = list(spec.eos_token_ids)
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        min_new_tokens=0,
        do_sample=not greedy,
        temperature=None if greedy else spec.temperature,
        top_p=None if greedy else spec.top_p,
        top_k=None if greedy or spec.top_k == 0 else spec.top_k,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
        use_cache=True,
        return_dict_in_generate=True,
    )
