"""Prompt sources and PromptDataModule (offline). Run: pytest -q tests/test_data.py"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import sources
from datamodules.prompts import PromptDataModule, ResumableDataLoader, ShardedSampler
from modules.rewards import format_reward, gsm8k_reward
from tests.helpers import compose_entry


def _toy_source(n: int) -> list[dict]:
    return [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


def _dm(tokenizer, n: int = 20, **kwargs) -> PromptDataModule:
    kwargs.setdefault("val_size", 4)
    return PromptDataModule(functools.partial(_toy_source, n), tokenizer, **kwargs)


# ---- sources ------------------------------------------------------------------------------------


def test_gsm_symbolic_is_offline_and_deterministic() -> None:
    records = sources.gsm8k(source="gsm_symbolic", size=5, seed=1)
    assert len(records) == 5
    assert all(isinstance(r["question"], str) for r in records)
    assert all(r["answer"].lstrip("-").isdigit() for r in records)
    assert records == sources.gsm8k(source="gsm_symbolic", size=5, seed=1)


def test_arithmetic_answers_are_correct() -> None:
    records = sources.arithmetic(size=20, seed=0)
    assert len(records) == 20
    for r in records:
        expression = r["question"].removeprefix("Calculate ").rstrip(".")
        assert eval(expression) == int(r["answer"])  # noqa: S307 - generated "a + b" / "a - b"


def test_chat_reads_ifbench_prompts() -> None:
    records = sources.chat(size=3)
    assert len(records) == 3
    assert all(r["answer"] is None and r["question"] for r in records)
    assert len(sources.chat()) > 100


def test_gsm8k_jsonl_extracts_answer_after_hashes(tmp_path: Path) -> None:
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "q1", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "q2", "answer": 7},
        {"question": "q3"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = sources.gsm8k(source="jsonl", path=str(path), size=None)
    assert records == [
        {"question": "q1", "answer": "4"},
        {"question": "q2", "answer": "7"},
        {"question": "q3", "answer": None},
    ]
    assert len(sources.gsm8k(source="jsonl", path=str(path), size=2)) == 2


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"source must be one of .*gsm_symbolic.*got 'nope'"):
        sources.gsm8k(source="nope")
    with pytest.raises(ValueError, match="path is required"):
        sources.gsm8k(source="jsonl")
    with pytest.raises(ValueError, match="size"):
        sources.arithmetic(size=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no string field 'question'"):
        sources.gsm8k(source="jsonl", path=str(bad))


# ---- long prompts: few-shot GSM8K and chat with reference material -----------------------------

_EXAMPLE = re.compile(r"Question: (.*?)\nAnswer: (.*?)\n#### (\S+)\n\n", re.DOTALL)


def _header(shot: dict, plain: dict) -> str:
    """The few-shot part of `shot`'s question: everything before "Question: <plain question>"."""
    suffix = f"Question: {plain['question']}"
    assert shot["question"].endswith(suffix) and shot["answer"] == plain["answer"]
    return shot["question"][: -len(suffix)]


def _rg_items(size: int, seed: int) -> list[dict]:
    import reasoning_gym

    return list(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed))


def test_gsm8k_few_shot_zero_is_unchanged() -> None:
    expected = [{"question": it["question"], "answer": str(it["answer"])} for it in _rg_items(5, 1)]
    assert sources.gsm8k(size=5, seed=1) == expected
    assert sources.gsm8k(size=5, seed=1, few_shot=0) == expected


