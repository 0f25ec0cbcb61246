"""`python -m bench` Tables C and D end to end on the tiny policy (record -> predictor ->
scheduler), with Table C's bounds recomputed by hand from the recorded rollouts."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from tests.helpers import run_entry

ROOT = Path(__file__).resolve().parents[1]
M = 4  # micro_group_size: the m of every Table C schedule
TINY = ["policy=tiny", "data=arithmetic", "num_prompts=6", "heldout_prompts=2", "group_size=8",
        "record_group_size=4", f"micro_group_size={M}", "max_new_tokens=24", "fit_steps=20",
        "probe_tokens=4", "probe_sweep=[0,4]"]
ORACLE = "oracle"


def bench(tmp_path: Path, *overrides: str) -> None:
    run_entry("-m", "bench", *TINY, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}",
              *overrides, timeout=600, check=True)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tables_c_and_d_on_the_tiny_policy(tmp_path):
    bench(tmp_path, "table=record")
    heldout = tmp_path / "rollouts_arithmetic_heldout.pt"
    assert heldout.is_file()
    bench(tmp_path, "table=predictor")
    assert {r["predictor"] for r in rows(tmp_path / "predictor_arithmetic.csv")} >= {
        "history", "minilm", "hidden"}
    bench(tmp_path, "table=scheduler")
    summary = rows(tmp_path / "scheduler_arithmetic.csv")
    schedules = 10  # 4 stream + 6 two-phase rows per predictor
    assert len([r for r in summary if r["predictor"] == ORACLE]) == schedules
    assert any("infinite" in r["scheduler"] and float(r["tok_s"]) > 0 for r in summary)
    groups = rows(tmp_path / "scheduler_arithmetic_groups.csv")
    assert len(groups) == 2 * 4 * schedules  # groups x (oracle + 3 learned) x schedules

    # No schedule on m slots beats max(max L, ceil(sum L / m)), and plain refill in (prompt,
    # sample) order is list scheduling; both computed here from the file `table=record` wrote.
    record = torch.load(heldout, weights_only=True)
    oracle = {(int(r["group"]), r["scheduler"]): r for r in groups if r["predictor"] == ORACLE}
    for i in range(2):
        lengths = record["lengths"][record["prompt_index"] == i].tolist()
        lb = max(max(lengths), math.ceil(sum(lengths) / M))
        free = [0] * M
        for n in lengths:  # continuous refill by hand: each sample on the slot freed first
            free[free.index(min(free))] += n
        for (group, scheduler), r in oracle.items():
            if group == i:
                assert int(r["lb"]) == lb, (i, scheduler)
                assert int(r["steps"]) >= lb, (i, scheduler)
                assert int(r["continuous"]) == max(free)
                assert float(r["over_continuous"]) == pytest.approx(int(r["steps"]) / max(free))
        assert oracle[i, "stream auto"]["plan"] in {"continuous", "attained", "predicted"}
        assert oracle[i, "stream attained"]["plan"] == "attained"
        assert oracle[i, "two-phase sjf"]["plan"] == "sjf"  # grouping none: the refill order


@pytest.mark.slow
def test_table_f_kv_equals_the_layouts_closed_form(tmp_path):
    """Table F on the tiny policy (char tokenizer, so few_shot=1 makes a much longer prompt):
    every measured `kv_gb` equals the layout's closed form computed here from the model config
    (shared P + m·L, copied m·(P + L) + P), shared holds less than copied, and `auto` under one
    budget gives shared at least the slots of copied."""
    from modules.policy import tiny

    bench(tmp_path, "table=prompt_kv", "data=gsm8k", "group_size=4", "micro_group_size=2",
          "max_new_tokens=8", "prompt_kv.few_shot=[0,1]", "prompt_kv.bare_steps=2",
          "prompt_kv.budget_gb=0.0025", "name=f")
    cfg = tiny().model.config
    heads = cfg.num_key_value_heads
    per_token = 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    table = rows(tmp_path / "f.csv")
    measured = [r for r in table if r["prompt_kv"] and not r["budget_gb"]]
    assert len(measured) == 8  # 2 prompts x (full, micro) x 2 layouts
    for r in measured:
        p, m, new = int(r["P"]), int(r["m"]), 8
        tokens = p + m * new if r["prompt_kv"] == "shared" else m * (p + new) + p
        assert float(r["kv_gb"]) == pytest.approx(tokens * per_token / 2**30, rel=1e-9), r
    lengths = sorted({int(r["P"]) for r in measured})
    assert len(lengths) == 2 and lengths[1] > 2 * lengths[0]
    for p in lengths:
        auto = {r["prompt_kv"]: int(r["m"]) for r in table if r["budget_gb"] and int(r["P"]) == p}
        assert auto["shared"] >= auto["copied"]
    long_auto = {r["prompt_kv"]: int(r["m"]) for r in table
                 if r["budget_gb"] and int(r["P"]) == lengths[1]}
    assert long_auto["shared"] > long_auto["copied"]
    # per-step references: bare loop (argmax, sampled) and engine (both layouts) per P and batch
    same = {(r["sampler"], int(r["P"])) for r in table if not r["G"]}
    assert same == {(f"{kind} x{batch}", p) for p in lengths for batch in (2, 4)
                    for kind in ("bare forward argmax", "bare forward sampled",
                                 "engine copied", "engine shared")}
