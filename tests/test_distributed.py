"""Multi-process and multi-run tests: DDP and FSDP2 on two CPU processes (gloo), Hydra multirun.

Each two-rank run is compared with one process on the whole batch (gradients, rollouts,
resumed weights), and collectives are counted from outside the code under test
(`bench.scale_out.CollectiveCounter`: a DDP communication hook and wrapped torch.distributed
functions)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from tests.helpers import DENSE, TINY, compose_entry, run_entry



def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_entry("train.py", *args, timeout=timeout, check=True)


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    run([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.max_steps=3",
         "model.lr=1e-3", "callbacks.model_checkpoint.every_n_train_steps=1000",
         f"hydra.run.dir={tmp_path}"])
    digests = [(tmp_path / f"weights_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,loss_type,scale,beta", [
    ("ddp", "token_mean", "batch", 0.0), ("ddp", "sequence_mean", "group", 0.0),
    ("ddp", "dr_grpo", "none", 0.0), ("fsdp", "token_mean", "batch", 0.0),
    ("fsdp", "sequence_mean", "group", 0.0), ("fsdp", "token_mean", "group", 0.5)])
def test_data_parallel_gradient_equals_one_process_on_the_whole_batch(tmp_path, strategy,
                                                                       loss_type, scale, beta):
    """Two gloo ranks on halves of a batch (2 prompts each) give the gradient of one process
    on the whole batch (4 prompts): the token and sequence normalisers and the batch reward
    std are all-reduced, and each rank's loss is scaled for the gradient averaging of DDP's
    all-reduce and FSDP's reduce-scatter. 3 update micro-batches per rank accumulate without
    communication but the last. The rollouts of a prompt are made rank-independent by seeding
    them from its tokens. Under FSDP the sharded gradients are gathered to compare; with
    beta > 0 the frozen reference is sharded too (its k3 KL is 0 at the first step, where the
    policy equals it, but its forward and gradient path run)."""
    common = [*TINY, *DENSE, f"model.loss_type={loss_type}", f"model.advantage_scale={scale}",
              f"model.beta={beta}",
              "model.max_grad_norm=1e9", "model.update_micro_batch=3", "trainer.max_steps=1",
              "sampler=full", "sampler._target_=tests.helpers.PromptSeededSampler",
              "callbacks=none", "+callbacks.grads._target_=tests.helpers.GradDump"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, "data.batch_size=4", f"+callbacks.grads.dirpath={one}",
         f"hydra.run.dir={one}"])
    run([*common, f"trainer={strategy}", "trainer.accelerator=cpu", "data.batch_size=2",
         f"+callbacks.grads.dirpath={two}", f"hydra.run.dir={two}"])
    whole = torch.load(one / "grads_rank0.pt")
    ranks = [torch.load(two / f"grads_rank{r}.pt") for r in (0, 1)]
    assert whole.keys() == ranks[0].keys() == ranks[1].keys() and whole
    assert any(g.abs().max() > 0 for g in whole.values())
    for name, grad in whole.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # synchronised
        torch.testing.assert_close(ranks[0][name], grad, atol=1e-6, rtol=1e-4)


def counts(path, phase: str, name: str) -> list[int]:
    """Per phase run: how many `name` collectives rank 0 issued."""
    records = json.loads((path / "collectives_rank0.json").read_text())
    return [run.get(name, 0) for run in records[phase]]


@pytest.mark.slow
def test_ddp_one_gradient_all_reduce_per_optimizer_step(tmp_path):
    """With 4 update micro-batches, DDP reduces the gradient buckets once per optimizer step,
    as many as one backward over the whole update does; `model.grad_sync=micro_batch` (the
    behaviour before `no_sync`) is the positive control: 4 times as many."""
    common = [*TINY, "trainer=ddp", "callbacks=none", "model.group_size=4",
              "+callbacks.count._target_=bench.scale_out.CollectiveCounter"]
    seen = {}
    for name, extra in [("one_backward", ["model.update_micro_batch=8"]),
                        ("four", ["model.update_micro_batch=2"]),
                        ("four_each", ["model.update_micro_batch=2",
                                       "model.grad_sync=micro_batch"])]:
        out = tmp_path / name
        run([*common, *extra, f"+callbacks.count.dirpath={out}", f"hydra.run.dir={out}"])
        seen[name] = counts(out, "update", "ddp_buckets")
    assert len(seen["one_backward"]) == 2 and min(seen["one_backward"]) >= 1
    assert seen["four"] == seen["one_backward"]
    assert seen["four_each"] == [4 * n for n in seen["one_backward"]]


FSDP_ROLLOUTS = [*TINY, *DENSE, "model.lr=1e-3", "trainer.max_steps=2",
                 "trainer.val_check_interval=1", "data.val_size=4", "model.max_new_tokens=12",
                 "sampler=full", "sampler._target_=tests.helpers.PromptSeededSampler",
                 "callbacks=none", "+callbacks.dump._target_=tests.helpers.RolloutDump"]


@pytest.mark.slow
@pytest.mark.parametrize("gather", [True, False])
def test_fsdp_rollouts_equal_one_process(tmp_path, gather):
    """Under FSDP each rank samples its prompts (seeded from their tokens) exactly as one
    process does, sampled in training and greedy in validation, after an update too. With
    gathered weights a sampling phase all-gathers each FSDP unit at most once (the tiny
    policy: 2 layers + root), whatever the number of tokens; layer by layer it gathers at every
    forward, and the ranks' forwards stay in step until both have finished."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([*FSDP_ROLLOUTS, "data.batch_size=4", "data.val_batch_size=4",
         f"+callbacks.dump.dirpath={one}", f"hydra.run.dir={one}"])
    run([*FSDP_ROLLOUTS, "trainer=fsdp", "trainer.accelerator=cpu", "data.batch_size=2",
         "data.val_batch_size=2", f"sampler.gather_weights={str(gather).lower()}",
         f"+callbacks.dump.dirpath={two}", "+callbacks.count._target_=bench.scale_out."
         "CollectiveCounter", f"+callbacks.count.dirpath={two}", f"hydra.run.dir={two}"])
    whole = torch.load(one / "rollouts_rank0.pt")
    ranks = [torch.load(two / f"rollouts_rank{r}.pt") for r in (0, 1)]
    for split in ("train", "val"):
        merged = {**ranks[0][split], **ranks[1][split]}
        assert len(ranks[0][split]) and len(ranks[1][split])
        assert merged == whole[split], split
    steps = {step for step, _ in whole["train"]}
    assert steps == {1, 2}  # (the step count after it) the second samples updated weights
    gathers = counts(two, "sampling", "all_gather_single") or \
        counts(two, "sampling", "all_gather_into_tensor")
    assert len(gathers) == 2
    if gather:
        assert all(1 <= n <= 3 for n in gathers), gathers
    else:  # every decoding step is a forward over both layers at least
        assert all(n >= 2 * 12 for n in gathers), gathers


