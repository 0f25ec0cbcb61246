"""train(cfg) end to end on a tiny random-init policy: every sampler, learning, memory-flat
update, checkpoint resume, and the clear errors for bad config or input."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from callbacks.digest import weight_digest
from modules.rewards import RewardError
from train import train
from tests.helpers import ROOT, run_entry

SAMPLERS = sorted(p.stem for p in (ROOT / "configs" / "sampler").glob("*.yaml"))
# Reward = fraction of digit characters: a tiny random policy can learn it in a few dozen steps.
DIGITS = ["+model.rewards.digits.fn._target_=tests.helpers.char_fraction_reward",
          "+model.rewards.digits.fn._partial_=true", "+model.rewards.digits.weight=1.0"]


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fast_dev_run_every_sampler(tiny_cfg, sampler):
    metrics, objects = train(tiny_cfg(f"sampler={sampler}", "debug=default"))
    assert objects["trainer"].global_step == 1
    assert {"train/reward", "train/entropy", "sampling/decoding_steps",
            "memory/peak_sampling_gb", "memory/peak_update_gb",
            "memory/kv_peak_gb"} <= set(metrics)
    rollouts = objects["model"].last_rollouts
    assert len(rollouts) == 2 * 4 and rollouts.completion_ids.shape[1] <= 8


PREDICTORS = sorted(p.stem for p in (ROOT / "configs" / "predictor").glob("*.yaml"))


@pytest.mark.parametrize("predictor, refill", zip(PREDICTORS, ["sjf", "lpt", "fifo", "sjf"]))
def test_infinite_with_each_predictor_and_refill(tiny_cfg, predictor, refill):
    """`sampler=infinite predictor=... sampler.refill=...` composes and trains; the predictor's
    error is logged; a second step refits it online from the first step's rollouts."""
    metrics, objects = train(tiny_cfg("sampler=infinite", f"predictor={predictor}",
                                      f"sampler.refill={refill}", "sampler.probe_tokens=2",
                                      "sampler.micro_group_size=3", "trainer.max_steps=2",
                                      "model.max_new_tokens=8"))
    assert objects["trainer"].global_step == 2
    assert {"sampling/parks", "sampling/steps_over_lb", "sampling/total_over_continuous",
            "sampling/schedule_predicted"} <= set(metrics)
    record = objects["model"].last_rollouts.stats.predictor
    assert record.name == predictor and objects["sampler"].refill == refill
    if len(record.true):
        assert "predictor/mae" in metrics


def test_training_changes_parameters_and_logs(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*DIGITS, "model.beta=0.1", "model.num_iterations=2", "model.lr=1e-3",
                   "trainer.max_steps=4")
    from modules.policy import tiny
    before = {k: v.clone() for k, v in tiny(seed=cfg.seed).model.state_dict().items()}
    metrics, objects = train(cfg)
    after = objects["model"].policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "train/kl" in metrics and "train/clip_frac" in metrics
    assert "val/reward" in metrics and "val/accuracy" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "weights_rank0.txt").read_text().strip() == weight_digest(objects["model"])


def test_learning_on_a_trivially_learnable_reward(tiny_cfg):
    cfg = tiny_cfg(
        *DIGITS, "~model.rewards.gsm8k", "~model.rewards.format", "model.accuracy_reward=null",
        "model.group_size=8", "model.max_new_tokens=12", "model.lr=3e-3",
        "model.loss_type=token_mean", "trainer.max_steps=40", "trainer.val_check_interval=1000",
        "callbacks=none")
    train(cfg)
    rewards = series(read_metrics(Path(cfg.paths.output_dir)), "train/reward")
    assert len(rewards) == 40
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.2, (start, end)


def test_update_micro_batches_do_not_grow_with_group_size(tiny_cfg):
    """G=64 runs the update in the same [update_micro_batch, ...] shapes as G=8."""
    seen: dict[int, list[int]] = {}
    for group_size in (8, 64):
        cfg = tiny_cfg(f"model.group_size={group_size}", "model.update_micro_batch=4",
                       "trainer.max_steps=1", "callbacks=none")
        _, objects = train_with_hook(cfg, seen.setdefault(group_size, []))
        assert len(objects["model"].last_rollouts) == 2 * group_size
    assert max(seen[8]) == max(seen[64]) == 4
    assert len(seen[64]) == 8 * len(seen[8])


def train_with_hook(cfg, rows: list[int]):
    """Record the batch size of every forward that builds a graph (the update's forwards)."""
    import modules.grpo as grpo
    original = grpo.GRPOModule.log_probs

    def spy(self, model, prompts, rollouts, chunk, **kwargs):
        if torch.is_grad_enabled():
            rows.append(len(chunk))
        return original(self, model, prompts, rollouts, chunk, **kwargs)

    grpo.GRPOModule.log_probs = spy
    try:
        return train(cfg)
    finally:
        grpo.GRPOModule.log_probs = original


