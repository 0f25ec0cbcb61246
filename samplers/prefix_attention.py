"""Decode attention over a shared prompt prefix plus each row's own completion (Hydragen-style).

With `prompt_kv: shared` the engine keeps every live prompt's KV once and the slot rows hold
completion KV only. A decoding row r of prompt i then attends over two key sets, which are
attended separately and merged exactly with their log-sum-exps (the softmax of a concatenation
is the lse-weighted mix of the two softmaxes):

    prefix:      q_r against prompt i's keys [Hk, P_i, d]: ONE matrix-matrix product for all the
                 running rows of prompt i (their queries stacked; Hydragen), GQA by folding the
                 query-head groups into the query dimension, so KV heads are never repeated
    completion:  q_r against its own completion keys [Hk, W, d] (masked to its t + 1 columns)
    merge:       lse = logaddexp(lse_p, lse_c); out = e^(lse_p - lse) out_p + e^(lse_c - lse) out_c

`attention_with_lse` uses PyTorch's fused kernels that return the log-sum-exp (CPU flash SDPA;
CUDA flash for half precision without a mask, memory-efficient SDPA otherwise) and a plain matmul
fallback. `shared_prefix_attention` is registered with transformers' `AttentionInterface` as
"grpo_shared_prefix"; the engine selects it only for its own decode forwards (passing the
prompts through the `shared_prefix` keyword), so training forwards and `model.generate` never
see it. Sliding-window layers (the `sliding_window` keyword transformers passes) are masked per
layer with transformers' rule: a query at position q sees keys at positions p <= q with
p > q - window.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from samplers.base import compute_dtype

NAME = "grpo_shared_prefix"


# ----------------------------------------------------------------------------- kernels


def _fused_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, lse) from a fused PyTorch kernel, or None where none applies here."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    if q.device.type == "cuda":
        if mask is None and q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse
        bias = None if mask is None else mask.to(q.dtype).expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]  # the kernel may pad the query dimension
    return None


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _matmul_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    wide = lse_dtype(q.dtype)
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale  # [B, Hk, M, N]
    if mask is not None:
        scores = scores + mask.to(wide)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hk, M]
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows: 0
    return torch.matmul(weights, v.to(wide)).to(q.dtype), lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, scale: float, fused: bool = True,
                       may_be_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp.

    q [B, Hk, M, d], k and v [B, Hk, N, d] (same head count: fold GQA groups into M first),
    mask additive float (0 / -inf) broadcastable to [B, Hk, M, N], or None.
    Returns out [B, Hk, M, d] in q's dtype and lse [B, Hk, M] (float32, float64 for float64
    inputs); a query that sees no key
    gets out 0 and lse -inf, so it drops out of a merge (`may_be_empty=False` skips that check
    where every query sees at least one key).
    """
    result = None
    if fused:
        try:
            result = _fused_lse(q, k, v, mask, scale)
        except (RuntimeError, NotImplementedError):  # shape/dtype the kernel does not take
            result = None
    if result is None:
        return _matmul_lse(q, k, v, mask, scale)
    out, lse = result
    lse = lse.to(lse_dtype(q.dtype))
    if mask is not None and may_be_empty:  # kernels differ on fully masked queries: zero them
        seen = torch.isfinite(mask).expand(*q.shape[:3], k.shape[2]).any(-1)  # [B, Hk, M]
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen.unsqueeze(-1), 0.0)
    return out, lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each part's (out, lse): part a's
    weight is e^lse_a / (e^lse_a + e^lse_b) = sigmoid(lse_a - lse_b). At least one part of
    every query must see a key (lse -inf on one side only gives weight 0 or 1)."""
    weight = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)  # [..., M, 1]
    out_b = out_b.to(weight.dtype)
    return (out_b + weight * (out_a.to(weight.dtype) - out_b)).to(out_a.dtype)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, visible: torch.Tensor | None,
                window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask [R, N] of `visible` (bool [R, N], None = all) cut to transformers'
    sliding window: key position (long [N]) > query position (long [R]) - window."""
    keep = visible
    if window is not None:
        inside = key_pos[None, :] > (query_pos[:, None] - window)  # [R, N]
        keep = inside if keep is None else keep & inside
    if keep is None:
        return None
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return mask.masked_fill_(~keep, float("-inf"))


