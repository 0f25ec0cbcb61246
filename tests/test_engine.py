"""Decode engine and the micro / continuous samplers: exactness, step closed forms, memory."""
from __future__ import annotations

import pytest
import torch

from samplers.base import GenerationSpec
from samplers.engine import padded_head
from samplers.layout import kv_layout
from samplers.memory import live_prompt_bound, predict_peak_bytes
from samplers.slots import SlotSettings
from samplers.scheduling import (DynamicQueue, SampleQueue, list_schedule_makespan,
                                 rounds_steps, steps_lower_bound)
from tests.helpers import (ForwardCounter, PROMPTS, SPEC, completions, continuous_sampler,
                           full_sampler, micro_sampler, tiny_lm)







@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_schedule_invariance_full_micro_continuous(family):
    """float64: identical completions whatever the slot, round, refill order or neighbours."""
    model = tiny_lm(family)
    reference = full_sampler().sample(model, PROMPTS, 7, SPEC)
    assert len(set(reference.lengths.tolist())) > 3  # lengths vary, so schedules differ
    for sampler in (micro_sampler(3), micro_sampler(5), continuous_sampler(3),
                    continuous_sampler(4), continuous_sampler(1)):
        other = sampler.sample(model, PROMPTS, 7, SPEC)
        assert completions(other) == completions(reference), type(sampler).__name__
        assert torch.equal(other.finished, reference.finished)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_micro_and_continuous_equal_generate(family, attn):
    model = tiny_lm(family, attn=attn)
    spec = GenerationSpec(max_new_tokens=12, temperature=0.0, eos_token_ids=(3,))
    for sampler in (micro_sampler(2), continuous_sampler(3)):
        r = sampler.sample(model, PROMPTS, 2, spec)
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=12, eos_token_id=3, pad_token_id=3)
            expected = ref[0, len(prompt):].tolist()
            expected = expected[: expected.index(3) + 1] if 3 in expected else expected
            assert completions(r)[2 * i] == expected


def test_step_counts_equal_closed_forms(model):
    g, m = 7, 3
    full = full_sampler().sample(model, PROMPTS, g, SPEC)
    lengths = full.lengths.tolist()  # (prompt, sample) order = the queues' order
    per_prompt = [lengths[i * g: (i + 1) * g] for i in range(len(PROMPTS))]
    assert full.stats.decoding_steps == sum(max(p) for p in per_prompt)
    micro = micro_sampler(m).sample(model, PROMPTS, g, SPEC)
    assert micro.stats.decoding_steps == rounds_steps(lengths, m)
    cont = continuous_sampler(m).sample(model, PROMPTS, g, SPEC)
    assert cont.stats.decoding_steps == list_schedule_makespan(lengths, m)
    assert steps_lower_bound(lengths, m) <= cont.stats.decoding_steps <= \
        micro.stats.decoding_steps


def test_slot_trace_is_a_valid_schedule(model):
    r = continuous_sampler(3).sample(model, PROMPTS, 5, SPEC)
    trace = r.stats.slot_trace
    assert len(trace) == len(r)
    lengths = {(int(i), int(j)): int(n) for i, j, n in
               zip(r.prompt_index, r.sample_index, r.lengths)}
    busy: dict[int, list[tuple[int, int]]] = {}
    for slot, sample, start, end in trace:
        assert end - start + 1 == lengths[sample]
        busy.setdefault(slot, []).append((start, end))
    for spans in busy.values():
        spans.sort()
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # no overlap in a slot


def test_prefill_once_concurrency_and_memory(model):
    prompt_tokens = sum(map(len, PROMPTS))
    peaks = {}
    for cls in (micro_sampler, continuous_sampler):
        for m in (2, 4):
            for g in (4, 16):
                with ForwardCounter(model) as seen:
                    r = cls(m).sample(model, PROMPTS, g, SPEC)
                assert seen.prefills == len(PROMPTS) and seen.prompt_tokens == prompt_tokens
                assert r.stats.prefill_passes == seen.prefills
                assert r.stats.prefill_tokens == seen.prompt_tokens
                assert r.stats.max_concurrency <= m
                peaks[cls, m, g] = r.stats.peak_kv_bytes
        assert peaks[cls, 2, 4] == peaks[cls, 2, 16]  # flat in G
        assert peaks[cls, 4, 16] > peaks[cls, 2, 16]  # grows with m
    full_peak = full_sampler().sample(model, PROMPTS, 16, SPEC).stats.peak_kv_bytes
    assert full_peak > 3 * peaks[micro_sampler, 4, 16]


