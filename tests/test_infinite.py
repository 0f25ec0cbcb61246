"""The `infinite` sampler: exactness against `full`, parking and its step cost by hand, the
engine against the queue's simulation, the fallback when predictions are useless, predictor
wiring (probe tokens, hidden states, online observe), memory, and config validation."""
from __future__ import annotations

import random

import pytest
import torch

from predictors import HistoryPredictor, OraclePredictor, hidden_predictor
from samplers.base import GenerationSpec
from samplers.scheduling import list_schedule_makespan, simulate_stream, steps_lower_bound
from tests.helpers import (ForwardCounter, PROMPTS, SPEC, ScriptedLM, completions,
                           continuous_sampler, full_sampler, infinite_sampler, micro_sampler,
                           tiny_lm)

SCRIPTED = GenerationSpec(max_new_tokens=64, eos_token_ids=(ScriptedLM.EOS,))


def scripted(sampler, lengths):
    """One prompt per sample whose completion has the given length (ScriptedLM)."""
    r = sampler.sample(ScriptedLM(), [[n, 4] for n in lengths], 1, SCRIPTED)
    assert r.lengths.tolist() == list(lengths)
    return r


@pytest.fixture(scope="module")
def reference(model):
    r = full_sampler().sample(model, PROMPTS, 7, SPEC)
    assert len(set(r.lengths.tolist())) > 3  # lengths vary, so schedules differ
    return r


@pytest.mark.parametrize("k, predictor, schedules, fractions", [
    (0, OraclePredictor, ("predicted", "attained"), (0.5,)),
    (1, HistoryPredictor, ("attained", "predicted", "auto"), (0.0, 0.3, 4.0)),
    (3, OraclePredictor, ("attained", "predicted"), (0.2, 4.0)),
    (2, hidden_predictor, ("auto",), (4.0,)),
    (25, hidden_predictor, ("attained",), (4.0,)),
])
def test_schedule_invariance_against_full(model, reference, k, predictor, schedules, fractions):
    """float64: the same completions as `full` for every probe length, predictor, schedule,
    refill order and parking budget, however often a sample is parked and resumed (k = 25 >
    max_new_tokens: no sample reaches a boundary)."""
    pred, parks = predictor(), 0
    for schedule in schedules:
        for fraction in fractions:
            for refill in ("lpt", "sjf"):
                sampler = infinite_sampler(3, probe_tokens=k, schedule=schedule, refill=refill,
                                           park_fraction=fraction, predictor=pred)
                with ForwardCounter(model) as seen:
                    r = sampler.sample(model, PROMPTS, 7, SPEC)
                assert completions(r) == completions(reference), (schedule, fraction, refill)
                assert torch.equal(r.finished, reference.finished)
                assert seen.prefills == r.stats.prefill_passes == len(PROMPTS)
                assert r.stats.max_concurrency <= 3
                parks += r.stats.parks
    if k in (1, 3):
        assert parks > 0  # the settings above do park


def test_parking_costs_no_step_by_hand():
    """Lengths 7 and 3 on one slot, k = 2, `attained`. Steps 0-1: sample 0 draws and feeds 2
    tokens; its KV now holds k tokens and sample 1 (nothing decoded) waits, so it is parked.
    Steps 2-4: sample 1 draws its 3 tokens and ends. Steps 5-9: sample 0 returns with its KV
    and next-token logits and draws its 5 last tokens. 10 steps, as plain refill
    (`continuous`) takes: a park costs no step."""
    r = scripted(infinite_sampler(1, probe_tokens=2, schedule="attained", park_fraction=1.0,
                                  predictor=HistoryPredictor()), [7, 3])
    assert (r.stats.decoding_steps, r.stats.parks, r.stats.schedule) == (10, 1, "attained")
    spans = sorted((start, end, sample) for _, sample, start, end in r.stats.slot_trace)
    assert spans == [(0, 1, (0, 0)), (2, 4, (1, 0)), (5, 9, (0, 0))]
    assert scripted(continuous_sampler(1), [7, 3]).stats.decoding_steps == 10


