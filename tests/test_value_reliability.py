"""How much of a neuron set is signal: per-prompt counts against forward hooks, the
permutation null and split-half reliability on a model with a planted neuron, Spearman and
the FDR threshold by hand, and the selection classes."""
from __future__ import annotations

import pytest
import torch

from values.neurons import ActivationStats
from values.reliability import (BINS, NullDistribution, average_ranks, jaccard,
                                permutation_null, spearman, split_half)
from values.selection import NullFdr, TopDelta
from values.location import SourceStats, response_statistics
from values.statistics import PromptCounts
from tests.helpers import (PLANTED, POLE_A, POLE_B, continuous_sampler, hooked_acts, planted_model,
                           pole_batch)


def counts_of(model, tokens, seeds, rows=4, width=12) -> SourceStats:
    stats, counts = ActivationStats.for_model(model), PromptCounts.for_model(model)
    for seed in seeds:
        ids, mask = pole_batch(tokens, seed=seed, rows=rows, width=width)
        response_statistics(model, ids, mask, stats, batch_size=3, counts=counts)
    return SourceStats(stats.compute(), counts)


def test_prompt_counts_match_forward_hooks():
    model = planted_model()
    ids, mask = pole_batch(POLE_A, seed=3, rows=5, width=10)
    mask[1, 7:] = False  # rows count different numbers of tokens
    stats, counts = ActivationStats.for_model(model), PromptCounts.for_model(model)
    response_statistics(model, ids, mask, stats, batch_size=2, counts=counts)
    acts = hooked_acts(model, ids)  # [layers] of [B, T, D]
    for r in range(5):
        expected = torch.stack([(a[r][mask[r]] > 0).sum(0) for a in acts])  # [L, D]
        assert torch.equal(counts.over_zero[r], expected.int())
        assert int(counts.tokens[r]) == int(mask[r].sum())
    torch.testing.assert_close(counts.prob(), stats.compute().prob)


def test_planted_neuron_is_above_the_null_and_a_shuffled_copy_is_not():
    model = planted_model()
    a = counts_of(model, POLE_A, range(0, 6))  # 24 prompts of pole A
    b = counts_of(model, POLE_B, range(6, 12))
    delta = a.summary.prob - b.summary.prob
    null = permutation_null(a.counts, b.counts, shuffles=100, seed=0)
    assert float(delta[0, PLANTED]) == 1.0
    assert bool(null.family_wise(delta, 0.99)[0, PLANTED])
    assert null.max_quantile(0.99) < 0.6
    # a shuffled copy: both sides hold A and B prompts alike -> nothing clears the null
    mixed = [PromptCounts.of(torch.cat([a.counts.over_zero[k::2], b.counts.over_zero[k::2]]),
                             torch.cat([a.counts.tokens[k::2], b.counts.tokens[k::2]]))
             for k in (0, 1)]
    mixed_delta = mixed[0].prob() - mixed[1].prob()
    mixed_null = permutation_null(mixed[0], mixed[1], shuffles=100, seed=1)
    assert not bool(mixed_null.family_wise(mixed_delta, 0.95)[0, PLANTED])
    assert abs(float(mixed_delta[0, PLANTED])) < 0.2
    # null_fdr keeps the planted neuron and drops most of top_delta's noise
    stats = {"a": a, "b": b}
    loose = TopDelta(top_k=40, min_delta=0.5)(stats, "a", "b")
    strict = NullFdr(top_k=40, min_delta=0.5, q=0.05)(stats, "a", "b", null)
    assert (0, PLANTED) in set(zip(strict.layer.tolist(), strict.index.tolist()))
    assert len(strict) < len(loose)
    with pytest.raises(ValueError, match="null_shuffles must be >= 1"):
        permutation_null(a.counts, b.counts, shuffles=0)


def test_null_recomputes_delta_from_whole_prompts():
    """Each shuffle's maximum equals delta recomputed by hand from the same draw: with equal
    sides, prompt k of each side swapped as a pair; with unequal sides, a free permutation."""
    gen = torch.Generator().manual_seed(0)
    over = torch.randint(0, 5, (7, 1, 3), generator=gen)
    tokens = torch.full((7,), 5)
    pos, neg = PromptCounts.of(over[:3], tokens[:3]), PromptCounts.of(over[3:6], tokens[3:6])
    null = permutation_null(pos, neg, shuffles=4, seed=7)
    swap = torch.rand(4, 3, generator=torch.Generator().manual_seed(7)) < 0.5
    for s in range(4):
        first = torch.where(swap[s], torch.arange(3, 6), torch.arange(3))  # the "pos" prompts
        rest = torch.where(swap[s], torch.arange(3), torch.arange(3, 6))
        delta = over[first].sum(0) / 15.0 - over[rest].sum(0) / 15.0
        assert float(null.maxima[s]) == pytest.approx(float(delta.max()), abs=1e-6)
    assert float(null.histogram.sum()) == 4 * 3
    unequal = permutation_null(pos, PromptCounts.of(over[3:], tokens[3:]), shuffles=4, seed=7)
    gen = torch.Generator().manual_seed(7)
    for s in range(4):
        order = torch.randperm(7, generator=gen)
        first, rest = order[:3], order[3:]
        delta = over[first].sum(0) / 15.0 - over[rest].sum(0) / 20.0
        assert float(unequal.maxima[s]) == pytest.approx(float(delta.max()), abs=1e-6)


