"""What a terminal shows (stdout and stderr merged) when an entry point gets bad input: one
`error:` line naming the setting or the file, no traceback (the run's log file keeps it), for
train.py, locate_values.py, train_predictor.py and `python -m bench`; any bytes given as a
checkpoint; a quiet normal run; a sweep that goes on past a failed job."""
from __future__ import annotations

import io
import random
import subprocess
from pathlib import Path

import pytest
import torch

from modules.checkpoints import AtomicCheckpointIO, CheckpointError
from train import train
from tests.helpers import TINY, compose_entry, run_entry

NO_POLICY = ["policy=tiny"]


def run(*args: str, cwd: Path, multirun: bool = False) -> subprocess.CompletedProcess:
    """An entry point as a user runs it: both streams into one, as a terminal shows them."""
    where = f"hydra.sweep.dir={cwd}" if multirun else f"hydra.run.dir={cwd}"
    return run_entry(*args, where)


def assert_one_error_line(proc: subprocess.CompletedProcess, run_dir: Path, names: str) -> str:
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and names in last, last
    assert sum(line.startswith("error: ") for line in out.splitlines()) == 1
    logs = list(run_dir.glob("*.log"))
    assert logs and any("Traceback" in log.read_text() for log in logs)
    return last


TRAIN_CASES = [
    (["data.batch_size=0"], "data.batch_size"),
    (["model.group_size=0"], "model.group_size"),
    (["model.lr=-1"], "model.lr"),
    (["model.top_p=2"], "model.top_p"),
    (["model.epsilon_low=-1"], "model.epsilon_low"),
    (["model.temperature=-0.5"], "model.temperature"),
    (["model.max_new_tokens=5000"], "model.max_new_tokens"),
    (["sampler.prompt_kv=paged"], "sampler.prompt_kv"),
    (["sampler.refill=xyz"], "sampler.refill"),
    (["sampler=micro", "sampler.micro_group_size=0"], "sampler.micro_group_size"),
    (["sampler.probe_tokens=-3"], "sampler.probe_tokens"),
    (["sampler.micro_group_size=auto", "sampler.memory_budget_gb=0.00001"],
     "sampler.memory_budget_gb"),
    (["ckpt_path=/no/such.ckpt"], "/no/such.ckpt"),
    (["policy=hub", "policy.name_or_path=/no/such/model"], "/no/such/model"),
]


@pytest.mark.parametrize("overrides, names", TRAIN_CASES)
def test_train_bad_setting_is_one_line(tmp_path, overrides, names):
    last = assert_one_error_line(run("train.py", *TINY, *overrides, cwd=tmp_path), tmp_path,
                                 names)
    assert "0.000 GiB" not in last


@pytest.mark.parametrize("script, overrides, names", [
    ("locate_values.py", ["dimensions=[kindness]"], "dimensions"),
    ("locate_values.py", ["neurons=/nonexistent"], "/nonexistent"),
    ("locate_values.py", ["steer.gamma=-1"], "steer.gamma"),
    ("locate_values.py", ["validate.max_perplexity=abc"], "validate.max_perplexity"),
    ("locate_values.py", ["locate.source=sampled"], "locate.source"),
    ("locate_values.py", ["validate.random_sets=0"], "validate.random_sets"),
    ("locate_values.py", ["validate.personas=0"], "validate.personas"),
    ("train_predictor.py", ["rollouts=/no/such.pt"], "rollouts"),
    ("train_predictor.py", ["probe_tokens=-1"], "probe_tokens"),
    ("-m bench", ["table=nope"], "table"),
    ("-m bench", ["samplers=[nope]"], "samplers"),
])
def test_other_entry_points_bad_setting_is_one_line(tmp_path, script, overrides, names):
    assert_one_error_line(run(*script.split(), *NO_POLICY, *overrides, cwd=tmp_path),
                          tmp_path, names)


