"""The `infinite` sampler: exactness against `full`, probe/resume, oracle schedules at the
lower bound, predictor wiring (ProbeBatch, online observe), and its config validation."""
from __future__ import annotations

import pytest
import torch

from samplers.base import GenerationSpec
from predictors import hidden_predictor, HistoryPredictor, OraclePredictor
from samplers.scheduling import REFILLS, steps_lower_bound
from tests.helpers import (ForwardCounter, PROMPTS, SPEC, ScriptedLM, completions,
                           continuous_sampler, full_sampler, infinite_sampler, micro_sampler,
                           tiny_lm)

SCRIPTED = GenerationSpec(max_new_tokens=64, eos_token_ids=(ScriptedLM.EOS,))






@pytest.fixture(scope="module")
def reference(model):
    r = full_sampler().sample(model, PROMPTS, 7, SPEC)
    assert len(set(r.lengths.tolist())) > 3  # lengths vary, so schedules differ
    return r


VARIANTS = [(refill, grouping) for refill in REFILLS for grouping in ("fptas", "none")]


@pytest.mark.parametrize("k, predictor, variants", [
    (0, OraclePredictor, VARIANTS), (3, HistoryPredictor, VARIANTS),
    (1, hidden_predictor, VARIANTS[:2]), (25, hidden_predictor, VARIANTS[:1]),
])
def test_schedule_invariance_against_full(model, reference, k, predictor, variants):
    """float64: the same completions as `full` for every probe length, predictor and plan
    (k = 25 > max_new_tokens: every sample ends inside the probe)."""
    pred = predictor()
    for refill, grouping in variants:
        sampler = infinite_sampler(3, probe_tokens=k, refill=refill, grouping=grouping,
                                  predictor=pred)
        with ForwardCounter(model) as seen:
            r = sampler.sample(model, PROMPTS, 7, SPEC)
        assert completions(r) == completions(reference), (refill, grouping)
        assert torch.equal(r.finished, reference.finished)
        assert seen.prefills == r.stats.prefill_passes == len(PROMPTS)
        assert r.stats.max_concurrency <= 3


@pytest.mark.parametrize("lengths, m", [
    ([8, 4, 4, 4, 4], 2),          # FIFO: 16 steps; a balanced plan: 12 = LB
    ([3, 3, 2, 2, 2], 2),          # LPT alone: 7; optimum = LB = 6
    ([9, 2, 2, 1, 3, 3, 6], 3),    # LB = max L = 9
    ([5, 5, 5, 5, 1, 1, 1, 1, 4, 4, 4, 4], 4),
])
def test_oracle_reaches_the_lower_bound(lengths, m):
    """Hand-made lengths (one prompt per sample) where LB is reachable: fptas + oracle hits it."""
    model = ScriptedLM()
    prompts = [[n, 4, 4] for n in lengths]
    sampler = infinite_sampler(m, probe_tokens=0, refill="lpt", predictor=OraclePredictor())
    r = sampler.sample(model, prompts, 1, SCRIPTED)
    assert r.lengths.tolist() == lengths and bool(r.finished.all())
    parked = [n for n in lengths if n > 1]  # L = 1 ends with the token drawn at prefill
    assert r.stats.steps_lower_bound == steps_lower_bound(parked, m)
    assert r.stats.decoding_steps == steps_lower_bound(parked, m)
    assert r.stats.probe_steps == 0


def test_probe_steps_and_remaining_work():
    """k probe tokens: each sample with L > k + 1 is parked and takes exactly L - k decode-phase
    row-steps; the probe takes k + 1 steps per wave of m samples."""
    lengths, m, k = [10, 3, 7, 2, 12, 6], 3, 2
    model = ScriptedLM()
    r = infinite_sampler(m, probe_tokens=k, predictor=OraclePredictor()).sample(
        model, [[n, 4] for n in lengths], 1, SCRIPTED)
    stats = r.stats
    assert r.lengths.tolist() == lengths
    assert stats.probe_steps == 2 * (k + 1)  # two waves of three
    parked = [n - k for n in lengths if n > k + 1]
    assert stats.predictor.true.tolist() == parked
    assert torch.equal(stats.predictor.predicted, torch.tensor(parked, dtype=torch.float))
    assert stats.steps_lower_bound == steps_lower_bound(parked, m)
    assert r.stats.decoding_steps == steps_lower_bound(parked, m)  # the oracle plan is tight
    trace = stats.slot_trace
    assert len(trace) == len(lengths) + len(parked)  # probe spans + decode-phase spans
    assert all(start >= stats.probe_steps for _, s, start, _ in trace[len(lengths):])


