"""Sampler contract tests: validation, per-sample RNG streams, exactness against generate."""
from __future__ import annotations

import pytest
import torch

from samplers.base import GenerationSpec, filter_logits, sample_tokens, uniforms
from tests.helpers import ForwardCounter, full_sampler, hf_generate_sampler, tiny_lm

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 11, 12, 13]]
EOS = 3




@pytest.mark.parametrize("sampler_cls", [full_sampler, hf_generate_sampler])
@pytest.mark.parametrize("kwargs, argument", [
    (dict(prompts=[[1, 2], []]), "prompts[1]"),
    (dict(prompts=[]), "prompts"),
    (dict(group_size=0), "group_size"),
    (dict(spec=GenerationSpec(max_new_tokens=0)), "max_new_tokens"),
    (dict(spec=GenerationSpec(8, temperature=-0.5)), "temperature"),
    (dict(spec=GenerationSpec(8, top_p=0.0)), "top_p"),
    (dict(spec=GenerationSpec(8, top_p=1.5)), "top_p"),
    (dict(prompts=[list(range(40)) * 7]), "context"),
])
def test_bad_input_names_the_argument(model, sampler_cls, kwargs, argument):
    call = dict(prompts=PROMPTS, group_size=2, spec=GenerationSpec(8))
    call.update(kwargs)
    with pytest.raises(ValueError, match=argument.replace("[", r"\[").replace("]", r"\]")):
        sampler_cls().sample(model, call["prompts"], call["group_size"], call["spec"])


def test_uniforms_are_deterministic_and_distinct():
    i = torch.arange(4).repeat_interleave(1000)
    j = torch.arange(1000).repeat(4)
    t = torch.zeros_like(i)
    u = uniforms(7, i, j, t)
    assert torch.equal(u, uniforms(7, i, j, t))
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.005
    assert len(set(u.tolist())) == len(u)
    assert not torch.equal(u, uniforms(8, i, j, t))
    assert not torch.equal(u, uniforms(7, i, j, t + 1))


def test_inverse_cdf_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    spec = GenerationSpec(1, temperature=0.7)
    n = 40_000
    u = uniforms(0, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.zeros(n,
                                                                                 dtype=torch.long))
    tokens = sample_tokens(logits.expand(n, -1), u, spec)
    freq = torch.bincount(tokens, minlength=5).double() / n
    probs = torch.softmax(logits[0].double() / 0.7, -1)
    assert torch.allclose(freq, probs, atol=0.01)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = torch.isfinite(filter_logits(logits, GenerationSpec(1, top_k=2)))
    assert kept_k.tolist() == [[True, True, False, False]]
    kept_p = torch.isfinite(filter_logits(logits, GenerationSpec(1, top_p=0.7)))
    assert kept_p.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 needs the second token
    kept_p = torch.isfinite(filter_logits(logits, GenerationSpec(1, top_p=0.5)))
    assert kept_p.tolist() == [[True, False, False, False]]
    n = 2000
    u = torch.linspace(0, 0.999, n, dtype=torch.float64)
    drawn = sample_tokens(logits.expand(n, -1), u, GenerationSpec(1, top_k=2))
    assert set(drawn.tolist()) == {0, 1}


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_full_equals_model_generate(family, attn):
    model = tiny_lm(family, attn=attn)
    spec = GenerationSpec(max_new_tokens=12, temperature=0.0, eos_token_ids=(EOS,))
    rollouts = full_sampler().sample(model, PROMPTS, 2, spec)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=EOS, pad_token_id=EOS)
        expected = ref[0, len(prompt):].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        for row in (2 * i, 2 * i + 1):
            n = int(rollouts.lengths[row])
            assert rollouts.completion_ids[row, :n].tolist() == expected


