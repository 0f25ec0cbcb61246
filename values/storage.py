"""What a value-neuron run writes and reads back: location statistics (pole_statistics.pt, per
prompt counts included) and neuron sets (neurons_<dimension>.json, neurons_<dimension>_away.json,
random_*.json), each tied to the model architecture it came from; and the cache of location
statistics (`locate.cache`), keyed by everything that decides the greedy location responses.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from values.experiment import DimensionSets
from values.location import SourceStats
from values.neurons import OPPOSITE, ValueNeurons
from values.statistics import ActivationSummary, PromptCounts


def save_statistics(stats: dict[str, SourceStats], signature: dict, path: Path,
                    responses: bool = True) -> None:
    """`path` (.pt, the responses' texts included) and, with `responses`, beside it
    pole_responses.jsonl: the greedy location responses to read."""
    if responses:
        with open(path.with_name("pole_responses.jsonl"), "w") as handle:
            handle.writelines(json.dumps({"source": name, "text": text}) + "\n"
                              for name, s in stats.items() for text in s.texts)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": signature, "sources": {
        name: {"prob": s.summary.prob, "p95": s.summary.p95, "tokens": s.summary.tokens,
               "over_zero": s.counts.over_zero.to(torch.int16),  # counts <= max_new_tokens
               "prompt_tokens": s.counts.tokens, "texts": list(s.texts)}
        for name, s in stats.items()}}, tmp)
    os.replace(tmp, path)  # a run killed mid-save leaves no half-written file (the cache)


def load_statistics(path: str, signature: dict, sources: list[str]) -> dict[str, SourceStats]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"statistics={path!r} does not exist (locate_values.py writes "
                                "pole_statistics.pt in its run dir)")
    try:
        saved = torch.load(path, weights_only=True)
        stats = {name: SourceStats(ActivationSummary(v["prob"], v["p95"], int(v["tokens"])),
                                   PromptCounts.of(v["over_zero"], v["prompt_tokens"]),
                                   list(v.get("texts", [])))
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


def location_key(model: Any, prompts: dict[str, list[list[int]]], max_new_tokens: int,
                 eos_token_ids: Any, sampler: str, code: list[Any] = ()) -> str:
    """SHA-256 of what decides the location statistics: the weights (every tensor of the state
    dict, with its name, dtype and device type), the location prompts' token ids per source,
    the response length, the stop ids, the sampler's settings, the source files of the `code`
    modules that decode and count (a change there invalidates the cache), and the torch and
    transformers versions (their kernels decide greedy ties)."""
    digest = hashlib.sha256()
    for module in code:
        digest.update(Path(module.__file__).read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tensor.device.type}:{tuple(tensor.shape)}"
                      .encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens,
                              "eos": sorted(map(int, eos_token_ids or [])), "sampler": sampler,
                              "torch": torch.__version__,
                              "transformers": transformers.__version__},
                             sort_keys=True).encode())
    return digest.hexdigest()


def save_sets(sets: dict[str, DimensionSets], out: Path, layers: int) -> list[dict[str, Any]]:
    """Write every set; return one table row per dimension."""
    rows = []
    for dim, s in sets.items():
        s.toward.save(out / f"neurons_{dim}.json")
        s.away.save(out / f"neurons_{dim}_away.json")
        s.random_toward[0].save(out / f"random_{dim}.json")  # the others: seed + 1000 * draw
        s.random_away[0].save(out / f"random_{dim}_away.json")
        n, some = s.toward, len(s.toward) > 0
        rows.append({"dimension": dim, "neurons": len(n), "away": len(s.away),
                     "source": n.meta.get("source", ""), "random sets": len(s.random_toward),
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