def test_paired_halves_cancel_what_the_pairs_share():
    """Pairs that share a strong per-pair effect (the question) and no pole signal: unpaired
    halves correlate negatively (opposite imbalances of the same questions), paired ones do
    not; a planted pole signal is found by both."""
    gen = torch.Generator().manual_seed(1)
    n, d = 32, 400
    question = torch.rand(n, 1, d, generator=gen) * 8  # per pair, the same on both sides
    a = (question + torch.rand(n, 1, d, generator=gen)).round().int()
    b = (question + torch.rand(n, 1, d, generator=gen)).round().int()
    tokens = torch.full((n,), 10)
    pos, neg = PromptCounts.of(a, tokens), PromptCounts.of(b, tokens)
    paired = split_half(pos, neg, top_k=10, sizes=(16,), repeats=4, seed=0)[0]
    unpaired = split_half(pos, PromptCounts.of(b[torch.randperm(n, generator=gen)], tokens),
                          top_k=10, sizes=(16,), repeats=4, seed=0)[0]
    assert abs(paired.spearman) < 0.2 and unpaired.spearman < -0.5


def test_fdr_threshold_by_hand():
    hist = torch.zeros(BINS, dtype=torch.float64)
    centre = (BINS - 1) // 2
    hist[centre] = 10 * 2  # 2 shuffles: each has 10 deltas of 0 ...
    hist[centre + 200] = 2  # ... and one of 0.1
    null = NullDistribution(torch.tensor([0.1, 0.1]), hist)
    delta = torch.tensor([0.5, 0.4, 0.3, 0.05, 0.0])
    # observed >= 0.3: 3, null expects 0 -> FDR 0; >= 0.05: 4 observed, 1 expected -> 0.25
    assert null.fdr(delta, 0.3) == 0.0 and null.fdr(delta, 0.05) == pytest.approx(0.25)
    assert null.fdr_threshold(delta, 0.05) == pytest.approx(0.3)
    assert null.fdr_threshold(delta, 0.3) == pytest.approx(0.05)


def test_spearman_with_ties_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == \
        pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == \
        pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: Pearson of the ranks
    a, b = torch.tensor([1.0, 2.5, 2.5, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    a, b = a - a.mean(), b - b.mean()
    expected = float((a * b).sum() / (a.norm() * b.norm()))
    assert spearman(torch.tensor([5.0, 6.0, 6.0, 9.0]), torch.tensor([1.0, 2, 3, 4])) == \
        pytest.approx(expected)
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_split_half_finds_the_planted_neuron_in_both_halves():
    model = planted_model()
    a = counts_of(model, POLE_A, range(0, 8))  # 32 prompts
    b = counts_of(model, POLE_B, range(8, 16))
    curve = split_half(a.counts, b.counts, top_k=1, repeats=3, seed=0)
    assert [p.prompts_per_half for p in curve] == [4, 8, 16]
    assert all(p.jaccard == 1.0 for p in curve)  # the planted neuron tops every half
    # against itself (no signal) the top neuron of two halves agrees far less often
    noise = split_half(a.counts, counts_of(model, POLE_A, range(16, 24)).counts, top_k=1,
                       repeats=3, seed=0)
    assert max(p.jaccard for p in noise) < 1.0
    with pytest.raises(ValueError, match="at least two prompts"):
        split_half(PromptCounts.of(a.counts.over_zero[:1], a.counts.tokens[:1]), b.counts, 1)


def test_counts_recorded_while_decoding_match_a_forward_over_the_responses():
    """record_decoding counts each generated token fed back (all but the last of each
    response), per prompt; independently: forward hooks over prompt + response."""
    from samplers.base import GenerationSpec
    from values.statistics import record_decoding
    from values.location import sequences

    model = planted_model()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 48, (int(n),), generator=gen).tolist() for n in (3, 7, 5, 9, 4)]
    stats, counts = ActivationStats.for_model(model), PromptCounts.for_model(model, 5)
    with record_decoding(model, stats, counts) as recorder:
        spec = GenerationSpec(6, temperature=1.0, eos_token_ids=[2, 3], seed=0,
                              on_decode=recorder.on_decode)
        rollouts = continuous_sampler(micro_group_size=2).sample(model, prompts, 1, spec)
    ids, mask = sequences(prompts, rollouts, 0)
    for r in range(len(rollouts)):  # count the response tokens but the last
        last = int(mask[r].nonzero().max())
        mask[r, last] = False
    acts = hooked_acts(model, ids)
    for r in range(len(rollouts)):
        i = int(rollouts.prompt_index[r])
        expected = torch.stack([(a[r][mask[r]] > 0).sum(0) for a in acts])
        assert torch.equal(counts.over_zero[i], expected.int()), i
        assert int(counts.tokens[i]) == int(rollouts.lengths[r]) - 1
    assert stats.compute().tokens == int(counts.tokens.sum())
    with pytest.raises(ValueError, match="no decode step was recorded"):
        with record_decoding(model, stats, counts):
            pass
