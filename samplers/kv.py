"""The decode engine's KV containers: the slot rows, a prefilled prompt, a parked sample.

    SlotCache   m rows x capacity columns of K/V per layer, a duck-typed transformers Cache
    PromptKV    one prompt's KV (per layer [Hk, P, d]), its last logits and hidden state
    Suspended   a parked sample: its completion KV, tokens and next-token logits
    prefill     one forward over a prompt that keeps every layer's whole KV
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from common.compat import cache_keyword, output_cache
from samplers.base import compute_dtype

class SlotCache:
    """A duck-typed transformers Cache: fixed [m, heads, capacity, head_dim] K/V per layer.

    `update` writes this step's K/V of row r < `rows` at column `write_cols[r]` and returns
    rows [0, rows) and columns [0, width) (a view, no copy); the mask hides what a row must
    not see.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.rows = keys[0].shape[0]
        self.write_cols = torch.zeros(self.rows, dtype=torch.long, device=keys[0].device)
        self.width = 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[layer_idx][: self.rows]  # [n, h, C, d]
        values = self.values[layer_idx][: self.rows]
        index = self.write_cols.view(-1, 1, 1, 1).expand(-1, keys.shape[1], 1, keys.shape[3])
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        return keys[:, :, : self.width], values[:, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class PromptKV:
    """A prefilled prompt: its KV (per layer [h, P, d]) and the logits of its last token."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [V]
    hidden: torch.Tensor | None = None  # [H]: last hidden state at the prompt's last token

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class Suspended:
    """A sample parked outside the slots: everything it needs to go on at its next step."""
    keys: list[torch.Tensor]  # per layer [h, k, d]: KV of completion tokens 0..k-1
    values: list[torch.Tensor]
    tokens: list[int]  # its k tokens, all fed to the model
    logits: torch.Tensor  # [V]: the next token's logits
    hidden: torch.Tensor | None = None  # [H] at the last fed token

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values,
                                                          self.logits))


def prefill(model: Any, prompt: list[int], device: torch.device,
            hidden: bool = False) -> PromptKV:
    """Run the prompt once; keep its KV and next-token logits (and last hidden state).

    The forward gets a plain `DynamicCache`: one built from the config would keep only the
    last `sliding_window` tokens of sliding-window layers, and every decode step needs the
    prompt's keys at their true columns (the window is applied by the decode masks).
    Under autocast the keys leave RoPE in float32 and the values in the autocast dtype: both
    are kept in the dtype attention computes in (`compute_dtype`), so the slot rows, the store
    and the decode masks have one dtype and the KV costs what the precision says."""
    length = len(prompt)
    out = model(input_ids=torch.tensor([prompt], device=device),
                position_ids=torch.arange(length, device=device)[None], use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden,
                **{cache_keyword(model): DynamicCache()})
    layers = output_cache(out).layers
    dtype = compute_dtype(layers[0].keys)
    return PromptKV([layer.keys[0].to(dtype) for layer in layers],
                    [layer.values[0].to(dtype) for layer in layers],
                    out.logits[0, -1], out.hidden_states[-1][0, -1] if hidden else None)


def kv_geometry(prompt: PromptKV) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv heads, head dim, dtype) read off a real prefill, whatever the family."""
    keys = prompt.keys[0]
    return len(prompt.keys), keys.shape[0], keys.shape[2], keys.dtype
