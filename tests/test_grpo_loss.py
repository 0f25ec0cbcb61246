"""Unit tests for `modules/grpo_loss.py`: hand-computed values and micro-batch additivity.

Run: `python -m pytest -q tests/test_grpo_loss.py`
"""

from __future__ import annotations

import math

import pytest
import torch

from modules.grpo_loss import (
    ADVANTAGE_SCALES,
    LOSS_MODES,
    aggregate_loss,
    batch_reward_std,
    clipped_surrogate,
    entropy_from_logits,
    group_advantages,
    k3_kl,
    token_log_probs,
)

EPS = 1e-4

# rewards [1, 0, 1, 1 | 0, 0 | 5]; group ids deliberately neither contiguous nor sorted by value.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 5.0], dtype=torch.float64)
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 9])
# group 7: mean 0.75, deviations [0.25, -0.75, 0.25, 0.25], unbiased var 0.75 / 3 = 0.25, std 0.5
# group 3: all equal -> 0; group 9: a single sample -> 0
CENTRED = [0.25, -0.75, 0.25, 0.25, 0.0, 0.0, 0.0]
# all 7 rewards: mean 8/7, sum of squares 28 - 64/7 = 132/7, unbiased var 132/42 = 22/7
BATCH_STD = math.sqrt(22 / 7)


# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize(
    ("scale", "divisor"),
    [("group", 0.5 + EPS), ("batch", BATCH_STD + EPS), ("none", 1.0)],
)
def test_group_advantages_hand_values(scale: str, divisor: float) -> None:
    adv = group_advantages(REWARDS, GROUPS, scale=scale, eps=EPS)
    expected = torch.tensor([c / divisor for c in CENTRED], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv.shape == (7,)
    assert torch.all(adv[4:] == 0.0)  # constant group and singleton group: exactly zero


def test_group_advantages_group_scale_literal_numbers() -> None:
    adv = group_advantages(REWARDS, GROUPS, scale="group", eps=0.0)
    torch.testing.assert_close(
        adv, torch.tensor([0.5, -1.5, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    )


def test_group_advantages_unsorted_groups_and_float32() -> None:
    perm = torch.tensor([6, 2, 4, 0, 5, 1, 3])
    adv = group_advantages(REWARDS[perm].float(), GROUPS[perm], scale="group", eps=EPS)
    full = group_advantages(REWARDS.float(), GROUPS, scale="group", eps=EPS)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, full[perm])


def test_group_advantages_constant_non_representable_rewards_are_exactly_zero() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), scale="none")
    assert torch.all(adv == 0.0)


def test_group_advantages_integer_rewards() -> None:
    adv = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_group_advantages_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scale"):
        group_advantages(REWARDS, GROUPS, scale="max")
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(REWARDS, GROUPS[:3])
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(REWARDS, GROUPS.float())
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(REWARDS.view(7, 1), GROUPS.view(7, 1))
    assert ADVANTAGE_SCALES == ("group", "batch", "none")