def test_attained_starts_every_sample_before_the_long_one_finishes_by_hand():
    """Lengths 4, 4, 4, 4, 12 on 2 slots, k = 2, unlimited budget, the history predictor
    (nothing observed yet: one default prediction for all, so equal levels go by order).
    `continuous` runs the pairs (steps 0-3, 4-7) and starts the 12-token sample at step 8: 20
    steps. `attained`, by hand (key: tokens // k, then order): samples 0 and 1 are parked
    after 2 tokens (step 1) for 2 and 3; sample 3 is parked after 2 tokens (step 3) for
    sample 4, which starts at step 4; sample 2 ends at step 5 and
    sample 0 returns; at step 7 sample 0 ends and sample 4, at 4 tokens (level 2), is parked
    for the level-1 samples 1 and 3 (steps 8-9); it returns at step 10 and ends at step 17.
    18 steps, 4 parks; the bound is max(12, 28 / 2) = 14."""
    lengths = [4, 4, 4, 4, 12]
    assert scripted(continuous_sampler(2), lengths).stats.decoding_steps == 20
    r = scripted(infinite_sampler(2, probe_tokens=2, schedule="attained", park_fraction=10.0,
                                  predictor=HistoryPredictor()), lengths)
    assert (r.stats.decoding_steps, r.stats.parks) == (18, 4)
    spans = sorted((start, end, sample[0]) for _, sample, start, end in r.stats.slot_trace)
    assert spans == [(0, 1, 0), (0, 1, 1), (2, 3, 3), (2, 5, 2), (4, 7, 4), (6, 7, 0),
                     (8, 9, 1), (8, 9, 3), (10, 17, 4)]
    assert r.stats.steps_lower_bound == 14


@pytest.mark.parametrize("k", [1, 3])
def test_no_budget_is_plain_continuous_refill(k):
    """park_fraction = 0: nothing is ever parked, and `attained` keeps (prompt, sample) order,
    so every call takes exactly the steps of the `continuous` sampler (the reference)."""
    rng = random.Random(k)
    for _ in range(6):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(3, 12))]
        m = rng.randint(1, 4)
        r = scripted(infinite_sampler(m, probe_tokens=k, schedule="attained", park_fraction=0.0,
                                      predictor=HistoryPredictor()), lengths)
        assert r.stats.parks == 0
        assert r.stats.decoding_steps == scripted(continuous_sampler(m),
                                                  lengths).stats.decoding_steps


class Exact(HistoryPredictor):
    """Exact remaining lengths from the scripted model's hidden state [L, tokens fed] at the
    probe: a probe-based predictor without error (the oracle needs no probe)."""
    name, needs_hidden = "exact", True

    def predict(self, batch):
        return (batch.hidden[:, 0] - batch.hidden[:, 1]).float()


def test_simulation_takes_the_engines_steps():
    """`simulate_stream` (Table C and the `auto` choice) against the real engine on scripted
    lengths: the same decoding steps for random lengths, slots, k, budgets, schedules and
    refill orders, with exact predictions made at the probe (`Exact`) and before anything
    runs (the oracle)."""
    rng = random.Random(0)
    for trial in range(40):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        m, k = rng.randint(1, 4), rng.choice([0, 1, 2, 3, 5])
        fraction = rng.choice([0.0, 0.1, 0.5, 3.0])
        schedule, refill = rng.choice(["attained", "predicted"]), rng.choice(["lpt", "sjf", "fifo"])
        oracle = trial % 2 == 0
        r = scripted(infinite_sampler(m, probe_tokens=k, schedule=schedule, refill=refill,
                                      park_fraction=fraction,
                                      predictor=OraclePredictor() if oracle else Exact()),
                     lengths)
        predicted = lengths if oracle else [max(n - k, 0) for n in lengths]
        steps = simulate_stream(lengths, predicted, m, k, int(fraction * m * 64), schedule,
                                refill, upfront=oracle)
        assert steps == r.stats.decoding_steps, (trial, lengths, m, k, fraction, schedule)


def test_auto_falls_back_when_predictions_are_useless():
    """A bimodal synthetic workload (a third of the samples run 60 tokens, the rest 2-20) and a
    predictor that answers at random: once the first call has recorded lengths and errors,
    `auto` simulates the three schedules and never takes `predicted`. No call takes more than
    1.02 x the steps of `continuous` on the same lengths (that sampler run on the same
    prompts). With the oracle, whose errors are zero, `auto` takes `predicted`."""

    class Random(HistoryPredictor):
        def __init__(self) -> None:
            super().__init__()
            self.rng = torch.Generator().manual_seed(0)

        def predict(self, batch):
            return torch.rand(len(batch), generator=self.rng) * 64

    rng = random.Random(1)
    useless = infinite_sampler(4, predictor=Random())
    oracle = infinite_sampler(4, probe_tokens=4, predictor=OraclePredictor())
    taken = []
    for call in range(4):
        lengths = [60 if rng.random() < 1 / 3 else rng.randint(2, 20) for _ in range(24)]
        cont = scripted(continuous_sampler(4), lengths).stats.decoding_steps
        r = scripted(useless, lengths)
        taken.append(r.stats.schedule)
        assert r.stats.decoding_steps <= 1.02 * cont, (call, r.stats.decoding_steps, cont)
        assert scripted(oracle, lengths).stats.schedule == "predicted"
    assert taken[0] == "attained" and "predicted" not in taken
    assert len(useless.record) == 4 * 24  # the groups the later choices were made on