def test_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    common = ["trainer.max_steps=6", "trainer.val_check_interval=1000",
              "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    _, full = train(tiny_cfg(*common, output_dir=full_dir))
    ckpt = next((full_dir / "checkpoints").glob("step_000003.ckpt"))
    _, resumed = train(tiny_cfg(*common, f"ckpt_path={ckpt}", output_dir=resumed_dir))
    assert resumed["trainer"].global_step == 6
    a, b = read_metrics(full_dir), read_metrics(resumed_dir)
    for key in ("train/reward", "train/loss", "train/completion_len_mean"):
        assert series(a, key)[3:] == pytest.approx(series(b, key), rel=1e-5, abs=1e-7), key
    assert weight_digest(full["model"]) == weight_digest(resumed["model"])


@pytest.mark.parametrize("override, error, message", [
    ("model.group_size=0", ValueError, "group_size"),
    ("model.loss_type=mean", ValueError, "loss_type"),
    ("data.source.size=0", ValueError, "size"),
    ("policy.max_position_embeddings=64", ValueError, "context|max_prompt_tokens|longer"),
    ("model.max_new_tokens=5000", ValueError, "model.max_new_tokens=5000 leaves no room"),
])
def test_bad_config_gives_a_clear_error(tiny_cfg, override, error, message):
    with pytest.raises(Exception) as info:
        train(tiny_cfg(override, "callbacks=none"))
    root = info.value
    while not isinstance(root, error) and root.__cause__ is not None:
        root = root.__cause__
    assert isinstance(root, error)
    assert pytest.importorskip("re").search(message, str(root)), str(root)


def test_empty_dataset_is_named(tiny_cfg, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = tiny_cfg("data=gsm8k", "data.source.source=jsonl", f"data.source.path={empty}",
                   "callbacks=none")
    with pytest.raises(ValueError, match="empty|no records"):
        train(cfg)


@pytest.mark.parametrize("reward", ["raising_reward", "nan_reward"])
def test_broken_reward_is_named_and_checkpoint_kept(tiny_cfg, tmp_path, reward):
    cfg = tiny_cfg(f"+model.rewards.bad.fn._target_=tests.helpers.{reward}",
                   "+model.rewards.bad.fn._partial_=true", "+model.rewards.bad.weight=1.0")
    with pytest.raises(RewardError, match="bad"):
        train(cfg)


def test_unknown_sampler_is_a_clear_cli_error(tmp_path):
    out = run_entry("train.py", "sampler=nope", f"hydra.run.dir={tmp_path}", timeout=120)
    assert out.returncode != 0
    assert "sampler" in out.stdout and "nope" in out.stdout
    assert "Available options" in out.stdout and "Traceback" not in out.stdout


def test_checkpoint_killed_mid_save_keeps_the_previous_one(tmp_path):
    """A process killed while writing a checkpoint (half its bytes out) leaves the previous
    file intact and loadable, and no stray temporary file."""
    import textwrap

    target = tmp_path / "last.ckpt"
    from modules.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"step": 1, "state_dict": {"w": torch.ones(1000)}},
                                         target)
    script = textwrap.dedent(f"""
        import os, torch
        from modules.checkpoints import AtomicCheckpointIO
        real_save = torch.save
        def dying_save(obj, handle, *args, **kwargs):
            import io
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2]); handle.flush()
            os._exit(9)  # killed mid-write
        torch.save = dying_save
        AtomicCheckpointIO().save_checkpoint({{"step": 2,
                                              "state_dict": {{"w": torch.zeros(1000)}}}},
                                             {str(target)!r})
    """)
    proc = run_entry("-c", script, timeout=120)
    assert proc.returncode == 9, proc.stdout
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert loaded["step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(1000))
    # what the killed process left is only its own temporary file, never the target
    others = {p.name for p in tmp_path.iterdir()} - {"last.ckpt"}
    assert all(name.startswith(".last.ckpt.tmp") for name in others)


def test_step_checkpoints_without_lightning_warnings(tiny_cfg, tmp_path):
    """StepCheckpoint saves every N steps and at the end, and nothing warns about manual
    optimization (Lightning's ModelCheckpoint does at every step-based save)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_cfg("trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2",
                       "callbacks.model_checkpoint.save_top_k=-1"))
    assert not [w for w in caught if "manual optimization" in str(w.message)]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_000002.ckpt", "step_000003.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # saved again at the end of training
