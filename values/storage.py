"""What a value-neuron run writes and reads back: location statistics (pole_statistics.pt, per
prompt counts included) and neuron sets (neurons_<dimension>.json, neurons_<dimension>_away.json,
random_*.json), each tied to the model architecture it came from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from values.experiment import DimensionSets, SourceStats
from values.neurons import OPPOSITE, ValueNeurons
from values.statistics import ActivationSummary, PromptCounts


def save_statistics(stats: dict[str, SourceStats], signature: dict, path: Path) -> None:
    """`path` (.pt) and, beside it, pole_responses.jsonl: the greedy location responses."""
    with open(path.with_name("pole_responses.jsonl"), "w") as handle:
        handle.writelines(json.dumps({"source": name, "text": text}) + "\n"
                          for name, s in stats.items() for text in s.texts)
    torch.save({"model": signature, "sources": {
        name: {"prob": s.summary.prob, "p95": s.summary.p95, "tokens": s.summary.tokens,
               "over_zero": s.counts.over_zero.to(torch.int16),  # counts <= max_new_tokens
               "prompt_tokens": s.counts.tokens}
        for name, s in stats.items()}}, path)


def load_statistics(path: str, signature: dict, sources: list[str]) -> dict[str, SourceStats]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"statistics={path!r} does not exist (locate_values.py writes "
                                "pole_statistics.pt in its run dir)")
    try:
        saved = torch.load(path, weights_only=True)
        stats = {name: SourceStats(ActivationSummary(v["prob"], v["p95"], int(v["tokens"])),
                                   PromptCounts.of(v["over_zero"], v["prompt_tokens"]))
                 for name, v in saved["sources"].items()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"statistics={path!r} is not a pole statistics file of this version "
                         f"of locate_values.py: {err}") from err
    if saved["model"] != signature:
        raise ValueError(f"statistics={path!r} was gathered on {saved['model']}, but this "
                         f"model is {signature}")
    missing = [s for s in sources if s not in stats]
    if missing:
        raise ValueError(f"statistics={path!r} has no response set {missing} (locate.contrast "
                         "may differ from the run that wrote it)")
    return stats


def save_sets(sets: dict[str, DimensionSets], out: Path, layers: int) -> list[dict[str, Any]]:
    """Write every set; return one table row per dimension."""
    rows = []
    for dim, s in sets.items():
        s.toward.save(out / f"neurons_{dim}.json")
        s.away.save(out / f"neurons_{dim}_away.json")
        s.random_toward.save(out / f"random_{dim}.json")
        s.random_away.save(out / f"random_{dim}_away.json")
        n, some = s.toward, len(s.toward) > 0
        rows.append({"dimension": dim, "neurons": len(n), "away": len(s.away),
                     "max_delta": float(n.delta.max()) if some else 0.0,
                     "min_delta": float(n.delta.min()) if some else 0.0,
                     "mean_prob": float(n.prob.mean()) if some and n.prob is not None
                     else float("nan"),
                     "mean_p95": float(n.scale.mean()) if some else 0.0,
                     "layers": " ".join(map(str, n.layer_histogram(layers)))})
    return rows


def load_sets(folder: str, dims: list[str], model: Any) -> dict[str, tuple[ValueNeurons, ...]]:
    """(toward, away) per dimension from a run dir; a run without _away.json files (the
    opposite-pole contrast of earlier versions) gives the opposite pole's set as `away`."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"neurons={folder!r} does not exist or is not a folder "
                                "(give a locate_values.py run dir)")
    out = {}
    for dim in dims:
        away = root / f"neurons_{dim}_away.json"
        if not away.exists():
            away = root / f"neurons_{OPPOSITE[dim]}.json"
        out[dim] = (ValueNeurons.load(root / f"neurons_{dim}.json", model),
                    ValueNeurons.load(away, model))
    return out