def test_predictor_sees_probe_and_hidden_and_is_refitted():
    """Each sample that reaches k tokens is predicted once, from its own probe tokens and the
    hidden state at its last probe token, and refitted with its true remaining length."""
    lengths, k = [10, 4, 7, 12, 6], 2
    seen = {"batches": []}
    spy = hidden_predictor(refit_steps=1)
    predict, observe = spy.predict, spy.observe

    def seen_predict(batch):
        seen["batches"].append(batch)
        return predict(batch)

    def seen_observe(batch, remaining):
        seen["observed"] = (batch, remaining)
        observe(batch, remaining)

    spy.predict, spy.observe = seen_predict, seen_observe
    r = scripted(infinite_sampler(2, probe_tokens=k, predictor=spy), lengths)
    asked = [int(i) for batch in seen["batches"] for i in batch.prompt_index]
    assert sorted(asked) == [0, 1, 2, 3, 4]  # each sample once
    for batch in seen["batches"]:
        assert batch.probe_ids == [[ScriptedLM.FILLER] * k] * len(batch)
        # hidden = [L, tokens fed] at the last probe token (the scripted model's features)
        assert batch.hidden.tolist() == [[lengths[i], k] for i in batch.prompt_index.tolist()]
    batch, remaining = seen["observed"]
    assert remaining.tolist() == [lengths[i] - k for i in batch.prompt_index.tolist()]
    assert r.stats.predictor.true.tolist() == remaining.tolist()
    assert len(r.stats.predictor.predicted) == len(lengths)


