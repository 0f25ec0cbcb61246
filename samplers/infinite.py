"""`infinite` sampler: continuous sampling on m slots, scheduled by predicted lengths.

One `sample()` call (B prompts x G samples, m slots):

1. Prefill every prompt once (its KV is shared by all its samples and both phases below).
2. Probe: decode the first k = `probe_tokens` tokens of every sample, m at a time. A sample
   that ends inside the probe is done; the others are parked outside the slots with their k
   tokens of KV and their next token already drawn (`samplers.engine.Suspended`), so nothing
   is recomputed later. k = 0 skips the probe (the first token is drawn from the prompt's
   logits). Probe steps are counted apart, in `stats.probe_steps`.
3. Predict each parked sample's remaining length with the predictor (config group
   `predictor=oracle|history|minilm|hidden`, `predictors/`).
4. Plan an admission order (`samplers/scheduling.py`): `grouping: fptas` balances predicted
   work across the m slots with the FPTAS plan and admits samples by planned start time;
   `grouping: none` admits in refill order alone. `refill: sjf | lpt | fifo` orders samples
   (inside each planned slot with fptas): shortest predicted first (the paper), longest first
   (LPT, the classic makespan rule), or (prompt, sample) order.
5. Decode the parked samples on m slots with continuous refill in that order, then hand the
   true remaining lengths to the predictor so it refits online as the policy drifts.

Every sample draws its tokens from its own stream, so the completions equal `full`'s for the
same seed (schedule invariance); scheduling changes only decoding steps and wall time.
`stats.steps_lower_bound` is max(max r, ceil(sum r / m)) over the remaining lengths r of
the decode phase (probe steps counted apart, docs/ARCHITECTURE.md section 6).

    python train.py sampler=infinite predictor=hidden sampler.refill=lpt sampler.probe_tokens=8
"""
from __future__ import annotations

import time
from typing import Any

import torch

from samplers.base import (GenerationSpec, PredictorRecord, Rollouts, decoding_mode, sample_tokens,
                           uniforms, validate_request)
from samplers.engine import DecodeEngine, EngineResult, SampleId, to_rollouts
from samplers.kv import PromptKV, Suspended, prefill
from samplers.memory import kv_bytes_per_token, predict_peak_bytes, weight_bytes
from samplers.prediction import LengthPredictor, ProbeBatch
from samplers.scheduling import (REFILLS, SampleQueue, best_order, fifo_order, fptas_plan,
                                 planned_order, refill_order, steps_lower_bound)
from samplers.slots import SlotSettings

GROUPINGS = ("fptas", "none")