def test_gsm8k_few_shot_header_is_fixed_real_and_not_a_question() -> None:
    plain = sources.gsm8k(size=6, seed=1)
    shots = sources.gsm8k(size=6, seed=1, few_shot=3)
    headers = {_header(s, p) for s, p in zip(shots, plain)}
    assert len(headers) == 1  # one header for every question
    header = headers.pop()
    examples = _EXAMPLE.findall(header)
    assert (
        len(examples) == 3
        and "".join(f"Question: {q}\nAnswer: {a}\n#### {n}\n\n" for q, a, n in examples) == header
    )
    assert not any(p["question"] in header for p in plain)
    # real generator items: the worked solution is the item's own, graded right by the rewards
    pool = {it["question"]: it for it in _rg_items(32, 1 + sources.FEW_SHOT_SEED_OFFSET)}
    for question, steps, final in examples:
        item = pool[question]
        assert final == str(item["answer"])
        assert steps in item["metadata"]["answer_cot"]
        solution = f"{steps}\n#### {final}"
        assert gsm8k_reward([solution], [str(item["answer"])]) == [1.0]
        assert format_reward([solution]) == [1.0]
    assert sources.gsm8k(size=6, seed=1, few_shot=3) == shots  # deterministic
    # the header depends on the seed only, and k examples are the first k of k + 1
    assert _header(sources.gsm8k(size=2, seed=1, few_shot=3)[1], plain[1]) == header
    assert _header(sources.gsm8k(size=6, seed=1, few_shot=4)[0], plain[0]).startswith(header)
    other_seed = sources.gsm8k(size=1, seed=2, few_shot=3)[0], sources.gsm8k(size=1, seed=2)[0]
    assert _header(*other_seed) != header


def test_gsm8k_few_shot_lengthens_prompts_by_the_examples(char_tokenizer) -> None:
    def prompt_lengths(few_shot: int) -> dict[int, int]:
        source = functools.partial(sources.gsm8k, size=8, seed=0, few_shot=few_shot)
        dm = PromptDataModule(source, char_tokenizer, val_size=2)
        dm.setup()
        return {x["index"]: len(x["prompt_ids"]) for x in dm.train_items + dm.val_items}

    base, longer = prompt_lengths(0), prompt_lengths(2)
    deltas = {longer[i] - base[i] for i in base}
    assert len(deltas) == 1  # the same header before every question
    # expected: the two examples' question + worked solution (one char = one token here), labels
    header = _header(sources.gsm8k(size=1, seed=0, few_shot=2)[0], sources.gsm8k(size=1, seed=0)[0])
    pool = {it["question"]: it for it in _rg_items(32, sources.FEW_SHOT_SEED_OFFSET)}
    chosen = [pool[q] for q, _, _ in _EXAMPLE.findall(header)]
    expected = sum(len(it["question"]) + len(it["metadata"]["answer_cot"]) for it in chosen)
    expected += 2 * len("Question: \nAnswer: \n\n") + len("Question: ")
    assert abs(deltas.pop() - expected) <= 4  # "#### 24.0" in a solution is written "#### 24"