def test_parked_kv_stays_within_its_budget(model):
    """The parked KV is counted in the measured peak, and the memory planner's prediction
    (slots + prompts + the park budget) bounds it."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    none = infinite_sampler(2, park_fraction=0.0, probe_tokens=2).sample(model, PROMPTS, 8, SPEC)
    some = infinite_sampler(2, park_fraction=1.0, probe_tokens=2, schedule="attained").sample(
        model, PROMPTS, 8, SPEC)
    assert some.stats.parks > 0 and none.stats.parks == 0
    assert some.stats.peak_kv_bytes > none.stats.peak_kv_bytes
    for r in (none, some):
        assert r.stats.peak_kv_bytes <= r.stats.predicted_peak_bytes - weights


def test_budget_limits_parking_exactly():
    """Lengths 5, 5, 5 on one slot, k = 1, `attained`, a budget of 1 token. Sample 0 is parked
    after 1 token (step 0) for sample 1. From then on every boundary finds a waiting sample of
    a lower level, but parking would hold more than 1 token: sample 1 runs to its end (steps
    1-5), the freed slot takes sample 2 (level 0 before sample 0's level 1; steps 6-10), then
    sample 0 returns (steps 11-14). 15 steps, 1 park."""
    sampler = infinite_sampler(1, probe_tokens=1, schedule="attained", park_fraction=1 / 64,
                               predictor=HistoryPredictor())
    assert sampler.park_tokens(1, SCRIPTED) == 1
    r = scripted(sampler, [5, 5, 5])
    assert (r.stats.parks, r.stats.decoding_steps) == (1, 15)
    spans = sorted((start, end, sample[0]) for _, sample, start, end in r.stats.slot_trace)
    assert spans == [(0, 0, 0), (1, 5, 1), (6, 10, 2), (11, 14, 0)]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(probe_tokens=-1), "probe_tokens"), (dict(refill="rr"), "refill"),
    (dict(schedule="greedy"), "schedule"), (dict(park_fraction=-0.1), "park_fraction"),
    (dict(park_fraction="half"), "park_fraction"), (dict(micro_group_size=0), "micro_group_size"),
    (dict(micro_group_size="auto"), "memory_budget_gb"),
])
def test_bad_config_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        infinite_sampler(**kwargs)


def test_auto_slots_count_the_park_budget(model):
    """`auto` m under a budget: the parked-KV budget (park_fraction x m x max_new_tokens
    tokens) is in the prediction, so a larger fraction gets fewer slots."""
    spec = GenerationSpec(8, eos_token_ids=(3,))
    budget = infinite_sampler(park_fraction=1.0).peak_bytes(model, PROMPTS, 64, spec, 3) + 1
    m0 = infinite_sampler("auto", budget / (1 << 30), park_fraction=0.0).slots(model, PROMPTS,
                                                                               64, spec)
    parked = infinite_sampler("auto", budget / (1 << 30), park_fraction=1.0)
    m1 = parked.slots(model, PROMPTS, 64, spec)
    assert m1 == 3 and m0 > m1
    assert parked.peak_bytes(model, PROMPTS, 64, spec, m1) <= budget < \
        parked.peak_bytes(model, PROMPTS, 64, spec, m1 + 1)
    r = parked.sample(model, PROMPTS, 64, spec)
    assert r.stats.slots == m1 and r.stats.max_concurrency <= m1
    with pytest.raises(ValueError, match="memory_budget_gb"):
        infinite_sampler("auto", budget / (1 << 30), park_fraction=64.0).slots(model, PROMPTS,
                                                                               64, spec)


@pytest.mark.parametrize("k", [0, 2, 6])
def test_slot_utilization_means_the_same_for_infinite(k):
    """Busy row-steps / (steps x m) is at most 1 whatever k, parks included."""
    from callbacks.sampling import sampling_metrics

    lengths, m = [3, 2, 5, 1, 4], 2
    r = scripted(infinite_sampler(m, probe_tokens=k, predictor=OraclePredictor()), lengths)
    util = sampling_metrics(r)["sampling/slot_utilization"]
    busy = sum(end - start + 1 for _, _, start, end in r.stats.slot_trace)
    assert util == pytest.approx(busy / (r.stats.decoding_steps * m)) and 0 < util <= 1


def test_slot_utilization_of_micro_rounds_by_hand():
    """`micro`, m = 2, G = 3, completions of 3 and 5 tokens: rounds [3, 3], [3, 5], [5, 5]
    take 3 + 5 + 5 = 13 steps on 2 slots with 24 busy row-steps: 24 / 26."""
    from callbacks.sampling import sampling_metrics

    r = micro_sampler(2).sample(ScriptedLM(), [[3, 4], [5, 4]], 3, SCRIPTED)
    assert r.stats.decoding_steps == 13
    assert sampling_metrics(r)["sampling/slot_utilization"] == pytest.approx(24 / 26)


@pytest.mark.parametrize("predictor", ["history", "oracle"])
def test_each_prompt_is_prefilled_exactly_once(predictor):
    """Counted by a forward hook on the model (forwards over more than one token per row are
    prompt prefills), not by the engine's counters; the stats report the same number."""
    model = tiny_lm(seed=3)
    prompts = [[5, 9, 11, 2], [7, 3, 8], [4, 4, 6, 1, 2]]
    widths = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    chosen = OraclePredictor() if predictor == "oracle" else HistoryPredictor()
    spec = GenerationSpec(max_new_tokens=12, seed=1)
    r = infinite_sampler(2, probe_tokens=2, predictor=chosen).sample(model, prompts, 3, spec)
    hook.remove()
    prefills = sum(1 for w in widths if w > 1)
    assert prefills == len(prompts)
    assert r.stats.prefill_passes == prefills
    assert r.stats.prefill_tokens == sum(len(p) for p in prompts)


def test_whole_call_steps_against_continuous_and_the_bound_by_hand():
    """Lengths 10, 4, 7, 12, 6 on m = 2. Continuous refill in (prompt, sample) order, by hand:
    slot A runs 10 then 12 (ends 22), slot B 4, 7, 6 (ends 17): 22 steps, which the
    `continuous` sampler takes too. The bound is max(12, ceil(39 / 2)) = 20. The metrics of an
    `infinite` call compare its steps with the same two numbers (the 4, 4, 4, 4, 12 case of
    `test_attained_starts_every_sample_before_the_long_one_finishes_by_hand`: 18 steps
    against 20 and 14)."""
    from callbacks.sampling import sampling_metrics

    lengths, m = [10, 4, 7, 12, 6], 2
    cont = scripted(continuous_sampler(m), lengths)
    assert cont.stats.decoding_steps == 22 == list_schedule_makespan(lengths, m)
    metrics = sampling_metrics(cont)
    assert metrics["sampling/continuous_steps"] == 22 and metrics["sampling/total_steps"] == 22
    assert metrics["sampling/total_over_continuous"] == 1.0
    assert metrics["sampling/total_over_lb"] == pytest.approx(22 / 20)
    r = scripted(infinite_sampler(2, probe_tokens=2, schedule="attained", park_fraction=10.0,
                                  predictor=HistoryPredictor()), [4, 4, 4, 4, 12])
    metrics = sampling_metrics(r)
    assert metrics["sampling/total_steps"] == 18 and metrics["sampling/continuous_steps"] == 20
    assert metrics["sampling/total_over_continuous"] == pytest.approx(18 / 20)
    assert metrics["sampling/steps_over_lb"] == pytest.approx(18 / 14)
    assert metrics["sampling/parks"] == 4 and metrics["sampling/schedule_attained"] == 1
    assert r.stats.steps_lower_bound == steps_lower_bound([4, 4, 4, 4, 12], 2) == 14
    # dynamic continuous keeps the first finishers: no comparison on its biased lengths
    dynamic = continuous_sampler(m, mode="dynamic").sample(ScriptedLM(), [[n, 4] for n in lengths],
                                                           1, SCRIPTED)
    assert "sampling/total_over_continuous" not in sampling_metrics(dynamic)