class InfiniteSampler:
    def __init__(self, micro_group_size: int | str, memory_budget_gb: float | None,
                 probe_tokens: int, refill: str, grouping: str, epsilon: float,
                 predictor: LengthPredictor, prompt_kv: str, gather_weights: bool) -> None:
        self.settings = SlotSettings(micro_group_size, memory_budget_gb, prompt_kv,
                                     gather_weights)
        self.gather_weights = gather_weights
        if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) \
                or probe_tokens < 0:
            raise ValueError(f"probe_tokens must be an int >= 0, got {probe_tokens!r}")
        if refill not in REFILLS:
            raise ValueError(f"refill must be one of {REFILLS}, got {refill!r}")
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
        self.probe_tokens, self.refill, self.grouping = probe_tokens, refill, grouping
        self.epsilon = epsilon
        if predictor is None:
            raise ValueError("sampler.predictor is null: the infinite sampler needs a length "
                             "predictor (predictor=history|oracle|minilm|hidden)")
        self.predictor = predictor
        # False while the caller samples another distribution than training's (greedy
        # validation): the predictor then predicts but is not refitted on those lengths.
        self.learning = True

    def bind(self, tokenizer: Any) -> None:
        """Give text predictors (minilm) the policy tokenizer to decode prompts and probes."""
        self.predictor.bind(tokenizer)

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        m = self.slots(model, prompts, group_size, spec)
        layout = self.settings.layout
        start = time.perf_counter()
        with decoding_mode(model):
            done, parked, store = self.probe(model, prompts, group_size, spec, m)
            samples = sorted(parked)
            batch = self.probe_batch(prompts, samples, parked)
            if self.predictor.needs_oracle:  # ablation only: a pre-pass with the same streams
                oracle_start = time.perf_counter()
                prepass = DecodeEngine(model, prompts, spec, m, layout, store=store,
                                       resume=parked).run(SampleQueue(samples))
                batch.true_remaining = remaining_lengths(prepass, samples, self.probe_tokens)
                oracle_s = time.perf_counter() - oracle_start
            # no sample can have more than max_new_tokens - k tokens left: a learned head
            # that extrapolates (exp of a log-length) must not wreck the plan
            predicted = self.predictor.predict(batch).float().reshape(-1).clamp(
                0, max(0, spec.max_new_tokens - self.probe_tokens))  # [n]
            plan, ranks = self.order(predicted.tolist(), m)
            order = [samples[x] for x in ranks]
            main = DecodeEngine(model, prompts, spec, m, layout, store=store,
                                resume=parked).run(SampleQueue(order))
        wall = time.perf_counter() - start - (oracle_s if self.predictor.needs_oracle else 0.0)
        true = remaining_lengths(main, samples, self.probe_tokens)
        if self.learning:
            self.predictor.observe(batch, true)
        # one result for the two phases: the probe's steps counted apart, the decode phase's
        # trace shifted past them; the store held every prompt for the whole call
        stats = done.stats.then(main.stats)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, sum(kv.nbytes for kv in store.values()))
        stats.wall_time_s = wall
        stats.predicted_peak_bytes = self.peak_bytes(model, prompts, group_size, spec, m)
        stats.predicted_sampling_bytes = stats.predicted_peak_bytes - weight_bytes(model)
        stats.steps_lower_bound = steps_lower_bound(true.tolist(), m)
        stats.predictor = PredictorRecord(self.predictor.name, self.probe_tokens,
                                          predicted.cpu(), true)
        stats.plan = plan
        store.clear()
        result = EngineResult({**done.completions, **main.completions},
                              {**done.finished, **main.finished},
                              done.finish_order + main.finish_order, stats=stats)
        return to_rollouts(result, len(prompts), group_size, spec)

    def peak_bytes(self, model: Any, prompts: list[list[int]], group_size: int,
                   spec: GenerationSpec, slots: int) -> int:
        """The engine's predicted peak plus what `infinite` keeps besides: every prompt's KV
        for the whole call (its own store, so the shared engine holds no prompt of its own)
        and the parked probe KV (k tokens of each of the B x G samples)."""
        per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
        kept = sum(len(p) for p in prompts) + len(prompts) * group_size * self.probe_tokens
        engine = predict_peak_bytes(model, prompts, spec, slots, self.settings.layout,
                                    live_prompts=0)
        return engine + kept * per_token

    def slots(self, model: Any, prompts: list[list[int]], group_size: int,
              spec: GenerationSpec) -> int:
        """m itself, or with `auto` the largest m whose peak (parked KV included) fits."""
        return self.settings.resolve(
            lambda m: self.peak_bytes(model, prompts, group_size, spec, m), group_size,
            len(prompts) * group_size, "that one slot plus the prompts and the parked probe KV "
            "need (lower probe_tokens or group_size)")

    def probe(self, model: Any, prompts: list[list[int]], group_size: int,
              spec: GenerationSpec, m: int
              ) -> tuple[EngineResult, dict[SampleId, Suspended], dict[int, PromptKV]]:
        """Prefill all prompts, then decode k tokens of every sample; returns (samples that
        ended inside the probe, parked samples, prompt store)."""
        device = next(model.parameters()).device
        hidden = self.predictor.needs_hidden
        start = time.perf_counter()
        store = {i: prefill(model, p, device, hidden) for i, p in enumerate(prompts)}
        prefill_s = time.perf_counter() - start
        queue = fifo_order(len(prompts), group_size)
        if self.probe_tokens == 0:
            done = first_tokens(store, queue, spec)
        else:
            done = DecodeEngine(model, prompts, spec, m, self.settings.layout, store=store,
                                capture_hidden=hidden, suspend_after=self.probe_tokens
                                ).run(SampleQueue(queue))
        done.stats.prefill_passes = len(prompts)
        done.stats.prefill_tokens = sum(len(p) for p in prompts)
        done.stats.prefill_time_s = prefill_s
        return done, done.suspended, store

    def probe_batch(self, prompts: list[list[int]], samples: list[SampleId],
                    parked: dict[SampleId, Suspended]) -> ProbeBatch:
        hidden = None
        if self.predictor.needs_hidden and samples:
            hidden = torch.stack([parked[s].hidden for s in samples]).float().cpu()  # [n, H]
        return ProbeBatch(
            prompts=prompts,
            prompt_index=torch.tensor([i for i, _ in samples], dtype=torch.long),
            sample_index=torch.tensor([j for _, j in samples], dtype=torch.long),
            probe_ids=[parked[s].tokens[:-1] for s in samples], hidden=hidden)

    def order(self, predicted: list[float], slots: int) -> tuple[str, list[int]]:
        """(name, admission order) from predicted lengths; the order indexes the parked samples.

        `grouping: none` is the refill order alone. `grouping: fptas` takes, of the FPTAS plan
        (each slot in refill order), the plain refill order and plain LPT, the one with the
        shortest predicted makespan (ties in that order), so it is never predicted worse than
        LPT, the classic makespan rule, even where balancing the sums fails.
        """
        if self.grouping == "none":
            return self.refill, refill_order(predicted, self.refill)
        plan = fptas_plan(predicted, slots, self.epsilon)
        candidates = {f"fptas+{self.refill}": planned_order(plan, predicted, self.refill),
                      self.refill: refill_order(predicted, self.refill),
                      "lpt": refill_order(predicted, "lpt")}
        name, order, _ = best_order(candidates, predicted, slots)
        return name, order


def first_tokens(store: dict[int, PromptKV], samples: list[SampleId],
                 spec: GenerationSpec) -> EngineResult:
    """k = 0: draw every sample's token 0 from its prompt's logits (no decoding step)."""
    done = EngineResult()
    if not samples:
        return done
    prompt = torch.tensor([i for i, _ in samples])
    index = torch.tensor([j for _, j in samples])
    logits = torch.stack([store[i].logits for i, _ in samples])  # [N, V]
    u = uniforms(spec.seed, prompt.to(logits.device), index.to(logits.device),
                 torch.zeros_like(index, device=logits.device))
    tokens = sample_tokens(logits, u, spec).tolist()
    for (i, j), token in zip(samples, tokens):
        if token in spec.eos_token_ids or spec.max_new_tokens == 1:
            done.completions[(i, j)] = [token]
            done.finished[(i, j)] = token in spec.eos_token_ids
            done.finish_order.append((i, j))
        else:
            kv = store[i]
            done.suspended[(i, j)] = Suspended([k[:, :0] for k in kv.keys],
                                               [v[:, :0] for v in kv.values], [token],
                                               kv.hidden)
    done.stats.generated_tokens = sum(map(len, done.completions.values()))
    return done


def remaining_lengths(result: EngineResult, samples: list[SampleId], k: int) -> torch.Tensor:
    """True remaining tokens after the probe: L - k for each parked sample."""
    return torch.tensor([len(result.completions[s]) - k for s in samples], dtype=torch.long)
