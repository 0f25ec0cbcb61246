"""Table F: `prompt_kv: copied` vs `shared` over prompt lengths (issue 10).

    python -m bench table=prompt_kv                       # P ~ 114, 583, 2036 (few_shot 0, 2, 12)

For each few-shot setting of the GSM8K-style data (the same question, k worked examples before
it) and each sampler of `prompt_kv.samplers` (`full` at G, `micro` at m), both layouts run on the
same prompt and seed, `prompt_kv.repeats` times alternately (the median run by tokens/s is
shown, every run's tokens/s in `tok_s_runs`: this machine drifts by ~10 %). Columns: measured
peak sampling memory, the sampler's own KV, the shared layout's closed form (live P + m·L with
L = max_new_tokens; for copied m·(P + L) + P), tokens/s (prefill included) and decoding-phase
ms per step (`decode_s` = wall time minus prefill time, over the steps). The `bare forward`
rows time a plain transformers loop on a fixed batch (N rows of the prompt in a DynamicCache,
one token per row per step, argmax or sampled as the engine samples) as the per-step reference,
and the `engine` rows time the engine on the same batch for the same steps (`full` on N rows
with no EOS, so every row runs every step), alternating with the bare loop; the `auto` rows
give `micro` one `memory_budget_gb` in both layouts.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import hydra
import torch
from omegaconf import OmegaConf

from bench.core import Bench, Row, Table, make_sampler
from common.units import GB
from common.compat import cache_keyword, output_cache
from samplers.base import sample_tokens, uniforms
from samplers.memory import kv_bytes_per_token


def prompt_of(b: Bench, few_shot: int) -> list[int]:
    """The bench's first prompt with `few_shot` worked examples before its question."""
    node = OmegaConf.to_container(b.cfg.data, resolve=True)
    node["source"]["few_shot"] = few_shot
    data = hydra.utils.instantiate(node, tokenizer=b.tokenizer, batch_size=1)
    data.setup("fit")
    return next(iter(data.train_dataloader()))["prompt_ids"][0]


def bare_forward_ms(b: Bench, prompt: list[int], rows: int, steps: int,
                    sample: bool = False) -> float:
    """ms per step of a plain transformers decode loop: the prompt prefilled once into a
    DynamicCache repeated to `rows` rows (the copied layout), then `steps` one-token forwards.
    The next token is the argmax, or with `sample` drawn as the engine draws it (the bench's
    temperature / top-p, inverse CDF over the vocabulary), so the two loops do the same work."""
    ids = torch.tensor([prompt], device=b.device)
    keyword = cache_keyword(b.model)
    index = torch.arange(rows, device=b.device)

    def pick(logits: torch.Tensor, t: int) -> torch.Tensor:
        if not sample:
            return logits.argmax(-1, keepdim=True)
        u = uniforms(b.spec.seed, torch.zeros_like(index), index, torch.full_like(index, t))
        return sample_tokens(logits.float(), u, b.spec)[:, None]

    with torch.inference_mode():
        out = b.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        cache.batch_repeat_interleave(rows)
        token = pick(out.logits[:, -1].repeat(rows, 1), 0)
        start = time.perf_counter()
        for t in range(steps):
            out = b.model(input_ids=token, use_cache=True, **{keyword: cache})
            cache, token = output_cache(out), pick(out.logits[:, -1], t + 1)
        return (time.perf_counter() - start) / steps * 1000


def engine_ms(b: Bench, prompt: list[int], rows: int, steps: int, layout: str) -> float:
    """ms per decoding step of the engine on `rows` rows of `prompt` for `steps` steps: `full`
    with no EOS token, so the batch is the bare loop's at every step."""
    spec = replace(b.spec, max_new_tokens=steps, eos_token_ids=())
    stats = make_sampler("full", prompt_kv=layout).sample(b.model, [prompt], rows, spec).stats
    return (stats.wall_time_s - stats.prefill_time_s) / stats.decoding_steps * 1000


def median(runs: list, key: Callable[[Any], float] = float) -> Any:
    """The middle run by `key` (the upper one of an even count)."""
    return sorted(runs, key=key)[len(runs) // 2]


def ms_per_step(row: Row) -> float:
    """Decoding-phase ms per step of a measured row."""
    return row["decode_s"] / max(1, row["steps"]) * 1000


def same_batch_rows(b: Bench, prompt: list[int], batch: int) -> list[Row]:
    """The bare loop (argmax, sampled) and the engine (copied, shared) on one fixed batch,
    `prompt_kv.repeats` alternating runs each, median ms per step."""
    cfg = b.cfg.prompt_kv
    steps = cfg.bare_steps
    timers: dict[str, Callable[[], float]] = {
        "bare forward argmax": lambda: bare_forward_ms(b, prompt, batch, steps),
        "bare forward sampled": lambda: bare_forward_ms(b, prompt, batch, steps, sample=True),
        "engine copied": lambda: engine_ms(b, prompt, batch, steps, "copied"),
        "engine shared": lambda: engine_ms(b, prompt, batch, steps, "shared"),
    }
    runs: dict[str, list[float]] = {label: [] for label in timers}
    for _ in range(cfg.repeats):
        for label, timer in timers.items():
            runs[label].append(timer())
    return [dict(sampler=f"{label} x{batch}", G=None, m=batch, P=len(prompt),
                 ms_per_step=median(times), ms_runs=" ".join(f"{t:.1f}" for t in times))
            for label, times in runs.items()]


def table_prompt_kv(b: Bench) -> Table:
    cfg, g, m = b.cfg.prompt_kv, b.cfg.group_size, b.cfg.micro_group_size
    per_token = kv_bytes_per_token(b.model.config, next(b.model.parameters()).dtype)
    new = b.spec.max_new_tokens
    rows: list[Row] = []
    for few_shot in cfg.few_shot:
        prompt = prompt_of(b, few_shot)
        p = len(prompt)
        for name in cfg.samplers:
            slots = g if name == "full" else m
            runs: dict[str, list[Row]] = {"copied": [], "shared": []}
            for _ in range(cfg.repeats):  # layouts alternate, so machine drift hits both
                for layout in runs:
                    options = {} if name == "full" else {"micro_group_size": m}
                    sampler = make_sampler(name, prompt_kv=layout, **options)
                    runs[layout].append(b.measure(f"{name} {layout}", sampler, g, slots,
                                                  prompts=[prompt], P=p, prompt_kv=layout))
            for layout, measured in runs.items():
                row = median(measured, key=lambda r: r["tok_s"])
                closed = (p + slots * new) if layout == "shared" else slots * (p + new) + p
                row.update(closed_kv_gb=closed * per_token / GB,
                           ms_per_step=ms_per_step(row),
                           runs=len(measured),
                           tok_s_runs=" ".join(f"{r['tok_s']:.1f}" for r in measured))
                rows.append(row)
        for batch in sorted({m, g}):
            rows += same_batch_rows(b, prompt, batch)
        if cfg.budget_gb:
            for layout in ("copied", "shared"):
                sampler = make_sampler("micro", micro_group_size="auto",
                                       memory_budget_gb=cfg.budget_gb, prompt_kv=layout)
                row = b.measure(f"micro auto {layout}", sampler, g, None, prompts=[prompt],
                                P=p, prompt_kv=layout, budget_gb=cfg.budget_gb)
                row["ms_per_step"] = ms_per_step(row)
                rows.append(row)
    return Table(rows)