def test_output_dir_is_made_or_named(tmp_path):
    """`paths.output_dir` set to a folder Hydra did not make: made; set below a file: one
    error line naming the setting, no traceback."""
    made = tmp_path / "new" / "dir"
    proc = run("train.py", *TINY, "trainer.max_steps=1", "callbacks=none",
               f"paths.output_dir={made}", cwd=tmp_path / "hydra")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (made / "config_tree.yaml").is_file()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run("train.py", *TINY, f"paths.output_dir={blocker}/run", cwd=tmp_path / "hydra2")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
    assert last.startswith("error: paths.output_dir=") and "a_file" in last, last


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real checkpoint of a 1-step tiny run, one of another (wider) tiny model, and one
    saved with weights only."""
    root = tmp_path_factory.mktemp("ckpts")
    _, objects = train(compose_entry("train", [*TINY, "trainer.max_steps=1", "callbacks=none"],
                                      root / "run"))
    objects["trainer"].save_checkpoint(root / "good.ckpt", weights_only=False)
    objects["trainer"].save_checkpoint(root / "weights.ckpt", weights_only=True)
    _, other = train(compose_entry("train", [*TINY, "trainer.max_steps=1", "callbacks=none",
                                     "policy.hidden_size=32", "policy.intermediate_size=64"],
                                    root / "other"))
    other["trainer"].save_checkpoint(root / "other_model.ckpt", weights_only=False)
    return root


def bad_contents(root: Path) -> dict[str, bytes | None]:
    good = (root / "good.ckpt").read_bytes()
    rng = random.Random(0)
    corrupted = bytearray(good)
    corrupted[-300:] = bytes(rng.randrange(256) for _ in range(300))  # the zip's directory
    tensor, plain = io.BytesIO(), io.BytesIO()
    torch.save(torch.ones(3), tensor)
    torch.save({"step": 3, "weights": torch.zeros(2)}, plain)
    return {"empty": b"", "text": b"this is not a checkpoint\n",
            "random": bytes(rng.randrange(256) for _ in range(4096)), "zeros": bytes(4096),
            "truncated": good[: len(good) // 3], "corrupted": bytes(corrupted),
            "tensor": tensor.getvalue(), "plain_dict": plain.getvalue(),
            "other_model": None, "weights_only": None, "directory": None}


@pytest.mark.parametrize("kind", ["empty", "text", "random", "zeros", "truncated", "corrupted",
                                  "tensor", "plain_dict", "other_model", "weights_only",
                                  "directory"])
def test_unusable_checkpoint_is_one_line_naming_the_file(checkpoints, tmp_path, kind):
    content = bad_contents(checkpoints)[kind]
    if kind == "directory":
        path = tmp_path / "checkpoints"
        path.mkdir()
    elif content is None:
        path = checkpoints / {"other_model": "other_model.ckpt",
                              "weights_only": "weights.ckpt"}[kind]
    else:
        path = tmp_path / f"{kind}.ckpt"
        path.write_bytes(content)
    run_dir = tmp_path / "run"
    last = assert_one_error_line(run("train.py", *TINY, f"ckpt_path={path}", cwd=run_dir),
                                 run_dir, str(path))
    expected = {"directory": "is a directory", "empty": "empty file",
                "other_model": "another model", "weights_only": "weights only",
                "tensor": "not a Lightning checkpoint",
                "plain_dict": "not a Lightning checkpoint"}.get(kind, "not a readable")
    assert expected in last, last


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "other_model", "weights_only"])
def test_unusable_checkpoint_under_fsdp_is_one_line(checkpoints, tmp_path, kind):
    """Under trainer=fsdp (two gloo ranks) the strategy reads the file itself: the same one
    line naming it, printed once, not once per rank."""
    content = bad_contents(checkpoints)[kind]
    path = checkpoints / {"other_model": "other_model.ckpt",
                          "weights_only": "weights.ckpt"}.get(kind, "")
    if content is not None:
        path = tmp_path / f"{kind}.ckpt"
        path.write_bytes(content)
    run_dir = tmp_path / "run"
    last = assert_one_error_line(run("train.py", *TINY, "trainer=fsdp", f"ckpt_path={path}",
                                     cwd=run_dir), run_dir, str(path))
    assert {"other_model": "another model", "weights_only": "weights only"}.get(
        kind, "not a readable") in last, last


def test_fuzzed_checkpoint_bytes_are_one_error(checkpoints, tmp_path):
    """20 random byte strings and 20 truncations of a real checkpoint at random lengths: each
    is one CheckpointError naming the file, whatever torch.load raised underneath."""
    good = (checkpoints / "good.ckpt").read_bytes()
    rng = random.Random(1234)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
               for _ in range(20)]
    samples += [good[: rng.randrange(1, len(good) - 1)] for _ in range(20)]
    io_plugin = AtomicCheckpointIO()
    for k, data in enumerate(samples):
        path = tmp_path / f"fuzz{k}.ckpt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            io_plugin.load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
    assert io_plugin.load_checkpoint(checkpoints / "good.ckpt")["global_step"] == 1


# ----------------------------------------------------------------------------- a normal run


def test_normal_run_is_quiet(tmp_path):
    """The terminal of a tiny run: what runs, the progress bar, the summary; no Lightning
    advertisement, no third-party deprecation warning, no checkpoint chatter."""
    proc = run("train.py", *TINY, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    for noise in ("Tip:", "DeprecationWarning", "weights_only", "Traceback", "litlogger",
                  "litmodels", "_pytree", "UserWarning"):
        assert noise not in out, (noise, out[-3000:])
    assert "arithmetic policy=tiny sampler=infinite data=arithmetic" in out
    assert "finished 2 steps" in out and "train/reward" in out
    assert "config:" not in out  # the whole config goes to the log file
    assert "config:" in (tmp_path / "arithmetic.log").read_text()


def test_sweep_goes_on_after_a_failed_job(tmp_path):
    proc = run("train.py", "-m", *TINY, "model.group_size=0,4", cwd=tmp_path, multirun=True)
    out = proc.stdout
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.group_size" in errors[0]
    assert (tmp_path / "0" / "error.txt").read_text().startswith("error: model.group_size")
    assert (tmp_path / "1" / "checkpoints" / "last.ckpt").is_file()
    assert "finished 2 steps" in out
