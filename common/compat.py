"""transformers compatibility: the names its releases give the KV cache argument and output."""
from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model: Any) -> str:
    """The forward's name for a KV cache argument: `cache` in recent transformers 5 releases
    (`past_key_values` is deprecated there, with a warning at every call), else
    `past_key_values`. A PEFT wrapper is looked through to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward (or generate) returned: `out.cache` in recent transformers 5
    releases, `out.past_key_values` before (now a deprecated alias that warns)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