def test_predictor_sees_probe_and_hidden_and_is_refitted():
    lengths, k = [10, 4, 7, 12, 6], 2
    model = ScriptedLM()
    seen = {}

    spy = hidden_predictor(refit_steps=1)
    predict, observe = spy.predict, spy.observe

    def seen_predict(batch):
        seen["batch"] = batch
        return predict(batch)

    def seen_observe(batch, remaining):
        seen["remaining"] = remaining
        observe(batch, remaining)

    spy.predict, spy.observe = seen_predict, seen_observe
    r = infinite_sampler(2, probe_tokens=k, predictor=spy).sample(
        model, [[n, 4] for n in lengths], 1, SCRIPTED)
    batch = seen["batch"]
    assert batch.probe_ids == [[ScriptedLM.FILLER] * k] * 5
    assert batch.prompt_index.tolist() == [0, 1, 2, 3, 4]
    # hidden = [L, tokens fed] at the last probe token (the scripted model's features)
    assert batch.hidden.tolist() == [[n, k] for n in lengths]
    assert seen["remaining"].tolist() == [n - k for n in lengths]
    assert len(r) == 5


def test_memory_counts_parked_probe_kv(model):
    base = infinite_sampler(2, probe_tokens=0).sample(model, PROMPTS, 8, SPEC)
    probed = infinite_sampler(2, probe_tokens=6).sample(model, PROMPTS, 8, SPEC)
    assert probed.stats.peak_kv_bytes > base.stats.peak_kv_bytes  # parked k-token KV


@pytest.mark.parametrize("kwargs, argument", [
    (dict(probe_tokens=-1), "probe_tokens"), (dict(refill="rr"), "refill"),
    (dict(grouping="greedy"), "grouping"), (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=1.5), "epsilon"), (dict(micro_group_size=0), "micro_group_size"),
    (dict(micro_group_size="auto"), "memory_budget_gb"),
])
def test_bad_config_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        infinite_sampler(**kwargs)


def test_auto_slots_count_the_parked_probe_kv(model):
    """`auto` m under a budget: the parked probe KV (B x G x k tokens) is in the prediction."""
    spec = GenerationSpec(8, eos_token_ids=(3,))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = infinite_sampler(probe_tokens=8).peak_bytes(model, PROMPTS, 64, spec, 3) + 1
    m0 = infinite_sampler("auto", budget / (1 << 30), probe_tokens=0).slots(model, PROMPTS, 64,
                                                                           spec)
    probed = infinite_sampler("auto", budget / (1 << 30), probe_tokens=8)
    m8 = probed.slots(model, PROMPTS, 64, spec)
    assert m8 == 3 and m0 > m8
    assert probed.peak_bytes(model, PROMPTS, 64, spec, m8) <= budget < \
        probed.peak_bytes(model, PROMPTS, 64, spec, m8 + 1)
    r = probed.sample(model, PROMPTS, 64, spec)
    assert r.stats.slots == m8 and r.stats.max_concurrency <= m8
    assert r.stats.peak_kv_bytes <= r.stats.predicted_peak_bytes - weights
    with pytest.raises(ValueError, match="memory_budget_gb"):
        infinite_sampler("auto", budget / (1 << 30), probe_tokens=64).slots(model, PROMPTS, 64,
                                                                           spec)


@pytest.mark.parametrize("k", [0, 2, 6])
def test_slot_utilization_means_the_same_for_infinite(k):
    """Busy row-steps / (all steps x m), probe steps included, is at most 1 whatever k
    (generated tokens / decode steps was 15/14 at k = 0, and had no probe steps at k = 6)."""
    from callbacks.sampling import sampling_metrics

    lengths, m = [3, 2, 5, 1, 4], 2
    r = infinite_sampler(m, probe_tokens=k, predictor=OraclePredictor()).sample(
        ScriptedLM(), [[n, 4] for n in lengths], 1, SCRIPTED)
    util = sampling_metrics(r)["sampling/slot_utilization"]
    steps = r.stats.decoding_steps + r.stats.probe_steps
    busy = sum(end - start + 1 for _, _, start, end in r.stats.slot_trace)
    assert util == pytest.approx(busy / (steps * m)) and 0 < util <= 1


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
    from predictors import HistoryPredictor

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


