"""Pure GRPO maths: advantages, token log-probs, entropy, k3 KL, clipped surrogate, aggregation.

No Lightning, no models: every function maps tensors to tensors so that each piece can be checked
against hand-computed values (`tests/test_grpo_loss.py`). The policy update in `modules/grpo.py`
chains them as

    advantages = group_advantages(rewards, prompt_index, scale)            # [N]
    logp = token_log_probs(logits, completion_ids)                         # [B, T]
    loss_bt, clipped = clipped_surrogate(logp, old_logp, advantages[rows])  # [B, T]
    loss_bt = loss_bt + beta * k3_kl(logp, ref_logp)                       # [B, T]
    loss = aggregate_loss(loss_bt, mask, mode, num_sequences, num_tokens, max_new_tokens)

`aggregate_loss` uses *global* normalisers (whole-batch sequence and token counts), so the sum of
the micro-batch losses equals the full-batch loss and gradient accumulation is exact.

Run the tests with `python -m pytest -q tests/test_grpo_loss.py`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOSS_MODES: tuple[str, ...] = ("token_mean", "sequence_mean", "dr_grpo")
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample group mean, unbiased group std, group size and a 'group is constant' flag."""
    _, inverse = torch.unique(group_index, return_inverse=True)  # [N] dense ids 0..K-1
    num_groups = int(inverse.max().item()) + 1
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, inverse, torch.ones_like(rewards))  # [K]
    total = torch.zeros_like(count).index_add_(0, inverse, rewards)  # [K]
    mean = total / count  # [K]
    centred = rewards - mean[inverse]  # [N]
    sq = torch.zeros_like(count).index_add_(0, inverse, centred * centred)  # [K]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # [K] unbiased, like torch.std / TRL
    # max == min is an exact test for "all rewards equal" (a float mean may not reproduce them).
    g_max = torch.full_like(count, float("-inf")).scatter_reduce(0, inverse, rewards, "amax")
    g_min = torch.full_like(count, float("inf")).scatter_reduce(0, inverse, rewards, "amin")
    constant = g_max == g_min  # [K]
    return mean[inverse], std[inverse], count[inverse], constant[inverse]


def group_advantages(
    rewards: Tensor,
    group_index: Tensor,
    scale: str = "group",
    eps: float = 1e-4,
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by a std.

    Args:
        rewards: float [N], one scalar reward per completion.
        group_index: long [N], the group (prompt) of each completion; ids need not be contiguous
            or sorted.
        scale: "group" divides by the (unbiased) std of its group + eps (GRPO, TRL default);
            "batch" divides by the std over all N rewards + eps; "none" does not divide (Dr. GRPO).
        eps: added to the std before dividing.
        batch_std: with scale="batch", the std to divide by; pass the std of the whole batch
            over every data-parallel rank (see `batch_reward_std`). Default: std of `rewards`.

    Returns:
        float32 [N] (float64 for float64 rewards). A group of one sample, or one whose rewards
        are all equal, gets exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_index.shape != rewards.shape:
        raise ValueError(
            f"group_index must have the shape of rewards {tuple(rewards.shape)}, "
            f"got {tuple(group_index.shape)}"
        )
    if group_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"group_index must be an integer tensor, got dtype {group_index.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    # float32 whatever the default dtype (`bf16-true` makes it bf16) and the rewards' dtype;
    # float64 rewards stay float64
    rewards = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    if rewards.numel() == 0:
        return rewards.clone()

    mean, std, count, constant = _group_stats(rewards, group_index.long())  # each [N]
    advantages = rewards - mean  # [N]
    if scale == "group":
        advantages = advantages / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std.to(rewards.dtype) + eps)
    degenerate = (count < 2) | constant  # [N]
    return advantages.masked_fill(degenerate, 0.0)


def batch_reward_std(count: Tensor, total: Tensor, total_sq: Tensor) -> Tensor:
    """Unbiased std of a batch from its sums (count, sum, sum of squares), as all-reduced over
    data-parallel ranks; 0 for fewer than two rewards. Computed in float64."""
    count, total, total_sq = (x.double() for x in (count, total, total_sq))
    if count < 2:
        return total.new_zeros(())
    variance = (total_sq - total * total / count) / (count - 1)
    return variance.clamp(min=0).sqrt()


# --------------------------------------------------------------------------------------------
# Per-token quantities from logits
# --------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, chunk_rows: int | None, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _upcast(rows: Tensor, temperature: float) -> Tensor:
    """float32 rows of logits, divided by the temperature after the upcast."""
    rows = rows.float()
    return rows / temperature if temperature != 1.0 else rows


