"""The slot settings of the engine samplers (`full`, `micro`, `continuous`, `infinite`), checked
once when a sampler is built: how many slot rows m (`micro_group_size`, or `auto`: the largest
m whose predicted peak fits `memory_budget_gb`), the prompt-KV layout (samplers/layout.py),
and whether FSDP gathers the weights once per sampling phase (`gather_weights`).

The defaults live in the sampler configs (configs/sampler/*.yaml), nowhere else.

    settings = SlotSettings(micro_group_size="auto", memory_budget_gb=2.0, prompt_kv="shared",
                            gather_weights=True)
    m = settings.resolve(lambda m: predicted_peak_bytes(m), most=B * G)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from common.checks import check_positive
from samplers.layout import KVLayout, kv_layout

AUTO = "auto"


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.00 GiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if unit != "GiB" else f"{n / size:.2f} GiB"
    return f"{int(n)} B"


@dataclass(frozen=True)
class SlotSettings:
    """`micro_group_size`: m, `auto`, or None (`full`: one slot per sample of a group)."""
    micro_group_size: int | str | None
    memory_budget_gb: float | None
    prompt_kv: str
    gather_weights: bool
    layout: KVLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m, budget = self.micro_group_size, self.memory_budget_gb
        if self.auto:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
                raise ValueError("micro_group_size=auto needs memory_budget_gb > 0 (GiB for "
                                 f"weights, KV and logits), got {budget!r}")
        elif m is not None:
            check_positive("micro_group_size", m)
        if not isinstance(self.gather_weights, bool):
            raise ValueError(f"gather_weights must be true or false, got "
                             f"{self.gather_weights!r}")
        object.__setattr__(self, "layout", kv_layout(self.prompt_kv))

    @property
    def auto(self) -> bool:
        """m is chosen under the memory budget (the one place `auto` is compared)."""
        return self.micro_group_size == AUTO

    def slots(self, group_size: int) -> int | None:
        """m when it is fixed: the setting, or G for `full`; None with `auto`."""
        if self.auto:
            return None
        return group_size if self.micro_group_size is None else int(self.micro_group_size)

    def resolve(self, peak: Callable[[int], int], group_size: int, most: int,
                needs: str = "that weights plus one slot need") -> int:
        """m: fixed, or with `auto` the largest m <= `most` whose predicted peak `peak(m)`
        (bytes) fits the budget; a budget below `peak(1)` is an error saying what it `needs`."""
        fixed = self.slots(group_size)
        if fixed is not None:
            return fixed
        budget = self.memory_budget_gb * (1 << 30)
        if peak(1) > budget:
            raise ValueError(f"sampler.memory_budget_gb={self.memory_budget_gb} is below the "
                             f"{format_bytes(peak(1))} {needs}")
        low, high = 1, max(1, most)  # largest m with predicted peak <= budget (monotone in m)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if peak(mid) <= budget else (low, mid - 1)
        return low
