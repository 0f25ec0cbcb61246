"""The prompt-KV layouts of the decode engine (`prompt_kv: shared | copied`), as objects: the
engine (samplers/engine.py) and the memory planner (samplers/memory.py) ask the layout, never
compare its name.

- `shared` (default): a slot row holds its sample's completion KV only (max_new_tokens
  columns); each live prompt's KV is kept once, until none of its samples is pending or
  running, and the decode attention merges prompt part and completion part
  (samplers/prefix_attention.py), one prefix product per prompt for all its rows.
- `copied`: a row holds its prompt's KV in its first P columns, then its own tokens (longest
  prompt + max_new_tokens columns), decoded by the model's own attention; a prompt's KV is
  dropped once every sample of it was placed (each row holds a copy).

    layout = kv_layout("shared")
    capacity = layout.capacity(longest_prompt, spec.max_new_tokens)   # columns per slot row
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Protocol

import torch

from samplers.prefix_attention import (SharedPrefix, prompt_groups, shared_prefix_implementation,
                                       windowed_masks)


class KVLayout(Protocol):
    name: str

    def capacity(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Columns of one slot row."""

    def first_column(self, prompt_len: Any) -> Any:
        """The slot-row column of a row's first completion token (int or long tensor)."""

    def holds_prompt(self) -> bool:
        """Whether a row keeps a copy of its prompt's KV (placed into its first columns)."""

    def releasable(self, remaining: int, running: bool) -> bool:
        """Whether a prompt's KV may be dropped: `remaining` of its samples are still to be
        placed, `running`: one of them holds a slot now."""

    def decode_inputs(self, model: Any, store: dict[int, Any], prompt_id: torch.Tensor,
                      prompt_len: torch.Tensor, fed: torch.Tensor, mask: torch.Tensor,
                      windowed: bool, reach: int) -> tuple[torch.Tensor, dict, Any]:
        """(attention mask, extra forward arguments, context to run the forward in) of one
        decode forward over the running rows; `mask` [n, 1, 1, W] is the causal one over the
        slot columns."""

    def peak_tokens(self, lengths: list[int], slots: int, max_new_tokens: int,
                    live_prompts: int) -> int:
        """Tokens of KV alive at the engine's peak: slot rows plus prompts (`lengths`
        longest first; `live_prompts`: most prompts the shared store holds at once)."""


class SharedLayout:
    name = "shared"

    def capacity(self, longest_prompt: int, max_new_tokens: int) -> int:
        return max_new_tokens

    def first_column(self, prompt_len: Any) -> Any:
        return 0  # broadcasts against a row's completion columns

    def holds_prompt(self) -> bool:
        return False

    def releasable(self, remaining: int, running: bool) -> bool:
        return remaining == 0 and not running

    def decode_inputs(self, model: Any, store: dict[int, Any], prompt_id: torch.Tensor,
                      prompt_len: torch.Tensor, fed: torch.Tensor, mask: torch.Tensor,
                      windowed: bool, reach: int) -> tuple[torch.Tensor, dict, Any]:
        prefix = SharedPrefix({i: kv.keys for i, kv in store.items()},
                              {i: kv.values for i, kv in store.items()},
                              prompt_groups(prompt_id), prompt_len, fed, mask, reach=reach)
        return mask, {"shared_prefix": prefix}, shared_prefix_implementation(model)

    def peak_tokens(self, lengths: list[int], slots: int, max_new_tokens: int,
                    live_prompts: int) -> int:
        return slots * max_new_tokens + sum(lengths[:live_prompts])


class CopiedLayout:
    name = "copied"

    def capacity(self, longest_prompt: int, max_new_tokens: int) -> int:
        return longest_prompt + max_new_tokens

    def first_column(self, prompt_len: Any) -> Any:
        return prompt_len

    def holds_prompt(self) -> bool:
        return True

    def releasable(self, remaining: int, running: bool) -> bool:
        return remaining == 0

    def decode_inputs(self, model: Any, store: dict[int, Any], prompt_id: torch.Tensor,
                      prompt_len: torch.Tensor, fed: torch.Tensor, mask: torch.Tensor,
                      windowed: bool, reach: int) -> tuple[torch.Tensor, dict, Any]:
        if windowed:  # column c holds position c: sliding-window layers get their own masks
            mask = windowed_masks(model.config, mask, prompt_len + fed)
        return mask, {}, nullcontext()

    def peak_tokens(self, lengths: list[int], slots: int, max_new_tokens: int,
                    live_prompts: int) -> int:
        # m rows of (longest P + max_new_tokens), and up to two prompts' KV while placing
        return slots * (lengths[0] + max_new_tokens) + 2 * lengths[0]


LAYOUTS: dict[str, KVLayout] = {"shared": SharedLayout(), "copied": CopiedLayout()}


def kv_layout(prompt_kv: str) -> KVLayout:
    """The layout named by a sampler config's `prompt_kv` (the one check of that setting)."""
    if prompt_kv not in LAYOUTS:
        raise ValueError(f"prompt_kv must be one of {tuple(LAYOUTS)} (shared: one copy per "
                         f"prompt; copied: in every slot row, for A/B runs), got {prompt_kv!r}")
    return LAYOUTS[prompt_kv]
