"""Checks of config values that raise a ValueError naming the setting."""
from __future__ import annotations

from typing import Any


def check_positive(name: str, value: Any) -> int:
    """Validate an int >= 1 config value such as micro_group_size."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float, integer: bool = False,
                 strict: bool = False) -> Any:
    """Raise a ValueError naming `name` unless value >= minimum (> minimum when strict)."""
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds)
    if bad or (value <= minimum if strict else value < minimum):
        rule = f"{'>' if strict else '>='} {minimum}"
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} {rule}, "
                         f"got {value!r}")
    return value