def test_gsm8k_few_shot_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "q1", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
        {"question": "q2", "answer": "3"},
        {"question": "q3", "answer": "#### 4"},
        {"question": "q1", "answer": "a repeat of a question is never an example\n#### 2"},
        {"question": "q4"},  # no answer: not an example
        {"question": "q5", "answer": "2 * 3 = <<2*3=6>>6 cups\n#### 6"},
        {"question": "q6", "answer": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = sources.gsm8k(source="jsonl", path=str(path), size=3, few_shot=2)
    header = "Question: q5\nAnswer: 2 * 3 = 6 cups\n#### 6\n\nQuestion: q6\nAnswer: #### 7\n\n"
    assert records == [
        {"question": f"{header}Question: q1", "answer": "2"},
        {"question": f"{header}Question: q2", "answer": "3"},
        {"question": f"{header}Question: q3", "answer": "4"},
    ]
    everything = sources.gsm8k(source="jsonl", path=str(path), size=None, few_shot=1)
    assert len(everything) == 6 and everything[0]["question"].startswith("Question: q6\n")
    with pytest.raises(ValueError, match=r"few_shot=3 is larger than the pool .* has 2 usable"):
        sources.gsm8k(source="jsonl", path=str(path), size=3, few_shot=3)
    with pytest.raises(ValueError, match=r"few_shot=7 leaves no questions"):
        sources.gsm8k(source="jsonl", path=str(path), size=None, few_shot=7)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_gsm8k_bad_few_shot(bad) -> None:
    with pytest.raises(ValueError, match=re.escape(f"few_shot must be an int >= 0, got {bad!r}")):
        sources.gsm8k(size=4, few_shot=bad)


def _passage_words(n: int) -> str:
    """The first n words of the shipped passages, read here independently of the source."""
    lines = sources.PASSAGES.read_text(encoding="utf-8").splitlines()
    words = " ".join(json.loads(line)["text"] for line in lines if line.strip()).split()
    return " ".join(words[:n])


def test_chat_context_is_fixed_reference_material() -> None:
    plain = sources.chat(size=4)
    assert all(set(r) == {"question", "answer"} for r in plain)
    assert sources.chat(size=4, context=None) == plain
    records = sources.chat(size=4, context="passages", context_words=120)
    assert [{"question": r["question"], "answer": r["answer"]} for r in records] == plain
    systems = {r["system"] for r in records}
    assert len(systems) == 1  # the same reference material in every prompt
    system = systems.pop()
    body = system.removeprefix("Reference material:\n\n")
    assert body != system and len(body.split()) == 120
    assert " ".join(body.split()) == _passage_words(120)  # real text, line breaks aside
    assert "\n\n" in body  # passages stay separate paragraphs
    assert sources.chat(size=4, context="passages", context_words=120) == records
    whole = sources.chat(size=1, context="passages")[0]["system"]
    assert whole.startswith(system) and len(whole.split()) == 2 + len(_passage_words(10**6).split())


def test_chat_context_from_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("  one two\nthree   four five\n")
    (record,) = sources.chat(size=1, context=str(path), context_words=3)
    assert record["system"] == "Reference material:\n\none two\nthree"
    (record,) = sources.chat(size=1, context=str(path))
    assert record["system"] == "Reference material:\n\none two\nthree   four five"


def test_chat_context_lengthens_prompts_by_the_system_message(char_tokenizer) -> None:
    def items(**context) -> list[dict]:
        source = functools.partial(sources.chat, size=6, **context)
        dm = PromptDataModule(
            source, char_tokenizer, val_size=1, instruction=None, system_prompt="Be brief."
        )
        dm.setup()
        return dm.train_items + dm.val_items

    base = items()
    longer = items(context="passages", context_words=200)
    system = sources.chat(size=1, context="passages", context_words=200)[0]["system"]
    added = len(char_tokenizer(f"\n\n{system}", add_special_tokens=False)["input_ids"])
    assert added > 1000  # 200 words of prose
    for short, long in zip(base, longer):
        assert len(long["prompt_ids"]) - len(short["prompt_ids"]) == added
        text = char_tokenizer.decode(long["prompt_ids"])
        assert text.startswith("<|im_start|>system\nBe brief.\n\nReference material:\n\nA ")
    assert items(context="passages", context_words=200) == longer  # deterministic


def test_chat_bad_context(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"context must be None, one of \('passages',\) or"):
        sources.chat(context="nope")
    with pytest.raises(ValueError, match=r"context_words=5 needs a context"):
        sources.chat(context_words=5)
    for bad in (0, -3, 10**6):
        with pytest.raises(ValueError, match=r"context_words must be an int in \[1, 1885\]"):
            sources.chat(context="passages", context_words=bad)
    with pytest.raises(ValueError, match=r"context_words must be an int >= 1 or None, got '9'"):
        sources.chat(context="passages", context_words="9")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="has no text"):
        sources.chat(context=str(empty))


def test_record_system_must_be_a_string(char_tokenizer) -> None:
    records = [{"question": "q", "answer": None, "system": 3}, {"question": "r", "answer": None}]
    dm = PromptDataModule(lambda: records, char_tokenizer, val_size=1)
    with pytest.raises(ValueError, match=r"record 0: 'system' must be a string or absent, got 3"):
        dm.setup()


