"""`infinite` sampler: continuous sampling on m slots, scheduled by length (attained or predicted).

One `sample()` call (B prompts x G samples, m slots) is one continuous stream:

1. Prefill every prompt once (its KV is shared by all its samples for the whole call).
2. Every sample starts in the stream. Its first k = `probe_tokens` tokens are its probe: when it
   reaches them, the predictor (config group `predictor=oracle|history|minilm|hidden`,
   `predictors/`) is asked for its remaining length. The probe costs no phase of its own.
   (With k = 0, and for the oracle, which needs no probe, every sample is predicted before
   anything runs.)
3. Every k tokens a running sample may be parked (its KV leaves the slot, nothing is
   recomputed; samplers/engine.py) so that a waiting sample with a better key runs, within
   `park_fraction` x the slot cache of parked KV (`samplers.scheduling.StreamQueue`):
   - `schedule: attained` runs the least decoded samples first (every sample gets k tokens
     before any gets 2k, ...): the long samples progress together and the tail stays short
     whatever the predictions are worth;
   - `schedule: predicted` starts the unprobed samples first, then runs the probed ones in the
     `refill` order of their predicted remaining length (`lpt`: longest first, preemptive;
     `sjf`: shortest first, the paper's rule; `fifo`);
   - `schedule: continuous` parks nothing: plain refill in (prompt, sample) order, exactly the
     `continuous` sampler;
   - `schedule: auto` (default) takes, at each call, the one of these three with the fewest
     expected decoding steps when the predictor errs as it has erred so far: each is simulated
     (`simulate_stream`, the engine's own stepping) on calls made of B prompt groups drawn
     from the recent ones, every sample with its true length and the prediction it really
     got (so a predictor that cannot tell siblings apart gets no credit for it; `predicted`
     only once MIN_RECORD samples were predicted). With no record yet: `attained` (the
     oracle, whose error is zero by construction: `predicted`).
4. After the call the predictor gets the true remaining lengths of the samples it was asked
   about, so it refits online as the policy drifts; their errors feed the next `auto` choice.

Every sample draws its tokens from its own stream, so the completions equal `full`'s for the
same seed (schedule invariance); scheduling changes only decoding steps and wall time.
`stats.steps_lower_bound` is max(max L, ceil(sum L / m)) over all the call's lengths.

    python train.py sampler=infinite predictor=hidden sampler.schedule=predicted sampler.refill=lpt
"""
from __future__ import annotations

import math
import random
import time
from collections import deque
from typing import Any

import torch

from samplers.base import GenerationSpec, PredictorRecord, Rollouts, decoding_mode, validate_request
from samplers.engine import DecodeEngine, SampleId, to_rollouts
from samplers.kv import PromptKV, prefill
from samplers.memory import kv_bytes_per_token, predict_peak_bytes, weight_bytes
from samplers.prediction import LengthPredictor, ProbeBatch
from samplers.scheduling import (REFILLS, SCHEDULES, BoundaryRow, SampleQueue, StreamQueue,
                                 fifo_order, simulate_stream, steps_lower_bound)
from samplers.slots import SlotSettings

RECORD = 256  # recent prompt groups kept for the `auto` choice
SCENARIOS = 8  # simulated calls per `auto` choice
MIN_RECORD = 8  # predicted samples needed before `auto` tries `predicted`

Group = list[tuple[int, float | None]]  # one prompt's samples: (length, prediction or None)