def token_log_probs(logits: Tensor, targets: Tensor, chunk_rows: int | None = None,
                    temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[targets] in float32, without materialising the
    [B, T, V] log-softmax.

    Args:
        logits: [B, T, V], any float dtype (bf16 is upcast one chunk at a time).
        targets: long [B, T], token ids in [0, V).
        chunk_rows: process at most this many of the B*T rows at a time (None = all at once);
            bounds the float32 copy of bf16 logits to [chunk_rows, V].
        temperature: > 0; the logits are divided by it after the float32 upcast.

    Returns:
        float32 [B, T].
    """
    _check_logits(logits, chunk_rows, temperature)
    if targets.shape != logits.shape[:2]:
        raise ValueError(
            f"targets must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(targets.shape)}"
        )
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)  # [R, V]
    flat_targets = targets.reshape(B * T, 1).long()  # [R, 1]
    step = chunk_rows or max(B * T, 1)
    pieces = []
    for start in range(0, B * T, step):
        rows = _upcast(flat[start : start + step], temperature)  # [r, V]
        picked = rows.gather(-1, flat_targets[start : start + step]).squeeze(-1)  # [r]
        pieces.append(picked - torch.logsumexp(rows, dim=-1))  # [r]
    if not pieces:
        return logits.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(pieces).view(B, T)


def entropy_from_logits(logits: Tensor, chunk_rows: int | None = None,
                        temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, in float32:
    logsumexp(z) - sum(p * z).

    Args:
        logits: [B, T, V].
        chunk_rows: process at most this many of the B*T rows at a time (None = all at once).
        temperature: > 0; the logits are divided by it after the float32 upcast.

    Returns:
        float32 [B, T].
    """
    _check_logits(logits, chunk_rows, temperature)
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)  # [R, V]
    step = chunk_rows or max(B * T, 1)
    pieces = []
    for start in range(0, B * T, step):
        rows = _upcast(flat[start : start + step], temperature)  # [r, V]
        probs = torch.softmax(rows, dim=-1)  # [r, V]
        pieces.append(torch.logsumexp(rows, dim=-1) - (probs * rows).sum(-1))  # [r]
    if not pieces:
        return logits.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(pieces).view(B, T)


# --------------------------------------------------------------------------------------------
# Per-token loss terms
# --------------------------------------------------------------------------------------------


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(d) - d - 1 with d = ref - logp.

    Unbiased for samples from the policy and always >= 0. Shapes: [B, T] -> [B, T].
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}"
        )
    delta = ref_logp - logp  # [B, T]
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token.

    loss = -min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A),
    ratio = exp(logp - old_logp). `epsilon_high > epsilon_low` gives DAPO's clip-higher.

    Args:
        logp: [B, T] log-probs under the current policy (carries the gradient).
        old_logp: [B, T] log-probs under the sampling policy (treated as a constant).
        advantages: [B] one advantage per sequence (or [B, T] per token).

    Returns:
        per_token_loss [B, T] and is_clipped bool [B, T]: True where the clamped term is the
        active (smaller) one and differs from the unclipped term, as in TRL's clip ratio.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape:
        raise ValueError(
            f"logp and old_logp must both be [B, T]; got {tuple(logp.shape)} and "
            f"{tuple(old_logp.shape)}"
        )
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(1)  # [B, 1]
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] = ({logp.shape[0]},) or [B, T], got {tuple(advantages.shape)}"
        )
    if not 0.0 <= epsilon_low < 1.0:
        raise ValueError(f"epsilon_low must be in [0, 1), got {epsilon_low}")
    if epsilon_high < 0.0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")

    ratio = torch.exp(logp - old_logp.detach())  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages  # [B, T]
    per_token_loss = -torch.min(unclipped, clipped)  # [B, T]
    # The clamp is active exactly when the ratio left the trust region in the direction the
    # advantage pushes it: below 1 - eps_low with A < 0, or above 1 + eps_high with A > 0.
    is_clipped = ((ratio < 1.0 - epsilon_low) & (advantages < 0)) | (
        (ratio > 1.0 + epsilon_high) & (advantages > 0)
    )  # [B, T]
    return per_token_loss, is_clipped


# --------------------------------------------------------------------------------------------
# Aggregation over tokens (micro-batch additive)
# --------------------------------------------------------------------------------------------


def _token_mean(
    masked: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, max_new: int
) -> Tensor:
    # An all-empty batch has a zero sum; dividing by 1 keeps the loss finite.
    return masked.sum() / max(num_tokens, 1)


def _sequence_mean(
    masked: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, max_new: int
) -> Tensor:
    lengths = mask.sum(dim=1).clamp(min=1).to(masked.dtype)  # [B]; an empty row contributes 0
    return (masked.sum(dim=1) / lengths).sum() / num_sequences


def _dr_grpo(
    masked: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, max_new: int
) -> Tensor:
    return masked.sum() / (num_sequences * max_new)


_AGGREGATORS: dict[str, Callable[[Tensor, Tensor, int, int, int], Tensor]] = {
    "token_mean": _token_mean,
    "sequence_mean": _sequence_mean,
    "dr_grpo": _dr_grpo,
}


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    num_sequences: int,
    num_tokens: int,
    max_new_tokens: int,
) -> Tensor:
    """Reduce a per-token loss to a scalar with whole-batch normalisers.

    Summing this over the micro-batches of one batch (same `num_sequences`, `num_tokens`,
    `max_new_tokens`) gives exactly the full-batch value, so gradient accumulation is exact.

    Args:
        per_token: [B, T] loss of this micro-batch.
        mask: bool [B, T], True on completion tokens.
        mode: "token_mean" = sum(loss * mask) / num_tokens (DAPO / TRL "dapo");
            "sequence_mean" = sum_i(mean over row i's tokens) / num_sequences (GRPO paper);
            "dr_grpo" = sum(loss * mask) / (num_sequences * max_new_tokens) (Dr. GRPO).
        num_sequences: completions in the whole batch (not the micro-batch).
        num_tokens: completion tokens in the whole batch (not the micro-batch).
        max_new_tokens: the generation cap, the constant normaliser of Dr. GRPO.

    Returns:
        A 0-dim tensor.
    """
    if mode not in _AGGREGATORS:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(
            f"per_token and mask must both be [B, T]; got {tuple(per_token.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mask = mask.bool()
    # where(), not multiply: padded positions may hold inf/nan that must not leak into the sum.
    masked = torch.where(mask, per_token, per_token.new_zeros(()))  # [B, T]
    return _AGGREGATORS[mode](masked, mask, num_sequences, num_tokens, max_new_tokens)