def test_plan_is_never_worse_than_plain_lpt():
    """grouping=fptas takes the best of its candidate orders by predicted makespan: with exact
    lengths its decoding steps (simulated by list scheduling, independently of the sampler)
    are never above plain LPT's, on random instances and on one where the FPTAS plan alone
    is worse (101 steps against LPT's 98)."""
    import random

    from samplers.scheduling import fptas_plan, planned_order, refill_order, simulate_steps

    lengths, m = [12, 50, 59, 11, 41, 44, 16, 57], 3
    fptas_only = planned_order(fptas_plan(lengths, m, 0.1), lengths, "lpt")
    assert simulate_steps(lengths, fptas_only, m) == 101
    assert simulate_steps(lengths, refill_order(lengths, "lpt"), m) == 98
    sampler = infinite_sampler(m)  # the defaults: fptas + lpt
    name, order = sampler.order([float(n) for n in lengths], m)
    assert name == "lpt" and simulate_steps(lengths, order, m) == 98
    rng = random.Random(0)
    for _ in range(200):
        m = rng.choice([2, 3, 4, 8])
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(m, 24))]
        _, order = infinite_sampler(m).order([float(n) for n in lengths], m)
        assert sorted(order) == list(range(len(lengths)))
        assert simulate_steps(lengths, order, m) <= simulate_steps(
            lengths, refill_order(lengths, "lpt"), m)
    assert infinite_sampler(2, grouping="none", refill="sjf").order([3.0, 1.0, 2.0], 2) == \
        ("sjf", [1, 2, 0])


def test_whole_call_steps_against_continuous_and_the_bound_by_hand():
    """Lengths 10, 4, 7, 12, 6 on m = 2. Continuous refill in (prompt, sample) order, by hand:
    slot A runs 10 then 12 (ends 22), slot B 4, 7, 6 (ends 17): 22 steps, which the
    `continuous` sampler takes too. The bound is max(12, ceil(39 / 2)) = 20. `infinite` with
    the oracle and k = 2: every sample decodes 3 tokens in the probe, three waves on 2 slots
    (9 steps); the remaining 8, 2, 5, 10, 4 longest first end at 15 (slot A: 10, 4; B: 8, 5,
    2), the bound of the decode phase; 24 steps in all: 24 / 22 and 24 / 20."""
    from callbacks.sampling import sampling_metrics

    lengths, m = [10, 4, 7, 12, 6], 2
    prompts = [[n, 4] for n in lengths]
    cont = continuous_sampler(m).sample(ScriptedLM(), prompts, 1, SCRIPTED)
    assert cont.stats.decoding_steps == 22
    metrics = sampling_metrics(cont)
    assert metrics["sampling/continuous_steps"] == 22 and metrics["sampling/total_steps"] == 22
    assert metrics["sampling/total_over_continuous"] == 1.0
    assert metrics["sampling/total_over_lb"] == pytest.approx(22 / 20)
    r = infinite_sampler(m, probe_tokens=2, predictor=OraclePredictor()).sample(
        ScriptedLM(), prompts, 1, SCRIPTED)
    metrics = sampling_metrics(r)
    assert (r.stats.probe_steps, r.stats.decoding_steps) == (9, 15)
    assert metrics["sampling/total_steps"] == 24
    assert metrics["sampling/total_over_continuous"] == pytest.approx(24 / 22)
    assert metrics["sampling/total_over_lb"] == pytest.approx(24 / 20)
    # dynamic continuous keeps the first finishers: no comparison on its biased lengths
    dynamic = continuous_sampler(m, mode="dynamic").sample(ScriptedLM(), prompts, 1, SCRIPTED)
    assert "sampling/total_over_continuous" not in sampling_metrics(dynamic)


def test_steps_over_lb_is_one_when_every_sample_ends_inside_the_probe():
    """No decode phase left (L <= k + 1 for all): 0 steps at a bound of 0 is at the bound."""
    from callbacks.sampling import sampling_metrics

    lengths = [2, 3, 1, 3]
    r = infinite_sampler(2, probe_tokens=4, predictor=OraclePredictor()).sample(
        ScriptedLM(), [[n, 4] for n in lengths], 1, SCRIPTED)
    assert r.lengths.tolist() == lengths and r.stats.decoding_steps == 0
    metrics = sampling_metrics(r)
    assert metrics["sampling/steps_lower_bound"] == 0
    assert metrics["sampling/steps_over_lb"] == 1.0
    assert metrics["sampling/probe_steps"] == r.stats.probe_steps > 0
