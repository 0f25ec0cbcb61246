"""Multi-process and multi-run tests: DDP on two CPU processes (gloo), Hydra multirun."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    run([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.max_steps=3",
         "model.lr=1e-3", "callbacks.model_checkpoint.every_n_train_steps=1000",
         f"hydra.run.dir={tmp_path}"])
    digests = [(tmp_path / f"weights_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_multirun_sweeps_samplers(tmp_path):
    run(["-m", *TINY, "sampler=hf_generate,full", "trainer.max_steps=1", "callbacks=none",
         f"hydra.sweep.dir={tmp_path}"])
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / job / "csv" / "metrics.csv").exists()
        assert (tmp_path / job / ".hydra" / "config.yaml").exists()