@pytest.mark.slow
def test_fsdp_resume_matches_uninterrupted_run(tmp_path):
    """An FSDP run resumed from its step-2 checkpoint (a full state dict, one file) ends with
    the weights of the run that was never interrupted."""
    common = [*TINY, *DENSE, "trainer=fsdp", "trainer.accelerator=cpu", "model.lr=1e-3",
              "trainer.max_steps=4", "trainer.val_check_interval=1000",
              "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.model_checkpoint.save_top_k=-1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run([*common, f"hydra.run.dir={full}"])
    run([*common, f"ckpt_path={full / 'checkpoints' / 'step_000002.ckpt'}",
         f"hydra.run.dir={resumed}"])
    digests = [(d / f"weights_rank{r}.txt").read_text() for d in (full, resumed) for r in (0, 1)]
    assert len(set(digests)) == 1
    start = run([*common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'two_steps'}"])
    assert start.returncode == 0
    assert (tmp_path / "two_steps" / "weights_rank0.txt").read_text() != digests[0]


@pytest.mark.slow
def test_multirun_sweeps_samplers(tmp_path):
    run(["-m", *TINY, "sampler=hf_generate,full", "trainer.max_steps=1", "callbacks=none",
         f"hydra.sweep.dir={tmp_path}"])
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / job / "csv" / "metrics.csv").exists()
        assert (tmp_path / job / ".hydra" / "config.yaml").exists()


def _measure_sharded_weights(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from modules.parallel import sampling_weights, shard_model
    from modules.policy import tiny
    from samplers.memory import weight_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny().model
        shard_model(model, init_device_mesh("cpu", (world,)))
        seen = {"layered": weight_bytes(model)}
        with sampling_weights(model, gather=True):
            seen["gathered"] = weight_bytes(model)
        seen["after"] = weight_bytes(model)
        if rank == 0:
            torch.save(seen, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_memory_planner_counts_sharded_and_gathered_weights(tmp_path):
    """The planner's weights on rank 0 of 2, by hand from the unsharded model's shapes
    (FSDP2 shards dim 0, rank 0 holding the ceiling half): gathered for sampling, every
    parameter in full; layer by layer, the shards plus the rest of the root unit and of one
    decoder layer."""
    import random

    from modules.policy import tiny

    full = dict(tiny().model.named_parameters())
    size = {n: p.numel() * p.element_size() for n, p in full.items()}
    half = {n: -(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * p.element_size()
            for n, p in full.items()}
    layer = [n for n in full if n.startswith("model.layers.0.")]
    root = [n for n in full if not n.startswith("model.layers.")]
    out = tmp_path / "seen.pt"
    torch.multiprocessing.spawn(_measure_sharded_weights,
                                args=(2, random.randint(20000, 40000), str(out)), nprocs=2)
    seen = torch.load(out)
    assert seen["gathered"] == sum(size.values())
    expected = sum(half.values()) + sum(size[n] - half[n] for n in root + layer)
    assert seen["layered"] == seen["after"] == expected


def test_fsdp_checkpoints_are_one_atomic_file(tmp_path):
    """trainer=fsdp saves full state dicts, written by rank 0 through the trainer's
    AtomicCheckpointIO (temporary file + rename: a kill mid-save keeps the previous file,
    tested for that plugin in test_train.py), not a sharded folder written in place."""
    import hydra

    from modules.checkpoints import AtomicCheckpointIO
    from modules.parallel import FSDP2Strategy

    cfg = compose_entry("train", [*TINY, "trainer=fsdp"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert trainer.strategy._save_distributed_checkpoint is False
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.strategy.root_device.type == "cpu" and trainer.num_devices == 2
