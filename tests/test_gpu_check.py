"""`make gpu-check` (bench/gpu_check.py) without a GPU: its dry run at toy sizes through the
same commands (Table A at a Qwen3 shape, the decode step against a bare forward), a failing
part reported while the next runs, and the requirements it installs leaving torch alone."""
from __future__ import annotations

import sys

import pytest
import torch

from bench import gpu_check
from tests.helpers import run_entry


@pytest.mark.slow
def test_dry_run_writes_the_report_with_table_a_at_a_qwen3_shape(tmp_path):
    out = run_entry("-m", "bench.gpu_check", "--dry-run", "--parts", "experiment,tables,decode",
                    "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for part in ("experiment", "tables", "decode"):
        assert f"| {part} | pass |" in report
    assert "21.55 GB" in report and "CPU dry run" in report
    table = (tmp_path / "memory.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["full", "micro", "continuous",
                                                         "infinite"]
    assert "engine" in report and "bare forward" in report  # the per-step comparison
    experiment = (tmp_path / "experiment.md").read_text()
    assert "experiment=gsm8k_qwen3" in experiment and "| ok |" in experiment


def test_a_failing_part_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    def parts(sizes, out):
        return [gpu_check.Part("tests", [sys.executable, "-c", "import sys; print('boom');"
                                         " sys.exit(3)"], []),
                gpu_check.Part("default", [sys.executable, "-c", "print('fine')"], [])]

    monkeypatch.setattr(gpu_check, "parts", parts)
    monkeypatch.setattr(gpu_check, "run_summary", lambda out, name: None)
    code = gpu_check.main(["--dry-run", "--parts", "tests,default", "--out", str(tmp_path)])
    report = (tmp_path / "gpu_check.md").read_text()
    assert code == 1
    assert "| tests | fail (exit 3) |" in report and "| default | pass |" in report
    assert "boom" in report  # a failing part's output ends up in the report


def test_requirements_leave_torch_alone_and_bad_parts_are_named(capsys):
    wanted = gpu_check.requirements_but_torch()
    names = [r.split(">")[0].split("<")[0].split("=")[0] for r in wanted]
    assert "torch" not in names and "torchmetrics" in names and "transformers" in names
    assert gpu_check.main(["--parts", "tables,nope"]) == 2
    assert "nope" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_it_says_so_in_one_line():
    out = run_entry("-m", "bench.gpu_check")
    assert out.returncode == 2
    assert out.stdout.startswith("error: no CUDA device") and "Traceback" not in out.stdout