def test_long_prompt_config_keys() -> None:
    from hydra.utils import instantiate

    cfg = compose_entry("train", ["data=gsm8k", "data.source.size=2", "data.source.few_shot=2"])
    assert cfg.data.source.few_shot == 2
    assert instantiate(cfg.data.source)()[0]["question"].count("Question: ") == 3
    cfg = compose_entry("train",
        [
            "data=chat",
            "data.source.size=1",
            "data.source.context=passages",
            "data.source.context_words=7",
        ]
    )
    (record,) = instantiate(cfg.data.source)()
    assert len(record["system"].split()) == 2 + 7
    assert compose_entry("train", ["data=chat"]).data.source.context is None


# ---- tokenizer ----------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_renders_chatml(char_tokenizer) -> None:
    text = "Calculate 5 - 3.\n\n#### 2 {ok}~"
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids) == text
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    prompt = char_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    assert char_tokenizer.eos_token == char_tokenizer.pad_token == "<|im_end|>"
    ids = char_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == char_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert char_tokenizer.decode(ids) == prompt


# ---- PromptDataModule ---------------------------------------------------------------------------


def test_setup_splits_and_builds_chat_prompts(char_tokenizer) -> None:
    dm = _dm(char_tokenizer, n=20, val_size=4, system_prompt="Be brief.")
    dm.setup("fit")
    train, val = dm.train_items, dm.val_items
    assert len(train) == 16 and len(val) == 4
    assert {x["index"] for x in train}.isdisjoint(x["index"] for x in val)
    assert {x["index"] for x in train} | {x["index"] for x in val} == set(range(20))
    item = train[0]
    text = char_tokenizer.decode(item["prompt_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(
        f"{item['question']}\n\nSolve the problem. Write the final answer after '####'."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    same = _dm(char_tokenizer, n=20, val_size=4, system_prompt="Be brief.")
    same.setup()
    assert [x["index"] for x in same.val_items] == [x["index"] for x in val]  # deterministic


def test_plain_text_without_chat_template(char_tokenizer) -> None:
    tok = char_tokenizer.__class__(tokenizer_object=char_tokenizer.backend_tokenizer)
    tok.chat_template = None
    dm = PromptDataModule(lambda: _toy_source(3), tok, val_size=1, instruction=None)
    dm.setup()
    assert tok.decode(dm.train_items[0]["prompt_ids"]) == dm.train_items[0]["question"]


def test_batches_are_dicts_of_lists(char_tokenizer) -> None:
    dm = _dm(char_tokenizer, n=20, batch_size=3, val_size=5, val_batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt_ids", "answer", "question", "index"}
    assert all(isinstance(v, list) and len(v) == 3 for v in batch.values())
    assert all(isinstance(t, int) for t in batch["prompt_ids"][0])
    assert batch["answer"] == [str(i + 1) for i in batch["index"]]
    assert len(dm.train_dataloader()) == 15 // 3
    val_batches = list(dm.val_dataloader())
    assert [len(b["index"]) for b in val_batches] == [2, 2, 1]
    assert [i for b in val_batches for i in b["index"]] == [x["index"] for x in dm.val_items]


def test_train_shards_are_disjoint_and_equal(char_tokenizer) -> None:
    shards, val_shards = [], []
    for rank in range(2):
        dm = _dm(char_tokenizer, n=27, batch_size=3, val_size=5)  # 22 train -> 3 batches per rank
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup()
        loader = dm.train_dataloader()
        shards.append([i for b in loader for i in b["index"]])
        assert len(loader) == 3
        val_shards.append([i for b in dm.val_dataloader() for i in b["index"]])
    assert len(shards[0]) == len(shards[1]) == 9
    assert set(shards[0]).isdisjoint(shards[1])
    assert set(val_shards[0]).isdisjoint(val_shards[1])
    assert sorted(val_shards[0] + val_shards[1]) == sorted(x["index"] for x in dm.val_items)


def test_shuffle_depends_on_epoch_and_seed() -> None:
    def order(epoch: int, seed: int = 0) -> list[int]:
        sampler = ShardedSampler(32, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != order(0, seed=1)
    assert sorted(order(1)) == list(range(32))


def test_loader_state_resumes_without_trainer(char_tokenizer) -> None:
    dm = _dm(char_tokenizer, n=20, batch_size=2)
    dm.setup()
    full = [b["index"] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it)["index"] for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 3
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert seen + [b["index"] for b in resumed] == full


def test_too_long_prompt_names_record(char_tokenizer) -> None:
    records = _toy_source(5)
    records[2]["question"] = "x" * 100
    dm = PromptDataModule(lambda: records, char_tokenizer, val_size=1, max_prompt_tokens=100)
    match = r"record 2: prompt has 1\d\d tokens, .*max_prompt_tokens=100"
    with pytest.raises(ValueError, match=match):
        dm.setup()


def test_empty_source_and_bad_val_size(char_tokenizer) -> None:
    with pytest.raises(ValueError, match="data source .*empty_source.* returned no records"):
        PromptDataModule(lambda: [], char_tokenizer).setup()
    with pytest.raises(ValueError, match="val_size=5 must be smaller than the 5 records"):
        _dm(char_tokenizer, n=5, val_size=5).setup()
    with pytest.raises(ValueError, match="batch_size"):
        _dm(char_tokenizer, batch_size=0)


# ---- exact mid-epoch resume through a real Trainer ----------------------------------------------


class _Recorder(LightningModule):
    """Records the prompt indices of every training batch; one scalar parameter to step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(list(batch["index"]))
        return (self.w - 1.0) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tokenizer, root: Path, max_steps: int, ckpt_path: Path | None = None) -> list[list[int]]:
    dm = _dm(tokenizer, n=10, batch_size=2, val_size=2)  # 8 train records -> 4 batches per epoch
    module = _Recorder()
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=root,
        callbacks=[
            ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=1, save_top_k=-1),
            ModelCheckpoint(dirpath=root / "epochs", save_top_k=-1),  # after validation
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers / checkpoint-dir notices
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(
    ("ckpt", "step"),
    [
        ("steps/epoch=0-step=3.ckpt", 3),  # mid-epoch
        ("steps/epoch=0-step=4.ckpt", 4),  # after the last batch of epoch 0, before validation
        ("epochs/epoch=0-step=4.ckpt", 4),  # end of epoch 0, after validation
        ("steps/epoch=1-step=5.ckpt", 5),  # mid-epoch 1 (a reshuffled epoch)
    ],
)
def test_resume_continues_with_the_next_batch(
    char_tokenizer, tmp_path_factory: pytest.TempPathFactory, ckpt: str, step: int
) -> None:
    full_dir = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not (full_dir / "seen.json").exists():  # one uninterrupted run shared by the cases
        full = _fit(char_tokenizer, full_dir, max_steps=7)  # epoch 0: 4 steps, epoch 1: 3
        (full_dir / "seen.json").write_text(json.dumps(full))
    full = json.loads((full_dir / "seen.json").read_text())
    assert len(full) == 7 and full[:3] != full[4:7]
    if step == 3:
        state = torch.load(full_dir / ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]
        assert state["combined_loader"] == [{"epoch": 0, "batches": 3, "num_batches": 4}]
    resumed = _fit(char_tokenizer, tmp_path_factory.mktemp("resumed"), 7, full_dir / ckpt)
    assert resumed == full[step:]


def test_train_loader_is_lightning_stateful(char_tokenizer) -> None:
    from lightning.fabric.utilities.types import _Stateful

    dm = _dm(char_tokenizer)
    dm.setup()
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
    assert isinstance(dm.train_dataloader(), _Stateful)