def test_dynamic_mode_is_biased_to_short_completions(model):
    spec = GenerationSpec(max_new_tokens=24, eos_token_ids=(3, 5, 7, 9), seed=2)
    fixed = continuous_sampler(4).sample(model, PROMPTS, 6, spec)
    dynamic = continuous_sampler(4, mode="dynamic").sample(model, PROMPTS, 6, spec)
    assert len(dynamic) == len(fixed) == 24
    assert dynamic.lengths.float().mean() < fixed.lengths.float().mean()
    assert dynamic.stats.decoding_steps < fixed.stats.decoding_steps
    assert dynamic.stats.biased_to_short and dynamic.stats.launched >= 24
    assert not fixed.stats.biased_to_short and fixed.stats.launched is None
    assert dynamic.sample_index.tolist() == list(range(6)) * 4


def test_queues_on_hand_made_instances():
    assert rounds_steps([5, 1, 1, 4, 2, 2, 3], 3) == 5 + 4 + 3
    assert list_schedule_makespan([5, 1, 1, 4, 2, 2, 3], 3) == 8  # the 3 waits until t=5
    assert steps_lower_bound([5, 1, 1, 4, 2, 2, 3], 3) == 6
    assert list_schedule_makespan([4, 4, 4, 4], 2) == 8
    q = SampleQueue([(0, 0), (0, 1), (1, 0)], rounds=True)
    assert q.admit(2, 0) == [(0, 0), (0, 1)] and q.remaining(0) == 0
    assert q.admit(2, 1) == []  # a round waits for every slot
    d = DynamicQueue(num_prompts=2, group_size=2)
    assert d.admit(3, 0) == [(0, 0), (0, 1), (0, 2)]
    assert d.on_finished((0, 1)) == []
    assert d.on_finished((0, 2)) == [(0, 0)] and d.remaining(0) == 0
    assert d.admit(1, 0) == [(1, 0)]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(micro_group_size=0), "micro_group_size"),
    (dict(micro_group_size="auto"), "memory_budget_gb"),
    (dict(micro_group_size=2.5), "micro_group_size"),
])
@pytest.mark.parametrize("cls", [micro_sampler, continuous_sampler])
def test_bad_sampler_config(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        continuous_sampler(4, mode="sometimes")


@pytest.mark.parametrize("prompt_kv", ["copied", "shared"])
def test_auto_slots_fit_the_budget(model, prompt_kv):
    def peak(m):
        live = live_prompt_bound(len(PROMPTS), 16, m, rounds=True)
        return predict_peak_bytes(model, PROMPTS, SPEC, m, kv_layout(prompt_kv), live)

    budget_gb = (peak(1) + 5.5 * (peak(2) - peak(1))) / (1 << 30)
    settings = SlotSettings("auto", budget_gb, prompt_kv, True)
    assert settings.resolve(peak, 16, len(PROMPTS) * 16) == 6
    r = micro_sampler("auto", memory_budget_gb=budget_gb, prompt_kv=prompt_kv).sample(
        model, PROMPTS, 16, SPEC)
    assert r.stats.max_concurrency == 6 and r.stats.slots == 6
    assert r.stats.peak_kv_bytes <= r.stats.predicted_sampling_bytes
    with pytest.raises(ValueError, match="memory_budget_gb"):
        SlotSettings("auto", peak(1) / 2 / (1 << 30), prompt_kv, True).resolve(
            peak, 16, len(PROMPTS) * 16)


def test_padded_head_pads_rows_and_keeps_logits():
    """Inside `padded_head` the output embedding multiplies 4 rows for 2 and 3 (1 and 4 stay),
    the logits equal those of the unpadded forward, and the hooks are gone afterwards."""
    model = tiny_lm("llama", dtype=torch.float64)
    head = model.get_output_embeddings()
    seen: list[int] = []
    probe = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for n in (1, 2, 3, 4):
        ids = torch.tensor(PROMPTS[0][:4]).repeat(n, 1) + torch.arange(n)[:, None]
        with torch.inference_mode():
            plain = model(input_ids=ids).logits
            with padded_head(model, 4):
                padded = model(input_ids=ids).logits
        assert padded.shape == plain.shape
        torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)
    probe.remove()
    assert seen == [1, 1, 2, 4, 3, 4, 4, 4]
    assert not head._forward_hooks and not head._forward_pre_hooks