class InfiniteSampler:
    def __init__(self, micro_group_size: int | str, memory_budget_gb: float | None,
                 probe_tokens: int, schedule: str, refill: str, park_fraction: float,
                 predictor: LengthPredictor, prompt_kv: str, gather_weights: bool) -> None:
        self.settings = SlotSettings(micro_group_size, memory_budget_gb, prompt_kv,
                                     gather_weights)
        self.gather_weights = gather_weights
        if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) \
                or probe_tokens < 0:
            raise ValueError(f"probe_tokens must be an int >= 0, got {probe_tokens!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if refill not in REFILLS:
            raise ValueError(f"refill must be one of {REFILLS}, got {refill!r}")
        if isinstance(park_fraction, bool) or not isinstance(park_fraction, (int, float)) \
                or not 0 <= park_fraction < math.inf:
            raise ValueError(f"park_fraction must be a number >= 0, got {park_fraction!r}")
        self.probe_tokens, self.schedule, self.refill = probe_tokens, schedule, refill
        self.park_fraction = float(park_fraction)
        if predictor is None:
            raise ValueError("sampler.predictor is null: the infinite sampler needs a length "
                             "predictor (predictor=history|oracle|minilm|hidden)")
        self.predictor = predictor
        # False while the caller samples another distribution than training's (greedy
        # validation): the predictor then predicts but is not refitted on those lengths.
        self.learning = True
        self.record: deque[Group] = deque(maxlen=RECORD)  # the recent calls' prompt groups

    def bind(self, tokenizer: Any) -> None:
        """Give text predictors (minilm) the policy tokenizer to decode prompts and probes."""
        self.predictor.bind(tokenizer)

    def sample(self, model: Any, prompts: list[list[int]], group_size: int,
               spec: GenerationSpec) -> Rollouts:
        validate_request(model, prompts, group_size, spec)
        m = self.slots(model, prompts, group_size, spec)
        layout, k = self.settings.layout, self.probe_tokens
        hidden = self.predictor.needs_hidden
        samples = fifo_order(len(prompts), group_size)
        start = time.perf_counter()
        with decoding_mode(model):
            store = self.prefill(model, prompts, hidden)
            prefill_s = time.perf_counter() - start
            truth, oracle_s = None, 0.0
            if self.predictor.needs_oracle:  # ablation only: a pre-pass with the same streams
                oracle_start = time.perf_counter()
                prepass = DecodeEngine(model, prompts, spec, m, layout, store=store
                                       ).run(SampleQueue(samples))
                truth = {s: len(c) for s, c in prepass.completions.items()}
                oracle_s = time.perf_counter() - oracle_start
            asked: list[BoundaryRow] = []
            predicted: list[float] = []

            def predict(rows: list[BoundaryRow]) -> list[float]:
                batch = self.probe_batch(prompts, rows, truth)
                # no sample has more than max_new_tokens minus its decoded tokens left: a
                # learned head that extrapolates (exp of a log-length) must not wreck the order
                left = max(0, spec.max_new_tokens - rows[0].attained)
                values = self.predictor.predict(batch).float().reshape(-1).clamp(0, left).tolist()
                asked.extend(rows)
                predicted.extend(values)
                return values

            upfront = None
            if k == 0 or truth is not None:  # from the prompt alone (the oracle: it knows)
                rows = [BoundaryRow(s, 0, [], store[s[0]].hidden) for s in samples]
                upfront = dict(zip(samples, predict(rows)))
            schedule = self.choose(len(prompts), m, spec)
            queue = StreamQueue(samples, k, self.park_tokens(m, spec, schedule),
                                "attained" if schedule == "continuous" else schedule,
                                self.refill, predict, upfront)
            result = DecodeEngine(model, prompts, spec, m, layout, store=store,
                                  capture_hidden=hidden).run(queue)
        lengths = {s: len(c) for s, c in result.completions.items()}
        true = torch.tensor([lengths[r.sample] - r.attained for r in asked], dtype=torch.long)
        if self.learning:
            if asked:
                self.predictor.observe(self.probe_batch(prompts, asked, truth), true)
            guesses = {r.sample: p for r, p in zip(asked, predicted)}
            self.record.extend([(lengths[(i, j)], guesses.get((i, j)))
                                for j in range(group_size)] for i in range(len(prompts)))
        stats = result.stats
        stats.wall_time_s = time.perf_counter() - start - oracle_s
        stats.prefill_passes, stats.prefill_time_s = len(prompts), prefill_s
        stats.prefill_tokens = sum(len(p) for p in prompts)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, sum(kv.nbytes for kv in store.values()))
        stats.predicted_peak_bytes = self.peak_bytes(model, prompts, group_size, spec, m)
        stats.predicted_sampling_bytes = stats.predicted_peak_bytes - weight_bytes(model)
        stats.steps_lower_bound = steps_lower_bound([lengths[s] for s in samples], m)
        stats.predictor = PredictorRecord(self.predictor.name, k,
                                          torch.tensor(predicted, dtype=torch.float), true)
        stats.schedule, stats.parks = schedule, queue.parks
        store.clear()
        return to_rollouts(result, len(prompts), group_size, spec)

    @staticmethod
    def prefill(model: Any, prompts: list[list[int]], hidden: bool) -> dict[int, PromptKV]:
        device = next(model.parameters()).device
        return {i: prefill(model, p, device, hidden) for i, p in enumerate(prompts)}

    def park_tokens(self, slots: int, spec: GenerationSpec, schedule: str = "attained") -> int:
        """The parked-KV budget in tokens: `park_fraction` of the slots' completion columns
        (none for `continuous`)."""
        if schedule == "continuous":
            return 0
        return int(self.park_fraction * slots * spec.max_new_tokens)

    def choose(self, prompts: int, slots: int, spec: GenerationSpec) -> str:
        """The schedule of this call: the configured one, or with `auto` the one with the
        fewest simulated decoding steps (ties: the simpler, in the order continuous, attained,
        predicted) on SCENARIOS calls of `prompts` groups drawn from the recorded ones."""
        if self.schedule != "auto":
            return self.schedule
        if not self.record:
            return "predicted" if self.predictor.needs_oracle else "attained"
        rng, k = random.Random(spec.seed), self.probe_tokens
        groups = list(self.record)
        steps = dict.fromkeys(("continuous", "attained", "predicted"), 0)
        if sum(p is not None for g in groups for _, p in g) < MIN_RECORD:
            del steps["predicted"]
        for _ in range(SCENARIOS):
            call = [sample for _ in range(prompts) for sample in rng.choice(groups)]
            drawn = [n for n, _ in call]
            guess = [0.0 if p is None else p for _, p in call]
            for name in steps:
                steps[name] += simulate_stream(
                    drawn, guess, slots, k, self.park_tokens(slots, spec, name),
                    "attained" if name == "continuous" else name, self.refill,
                    upfront=self.predictor.needs_oracle)
        return min(steps, key=steps.__getitem__)

    def peak_bytes(self, model: Any, prompts: list[list[int]], group_size: int,
                   spec: GenerationSpec, slots: int) -> int:
        """The engine's predicted peak plus what `infinite` keeps besides: every prompt's KV
        for the whole call (its own store, so the shared engine holds no prompt of its own)
        and the parked samples: their KV, at most the budget, and their next-token logits
        (float32, or the weights' wider dtype; each parked sample holds at least k tokens, so
        at most budget / k of them)."""
        dtype = next(model.parameters()).dtype
        per_token = kv_bytes_per_token(model.config, dtype)
        budget = self.park_tokens(slots, spec)
        kept = sum(len(p) for p in prompts) + budget
        parked = min(budget // max(1, self.probe_tokens), len(prompts) * group_size)
        vocab = model.config.get_text_config().vocab_size
        engine = predict_peak_bytes(model, prompts, spec, slots, self.settings.layout,
                                    live_prompts=0)
        element = max(4, torch.tensor([], dtype=dtype).element_size())
        return engine + kept * per_token + parked * vocab * element

    def slots(self, model: Any, prompts: list[list[int]], group_size: int,
              spec: GenerationSpec) -> int:
        """m itself, or with `auto` the largest m whose peak (parked KV included) fits."""
        return self.settings.resolve(
            lambda m: self.peak_bytes(model, prompts, group_size, spec, m), group_size,
            len(prompts) * group_size, "that one slot plus the prompts and the parked KV "
            "need (lower park_fraction or group_size)")

    def probe_batch(self, prompts: list[list[int]], rows: list[BoundaryRow],
                    truth: dict[SampleId, int] | None) -> ProbeBatch:
        hidden = None
        if self.predictor.needs_hidden and rows:
            hidden = torch.stack([r.hidden for r in rows]).float().cpu()  # [n, H]
        batch = ProbeBatch(
            prompts=prompts,
            prompt_index=torch.tensor([r.sample[0] for r in rows], dtype=torch.long),
            sample_index=torch.tensor([r.sample[1] for r in rows], dtype=torch.long),
            probe_ids=[list(r.tokens) for r in rows], hidden=hidden)
        if truth is not None:
            batch.true_remaining = torch.tensor([truth[r.sample] - r.attained for r in rows],
                                                dtype=torch.long)
        return batch
