"""Multi-process and multi-run tests: DDP on two CPU processes (gloo), Hydra multirun."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY
from tests.test_grpo_module import DENSE


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
@pytest.mark.parametrize("loss_type,scale", [("token_mean", "batch"), ("sequence_mean", "group"),
                                             ("dr_grpo", "none")])
def test_ddp_gradient_equals_one_process_on_the_whole_batch(tmp_path, loss_type, scale):
    """Two gloo ranks on halves of a batch (2 prompts each) give the gradient of one process
    on the whole batch (4 prompts): the token and sequence normalisers and the batch reward
    std are all-reduced, and each rank's loss is scaled for DDP's gradient averaging. The
    rollouts of a prompt are made rank-independent by seeding them from its tokens."""
    common = [*TINY, *DENSE, f"model.loss_type={loss_type}", f"model.advantage_scale={scale}",
              "model.max_grad_norm=1e9", "model.update_micro_batch=3", "trainer.max_steps=1",
              "sampler=full", "sampler._target_=tests.helpers.PromptSeededSampler",
              "callbacks=none", "+callbacks.grads._target_=tests.helpers.GradDump"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "data.batch_size=4", f"+callbacks.grads.dirpath={one}",
         f"hydra.run.dir={one}"])
    run([*common, "trainer=ddp", "trainer.accelerator=cpu", "data.batch_size=2",
         f"+callbacks.grads.dirpath={two}", f"hydra.run.dir={two}"])
    whole = torch.load(one / "grads_rank0.pt")
    ranks = [torch.load(two / f"grads_rank{r}.pt") for r in (0, 1)]
    assert whole.keys() == ranks[0].keys() == ranks[1].keys() and whole
    assert any(g.abs().max() > 0 for g in whole.values())
    for name, grad in whole.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # DDP synchronised them
        torch.testing.assert_close(ranks[0][name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_multirun_sweeps_samplers(tmp_path):
    run(["-m", *TINY, "sampler=hf_generate,full", "trainer.max_steps=1", "callbacks=none",
         f"hydra.sweep.dir={tmp_path}"])
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / job / "csv" / "metrics.csv").exists()
        assert (tmp_path / job / ".hydra" / "config.yaml").exists()
