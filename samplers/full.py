"""`full` sampler: the prompt is prefilled once and all G samples of its group decode together.

Peak KV is G rows at once (the prompt KV is copied into each row); decoding steps for a group
equal its longest completion. Finished rows leave the batch at once, so later steps only pay
for the rows still running. Random numbers come from the per-sample streams of
`samplers.base.uniforms`, so completions equal those of every other sampler for the same seed.

    python train.py sampler=full
"""
from __future__ import annotations

import time
from typing import Any

import torch

from samplers.base import (GenerationSpec, Rollouts, SamplingStats, kv_bytes, pack_rollouts,
                           sample_tokens, uniforms, validate_request)


class FullSampler:
    """All G rows of a prompt in one batch; prompts of a batch run one after another."""

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        start = time.perf_counter()
        completions: list[list[int]] = []
        finished: list[bool] = []
        steps = peak = 0
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                group, done, group_steps, group_peak = decode_group(model, i, prompt,
                                                                    group_size, spec)
                completions += group
                finished += done
                steps += group_steps
                peak = max(peak, group_peak)
        stats = SamplingStats(
            decoding_steps=steps,
            prefill_passes=len(prompts),
            prefill_tokens=sum(len(p) for p in prompts),
            generated_tokens=sum(len(c) for c in completions),
            peak_kv_bytes=peak,
            max_concurrency=group_size,
            wall_time_s=time.perf_counter() - start,
        )
        pad = spec.eos_token_ids[0] if spec.eos_token_ids else 0
        return pack_rollouts(completions, finished, len(prompts), group_size, stats, pad)


def decode_group(model: Any, prompt_index: int, prompt: list[int], group_size: int,
                 spec: GenerationSpec) -> tuple[list[list[int]], list[bool], int, int]:
    """Decode one prompt's group in lockstep; returns (completions, finished, steps, peak KV)."""
    device = next(model.parameters()).device
    length = len(prompt)
    out = model(input_ids=torch.tensor([prompt], device=device),
                position_ids=torch.arange(length, device=device)[None],
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].expand(group_size, -1)  # [R, V]
    peak = kv_bytes(cache)
    eos = torch.tensor(spec.eos_token_ids, device=device, dtype=torch.long)
    rows = torch.arange(group_size, device=device)  # sample index of each running row
    tokens = torch.zeros(group_size, spec.max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((group_size,), spec.max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(group_size, dtype=torch.bool, device=device)
    prompt_ids = torch.full((group_size,), prompt_index, dtype=torch.long, device=device)
    steps = 0
    for t in range(spec.max_new_tokens):
        u = uniforms(spec.seed, prompt_ids[: rows.numel()], rows,
                     torch.full_like(rows, t))  # [R]
        next_tokens = sample_tokens(logits, u, spec)  # [R]
        tokens[rows, t] = next_tokens
        steps += 1
        hit_eos = torch.isin(next_tokens, eos)  # [R]
        if bool(hit_eos.any()):
            lengths[rows[hit_eos]] = t + 1
            done[rows[hit_eos]] = True
            keep = (~hit_eos).nonzero().squeeze(-1)
            rows, next_tokens = rows[keep], next_tokens[keep]
            cache.batch_select_indices(keep)
        if rows.numel() == 0 or t == spec.max_new_tokens - 1:
            break
        out = model(input_ids=next_tokens[:, None], past_key_values=cache, use_cache=True,
                    position_ids=torch.full((rows.numel(), 1), length + t, device=device))
        logits = out.logits[:, -1]
        peak = max(peak, kv_bytes(cache))
    tokens, lengths = tokens.cpu(), lengths.tolist()
    completions = [tokens[j, : lengths[j]].tolist() for j in range(group_size)]
    return completions, done.tolist(), steps, peak