# ------------------------------------------------------------------ log-probs and entropy


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 100])
def test_token_log_probs_matches_log_softmax(chunk_rows: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 3  # [B, T, V]
    targets = torch.randint(0, 11, (3, 5), generator=gen)  # [B, T]
    got = token_log_probs(logits, targets, chunk_rows=chunk_rows)
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_token_log_probs_bf16_is_float32_and_differentiable() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 7, generator=gen) * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 7, (2, 4), generator=gen)
    got = token_log_probs(logits, targets, chunk_rows=3)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, targets.unsqueeze(-1))
    torch.testing.assert_close(got.detach(), ref.squeeze(-1))
    got.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_temperature_divides_after_the_float32_upcast() -> None:
    """bf16 logits / T is rounded to bf16 before any softmax; the upcast-then-divide log-probs
    and entropy equal a float32 computation by hand, under a bf16 default dtype too, and the
    bf16 division would be off by far more than float32 rounding."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 6, 50, generator=gen) * 5).bfloat16()
    targets = torch.randint(0, 50, (2, 6), generator=gen)
    wide = logits.float() / 0.7
    by_hand = torch.log_softmax(wide, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.softmax(wide, -1) * torch.log_softmax(wide, -1)).sum(-1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = token_log_probs(logits, targets, chunk_rows=5, temperature=0.7)
        got_entropy = entropy_from_logits(logits, temperature=0.7)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == got_entropy.dtype == torch.float32
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_entropy, entropy, rtol=0, atol=1e-5)
    in_bf16 = token_log_probs(logits / 0.7, targets)
    assert (in_bf16 - by_hand).abs().max() > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(logits, targets, temperature=0.0)


def test_token_log_probs_bad_shapes() -> None:
    with pytest.raises(ValueError, match="targets"):
        token_log_probs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        token_log_probs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_rows"):
        token_log_probs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_rows=0)


def test_entropy_uniform_is_log_vocab() -> None:
    ent = entropy_from_logits(torch.full((2, 3, 16), 2.5))
    torch.testing.assert_close(ent, torch.full((2, 3), math.log(16)))


def test_entropy_two_tokens_hand_value_and_random() -> None:
    # p = [0.75, 0.25]: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351446
    logits = torch.log(torch.tensor([[[0.75, 0.25]]]))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351446]]))
    rnd = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(rnd, -1)
    expected = -(probs * torch.log_softmax(rnd, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(rnd, chunk_rows=5), expected)


# ------------------------------------------------------------------ KL and surrogate


def test_k3_kl_hand_value() -> None:
    # logp = ln 0.5, ref = ln 0.25: d = ln 0.5; k3 = 0.5 - ln 0.5 - 1 = ln 2 - 0.5 = 0.1931471806
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[0.1931471806, 0.0]]))
    rnd = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="ref_logp"):
        k3_kl(rnd, rnd[:2])


def _surrogate(ratios: list[list[float]], advantages: list[float], **eps: float):
    old = torch.zeros(len(ratios), len(ratios[0]))
    logp = torch.log(torch.tensor(ratios)).requires_grad_()
    loss, clipped = clipped_surrogate(logp, old, torch.tensor(advantages), **eps)
    return logp, loss, clipped


def test_clipped_surrogate_inside_above_below_both_signs() -> None:
    # row 0: A = +2 with ratios 1.1 (inside), 1.5 (above: clamp 1.2 active), 0.5 (below: unclipped
    # 1.0 < 1.6 is the min); row 1: A = -1 with ratios 1.5 (above: -1.5 < -1.2 so unclipped),
    # 0.5 (below: clamp 0.8 -> -0.8 < -0.5 active), 0.9 (inside).
    logp, loss, clipped = _surrogate([[1.1, 1.5, 0.5], [1.5, 0.5, 0.9]], [2.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor([[-2.2, -2.4, -1.0], [1.5, 0.8, 0.9]]))
    assert clipped.tolist() == [[False, True, False], [False, True, False]]
    loss.sum().backward()
    # clipped tokens carry no gradient; the others have d(-ratio * A)/d logp = -ratio * A
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.2, 0.0, -1.0], [1.5, 0.0, 0.9]]))


def test_clipped_surrogate_asymmetric_clip_higher() -> None:
    _, loss, clipped = _surrogate([[1.25, 1.3, 0.75]], [1.0], epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28, -0.75]]))
    assert clipped.tolist() == [[False, True, False]]


def test_clipped_surrogate_zero_advantage_and_bad_args() -> None:
    _, loss, clipped = _surrogate([[0.1, 3.0]], [0.0])
    assert torch.all(loss == 0) and not clipped.any()
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="epsilon_low"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), epsilon_low=1.0)
    with pytest.raises(ValueError, match="old_logp"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))


# ------------------------------------------------------------------ aggregation


def test_aggregate_loss_hand_values() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # token_mean: (1 + 2 + 4) / 3 tokens; sequence_mean: (mean(1, 2) + mean(4)) / 2 = (1.5 + 4) / 2;
    # dr_grpo: (1 + 2 + 4) / (2 sequences * 3 max_new_tokens)
    expected = {"token_mean": 7 / 3, "sequence_mean": 2.75, "dr_grpo": 7 / 6}
    for mode, value in expected.items():
        got = aggregate_loss(per_token, mask, mode, num_sequences=2, num_tokens=3, max_new_tokens=3)
        torch.testing.assert_close(got, torch.tensor(value))


def test_aggregate_loss_ignores_nan_in_padding_and_empty_rows() -> None:
    per_token = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[True, False], [False, False]])
    for mode in LOSS_MODES:
        out = aggregate_loss(per_token, mask, mode, num_sequences=2, num_tokens=1, max_new_tokens=2)
        assert torch.isfinite(out)


def test_aggregate_loss_bad_arguments() -> None:
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mode.*token_mean.*sequence_mean.*dr_grpo"):
        aggregate_loss(x, m, "sum", num_sequences=2, num_tokens=6, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate_loss(x, m, "token_mean", num_sequences=0, num_tokens=6, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate_loss(x, m, "dr_grpo", num_sequences=2, num_tokens=6, max_new_tokens=0)
    with pytest.raises(ValueError, match="mask"):
        aggregate_loss(x, m[:1], "dr_grpo", num_sequences=2, num_tokens=6, max_new_tokens=3)


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batches_sum_to_full_batch_value_and_gradient(mode: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    B, T = 7, 6
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T  # at least one full row; random others may be empty
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    theta = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(num_sequences=B, num_tokens=int(mask.sum()), max_new_tokens=T)

    full = aggregate_loss(theta**2 * x, mask, mode, **kw)  # [B, T] -> []
    (full_grad,) = torch.autograd.grad(full, theta)

    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 3), slice(3, 5), slice(5, 7)):
        # each micro-batch is also trimmed to its own longest completion, as the update does
        width = max(int(lengths[rows].max()), 1)
        per_token = theta[rows, :width] ** 2 * x[rows, :width]  # [b, width]
        part = aggregate_loss(per_token, mask[rows, :width], mode, **kw)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta.grad, full_grad, rtol=1e-12, atol=1e-12)


def test_batch_reward_std_from_rank_sums_equals_the_std_of_the_whole_batch():
    """Two ranks' (count, sum, sum of squares), added, give torch.std of all rewards; the batch
    advantages of one rank's half, divided by it, are those of the whole batch."""
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 0.0, 0.75])
    groups = torch.arange(4).repeat_interleave(2)
    halves = rewards[:4], rewards[4:]
    sums = sum(torch.stack([torch.tensor(4.0), h.double().sum(), h.double().square().sum()])
               for h in halves)
    std = batch_reward_std(*sums)
    torch.testing.assert_close(std.float(), rewards.std())
    whole = group_advantages(rewards, groups, "batch")
    half = group_advantages(halves[1], groups[4:], "batch", batch_std=std.float())
    torch.testing.assert_close(half, whole[4:])
    assert batch_reward_std(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)) == 0


def test_k3_kl_is_unbiased_for_the_exact_kl() -> None:
    """E_{x ~ p}[k3(log p(x), log q(x))] = KL(p || q) = sum p log(p / q), summed exactly over a
    small vocabulary (float64), and it is 0 only where q = p."""
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(7, dtype=torch.float64, generator=gen), 0)
    q = torch.softmax(torch.randn(7, dtype=torch.float64, generator=gen), 0)
    per_token = k3_kl(p.log()[None], q.log()[None])[0]  # [V]: k3 of each possible token
    torch.testing.assert_close((p * per_token).sum(), (p * (p / q).log()).sum())
    assert torch.equal(k3_kl(p.log()[None], p.log()[None]), torch.zeros(1, 7, dtype=p.dtype))
