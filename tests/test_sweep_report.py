"""The sweep workflow: `train.py -m` ends in one summary table read back from the jobs' event
files; `python -m bench.report` rebuilds it over any runs; TensorBoard run names carry the
swept values; completions and per-phase times reach TensorBoard."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from train import train
from tests.helpers import TINY, compose_entry, run_entry

TB = [o for o in TINY if o != "logger=csv"] + ["logger=tensorboard", "~callbacks.value_monitor"]


def raw_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalars straight from the event protobufs (not through bench.report's reader)."""
    out: dict[str, list[float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append(value.simple_value)
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(value.tag, []).append(float(
                        value.tensor.float_val[0] if value.tensor.float_val else
                        value.tensor.double_val[0]))
    return out


def raw_texts(folder: Path, tag: str) -> list[str]:
    texts = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.startswith(tag) and value.tensor.string_val:
                    texts.append(value.tensor.string_val[0].decode())
    return texts


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = run_entry("train.py", "-m", *TB, "sampler=full,micro", f"hydra.sweep.dir={root}",
                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return root, proc.stdout


def test_sweep_summary_equals_the_event_files(sweep):
    root, out = sweep
    assert (root / "summary.md").is_file() and (root / "summary.png").stat().st_size > 1000
    assert "sweep summary:" in out
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert [r["overrides"].split(",")[-1] for r in rows] == ["sampler=full", "sampler=micro"]
    for row, job in zip(rows, ("0", "1")):
        raw = raw_scalars(root / job)
        assert row["status"] == "ok" and int(row["steps"]) == len(raw["train/reward"]) == 2
        for column, tag in (("step s", "time/step_s"), ("decoding steps",
                                                        "sampling/decoding_steps")):
            assert math.isclose(float(row[column]), sum(raw[tag]) / len(raw[tag]),
                                rel_tol=1e-6), column
        assert math.isclose(float(row["reward last 5"]),
                            sum(raw["train/reward"]) / 2, rel_tol=1e-6, abs_tol=1e-9)


def test_run_names_carry_the_swept_values(sweep):
    root, _ = sweep
    for job, name in (("0", "sampler=full"), ("1", "sampler=micro")):
        folder = root / job / "tensorboard" / name
        assert folder.is_dir() and any(folder.glob("events.out.tfevents.*")), \
            sorted(p.name for p in (root / job / "tensorboard").iterdir())


def test_report_over_two_sweeps(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "cmp"
    proc = run_entry("-m", "bench.report", str(root), str(root / "1"), "--out", str(out),
                     timeout=120)
    assert proc.returncode == 0, proc.stdout
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 3 and rows[1]["step s"] == rows[2]["step s"]  # job 1 twice
    bad = run_entry("-m", "bench.report", str(tmp_path / "none"))
    assert bad.returncode == 1 and bad.stdout.startswith("error: no run found")


def test_completions_and_times_reach_tensorboard(tmp_path):
    _, objects = train(_cfg(tmp_path, "callbacks.completions.every_n_steps=1"))
    texts = raw_texts(tmp_path, "completions/train")
    assert len(texts) == 2  # steps 0 and 1
    record, tokenizer = objects["model"].last_step, objects["model"].tokenizer
    r = record.rollouts
    for row in (r.prompt_index == 0).nonzero().flatten().tolist():
        text = tokenizer.decode(r.completion_ids[row, : r.lengths[row]],
                                skip_special_tokens=True)
        cell = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ")[:299]
        assert cell in texts[-1]
        assert f"| {float(record.rewards[row]):.3f} | {int(r.lengths[row])} |" in texts[-1]
        assert f"{float(record.advantages[row]):+.3f} |" in texts[-1]
    assert raw_texts(tmp_path, "completions/val")  # the validation's greedy completions
    raw = raw_scalars(tmp_path)
    for k in range(2):
        parts = [raw[f"time/{p}_s"][k] for p in ("sampling", "reward", "update")]
        assert all(p > 0 for p in parts) and sum(parts) <= raw["time/step_s"][k]
    hparams = [e for p in tmp_path.rglob("events.out.tfevents.*")
               for e in EventFileLoader(str(p)).Load()
               for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert hparams and "summary/steps" in raw


def _cfg(tmp_path, *overrides):
    return compose_entry("train", [*TB, *overrides], tmp_path)