def test_hf_generate_greedy_equals_full(model):
    spec = GenerationSpec(max_new_tokens=10, temperature=0.0, eos_token_ids=(EOS,))
    a = full_sampler().sample(model, PROMPTS, 3, spec)
    b = hf_generate_sampler().sample(model, PROMPTS, 3, spec)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)
    assert torch.equal(a.completion_ids * a.completion_mask, b.completion_ids * b.completion_mask)


def test_full_sample_streams_do_not_depend_on_group_size(model):
    """Sample (i, j) draws from its own stream: G=3 is a prefix of G=7, despite different
    batch shapes and rows leaving the batch at different steps (exact in float64)."""
    spec = GenerationSpec(max_new_tokens=16, temperature=1.0, eos_token_ids=(EOS, 5, 7),
                          seed=11)
    small = full_sampler().sample(model, PROMPTS, 3, spec)
    large = full_sampler().sample(model, PROMPTS, 7, spec)
    for i in range(len(PROMPTS)):
        for j in range(3):
            a, b = i * 3 + j, i * 7 + j
            assert small.completion_ids[a, : small.lengths[a]].tolist() == \
                large.completion_ids[b, : large.lengths[b]].tolist()
    assert 0 < int(large.finished.sum()) < len(large)  # both EOS and truncation occur
    other = full_sampler().sample(model, PROMPTS, 3, GenerationSpec(16, eos_token_ids=(EOS,),
                                                                   seed=12))
    assert not torch.equal(other.completion_ids[:, :4], small.completion_ids[:, :4])


def test_rollouts_layout_and_stats(model):
    spec = GenerationSpec(max_new_tokens=9, eos_token_ids=(EOS, 5, 7), seed=3)
    with ForwardCounter(model) as seen:
        r = full_sampler().sample(model, PROMPTS, 4, spec)
    assert r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.sample_index.tolist() == [0, 1, 2, 3] * 3
    assert torch.equal(r.completion_mask.sum(1), r.lengths)
    for row in range(len(r)):
        n = int(r.lengths[row])
        ended = r.completion_ids[row, n - 1].item() in spec.eos_token_ids
        assert bool(r.finished[row]) == ended
        assert n == 9 or ended
    assert r.stats.prefill_tokens == seen.prompt_tokens == sum(map(len, PROMPTS))
    assert r.stats.prefill_passes == seen.prefills == 3
    assert r.stats.decoding_steps == sum(int(r.lengths[4 * i: 4 * i + 4].max()) for i in range(3))
    assert r.stats.generated_tokens == int(r.lengths.sum())
    assert r.stats.max_concurrency == 4 and r.stats.peak_kv_bytes > 0
    with ForwardCounter(model) as seen:
        h = hf_generate_sampler().sample(model, PROMPTS, 4, spec)
    assert h.stats.prefill_tokens == seen.prompt_tokens == 4 * sum(map(len, PROMPTS))
    assert h.stats.prefill_passes == seen.prefills
    assert h.stats.peak_kv_bytes > 0


@pytest.mark.parametrize("prompt_kv", ["copied", "shared"])
def test_full_peak_kv_matches_the_layouts_closed_form(model, prompt_kv):
    """copied: G slot rows of (longest prompt + max_new_tokens), plus the prompt's own KV while
    its samples are being placed; shared: G rows of max_new_tokens, plus the one live prompt
    (the longest, 9 tokens); the planner's prediction bounds it."""
    from samplers.layout import kv_layout
    from samplers.memory import live_prompt_bound, predict_peak_bytes

    spec = GenerationSpec(max_new_tokens=6, eos_token_ids=())
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6]]
    r = full_sampler(prompt_kv).sample(model, prompts, 5, spec)
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 8  # float64
    tokens = 5 * (9 + 6) + 9 if prompt_kv == "copied" else 5 * 6 + 9
    assert r.stats.peak_kv_bytes == tokens * per_token
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    live = live_prompt_bound(3, 5, 5, rounds=True)
    predicted = predict_peak_bytes(model, prompts, spec, 5, kv_layout(prompt_kv), live) - weights
    assert r.stats.peak_kv_bytes <= predicted