# ----------------------------------------------------------------------------- layers and rows


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None = full attention), as the model's attention reads it:
    `layer_types` where the config has them (Qwen3, Qwen2, ...), else `sliding_window` for
    every layer (Mistral), else none (Llama)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * text.num_hidden_layers


def windowed_masks(config: Any, mask: torch.Tensor, positions: torch.Tensor) -> Any:
    """The copied layout's decode masks for a model with sliding-window layers: column c of a
    row holds position c, so a window layer hides c <= position - window, as transformers' own
    masks do. `mask` [n, 1, 1, W] is the causal one, `positions` long [n]. Models with
    `layer_types` take a mask per layer type; the others (Mistral) one for every layer."""
    window = min(w for w in layer_windows(config) if w)
    columns = torch.arange(mask.shape[-1], device=mask.device)
    outside = columns[None, :] <= (positions[:, None] - window)  # [n, W]
    windowed = mask.masked_fill(outside[:, None, None, :], float("-inf"))
    if getattr(config.get_text_config(), "layer_types", None) is None:
        return windowed
    return {"full_attention": mask, "sliding_attention": windowed}


def prompt_groups(prompt_id: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(prompt, its row indices) for every prompt among the running rows (one device sync)."""
    order = torch.argsort(prompt_id, stable=True)
    prompts, counts = torch.unique_consecutive(prompt_id[order], return_counts=True)
    return list(zip(prompts.tolist(), order.split(counts.tolist())))


# ----------------------------------------------------------------------------- the prompts


@dataclass
class SharedPrefix:
    """What the decode forward's attention needs besides the completion KV of the rows.

    `keys[i][layer]` / `values[i][layer]`: prompt i's KV, [Hk, P_i, d]; `groups`: (prompt i,
    row indices long [r]) for every prompt with running rows; `prompt_len` and `fed` (long [n]):
    each row's P and the completion column of the token fed this step (its query position is
    P + fed); `completion_mask`: additive [n, 1, 1, W] for the completion part.
    """
    keys: dict[int, list[torch.Tensor]]
    values: dict[int, list[torch.Tensor]]
    groups: list[tuple[int, torch.Tensor]]
    prompt_len: torch.Tensor
    fed: torch.Tensor
    completion_mask: torch.Tensor
    reach: int | None = None  # above every query position: a window >= it hides nothing
    fused: bool = True
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)
    _windowed_prefix: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)

    def effective(self, window: int | None) -> int | None:
        """The window, or None where it is at least as long as every row's sequence."""
        if window is None or (self.reach is not None and window >= self.reach):
            return None
        return window

    def prefix_mask_for(self, prompt: int, rows: torch.Tensor, length: int, repeat: int,
                        window: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The window's mask over prompt `prompt`'s keys for its rows' stacked queries
        ([1, 1, r * repeat, P]; None if it hides nothing), once per prompt per step."""
        key = (prompt, window)
        if key not in self._windowed_prefix:
            positions = self.prompt_len[rows] + self.fed[rows]  # [r]
            cut = window_mask(positions, torch.arange(length, device=positions.device), None,
                              window, dtype)  # [r, P]
            if cut is not None:
                cut = cut[:, None, :].expand(rows.numel(), repeat, length).reshape(
                    1, 1, rows.numel() * repeat, length)
            self._windowed_prefix[key] = cut
        return self._windowed_prefix[key]

    def completion_mask_for(self, window: int | None) -> torch.Tensor:
        """The completion part's mask, cut to a sliding window (once per window per step)."""
        if window is None:
            return self.completion_mask
        if window not in self._windowed:
            width = self.completion_mask.shape[-1]
            columns = torch.arange(width, device=self.fed.device)
            visible = columns[None, :] <= self.fed[:, None]  # [n, W]
            cut = window_mask(self.fed, columns, visible, window, self.completion_mask.dtype)
            self._windowed[window] = cut[:, None, None, :]
        return self._windowed[window]


def prefix_part(query: torch.Tensor, prefix: SharedPrefix, layer: int, scale: float,
                window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every row's queries [n, H, M, d] over its prompt's KV, one product per
    prompt; returns out [n, H, M, d] and lse float32 [n, H, M]."""
    n, heads, queries, dim = query.shape
    whole = len(prefix.groups) == 1  # rows are 0..n-1 in order: no gather, no scatter
    if not whole:  # each prompt's rows are scattered back into these
        out = query.new_zeros(query.shape)
        lse = torch.full((n, heads, queries), float("-inf"), device=query.device,
                         dtype=lse_dtype(query.dtype))
    for i, rows in prefix.groups:
        keys = prefix.keys[i][layer].to(query.dtype)  # [Hk, P, d] (a no-op unless the
        values = prefix.values[i][layer].to(query.dtype)  # store was filled in another dtype)
        kv_heads, length = keys.shape[0], keys.shape[1]
        group = heads // kv_heads
        r = rows.numel()
        # [r, H, M, d] -> [1, Hk, group * r * M, d]: every query of prompt i against its keys
        q = (query if whole else query.index_select(0, rows)).reshape(
            r, kv_heads, group * queries, dim)
        q = q.transpose(0, 1).reshape(1, kv_heads, r * group * queries, dim)
        mask = None
        if window is not None:  # rows see different prompt tails: a mask per query
            mask = prefix.prefix_mask_for(i, rows, length, group * queries, window, q.dtype)
        o, s = attention_with_lse(q, keys[None], values[None], mask, scale, prefix.fused)
        o = o.reshape(kv_heads, r, group * queries, dim).transpose(0, 1).reshape(
            r, heads, queries, dim)
        s = s.reshape(kv_heads, r, group * queries).transpose(0, 1).reshape(r, heads, queries)
        if whole:
            return o, s
        out.index_copy_(0, rows, o)
        lse.index_copy_(0, rows, s)
    return out, lse


def completion_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: torch.Tensor, scale: float,
                    fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's queries [n, H, M, d] against its own completion KV [n, Hk, W, d]."""
    n, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(n, kv_heads, group * queries, dim)
    # the fed token's own key is always visible: no query of this part is empty
    o, s = attention_with_lse(q, key, value, mask, scale, fused, may_be_empty=False)
    return o.reshape(n, heads, queries, dim), s.reshape(n, heads, queries)


def shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: SharedPrefix | None = None,
                            sliding_window: int | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: prefix + completion, merged; returns
    ([n, M, H, d], None) like the built-in ones. Without `shared_prefix` it is plain SDPA
    over (key, value) with `attention_mask`, so a forward that is not the engine's still works.

    Under autocast (`bf16-mixed`) every part runs in the autocast dtype with autocast off, as
    the model's own SDPA would: the query leaves RoPE in float32, the KV is stored in bf16,
    and the log-sum-exps stay float32 whatever the inputs.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dtype = compute_dtype(query)
    if torch.is_autocast_enabled(query.device.type):
        with torch.autocast(query.device.type, enabled=False):
            out, _ = shared_prefix_attention(
                module, query.to(dtype), key.to(dtype), value.to(dtype),
                None if attention_mask is None else attention_mask.to(dtype), scale, dropout,
                shared_prefix, sliding_window, **kwargs)
        return out, None
    if shared_prefix is None:
        kv_heads = key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale,
            enable_gqa=query.shape[1] != kv_heads)
        return out.transpose(1, 2).contiguous(), None
    sliding_window = shared_prefix.effective(sliding_window)
    mask = shared_prefix.completion_mask_for(sliding_window)
    out_p, lse_p = prefix_part(query, shared_prefix, module.layer_idx, scale, sliding_window)
    out_c, lse_c = completion_part(query, key, value, mask, scale, shared_prefix.fused)
    return merge(out_p, lse_p, out_c, lse_c).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, shared_prefix_attention)
# The engine always passes a prepared 4D mask (transformers returns it as is), but a model that
# builds its own mask under this implementation name gets the SDPA kind.
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def shared_prefix_implementation(model: Any) -> Iterator[None]:
    """Select this attention for the forwards inside the block, then restore the model's own
    (the config attribute every attention layer reads at call time)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
