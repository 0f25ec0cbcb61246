"""bench.py Tables C and D end to end on the tiny policy (record -> predictor -> scheduler)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["policy=tiny", "data=arithmetic", "num_prompts=6", "heldout_prompts=2", "group_size=8",
        "record_group_size=4", "micro_group_size=4", "max_new_tokens=24", "fit_steps=20",
        "probe_tokens=4", "probe_sweep=[0,4]"]


def bench(tmp_path: Path, *overrides: str) -> None:
    out = subprocess.run([sys.executable, "bench.py", *TINY, f"out_dir={tmp_path}",
                          f"hydra.run.dir={tmp_path / 'hydra'}", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_tables_c_and_d_on_the_tiny_policy(tmp_path):
    bench(tmp_path, "table=record")
    assert (tmp_path / "rollouts_arithmetic_heldout.pt").is_file()
    bench(tmp_path, "table=predictor")
    rows = list(csv.DictReader(open(tmp_path / "predictor_arithmetic.csv")))
    assert {r["predictor"] for r in rows} >= {"history", "minilm", "hidden"}
    bench(tmp_path, "table=scheduler")
    rows = list(csv.DictReader(open(tmp_path / "scheduler_arithmetic.csv")))
    oracle = [r for r in rows if r["predictor"] == "oracle (k=0)"]
    assert len(oracle) == 6 and all(float(r["steps_over_lb"]) >= 1 for r in oracle)
    assert any("infinite" in r["scheduler"] and float(r["tok_s"]) > 0 for r in rows)
    groups = list(csv.DictReader(open(tmp_path / "scheduler_arithmetic_groups.csv")))
    assert len(groups) == 2 * 4 * 6  # groups x (oracle + 3 learned) x schedulers
