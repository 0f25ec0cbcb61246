"""locate_values.py end to end on the tiny policy, its clear errors, the training callback
and steered GRPO (sampling and scoring under the same steering)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from locate_values import locate_values
from values.neurons import DIMENSIONS, ValueNeurons, model_signature, steer
from tests.conftest import CONFIGS, ROOT
from train import train

QUICK = ["policy=tiny", "locate.pairs=6", "locate.max_new_tokens=6", "validate.open_ended=2",
         "validate.max_new_tokens=6", "steer.gamma=[0,1]", "validate.open_gamma=[1]",
         "validate.bootstrap=50", "locate.top_k=20"]


def locate_cfg(overrides, output_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("locate_values.yaml", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("locate")
    metrics, objects = locate_values(locate_cfg(QUICK, out))
    return out, metrics, objects


def test_entry_point_writes_sets_tables_and_plots(tiny_run):
    out, metrics, objects = tiny_run
    model = objects["policy"].model
    for d in DIMENSIONS:
        located = ValueNeurons.load(out / f"neurons_{d}.json", model)
        control = ValueNeurons.load(out / f"random_{d}.json", model)
        assert len(located) >= 1 and located.meta["dimension"] == d
        assert bool((located.delta > 0).all())
        assert len(located) <= 20 or bool((located.delta[20:] >= 0.25).all())
        assert bool((located.delta[:-1] >= located.delta[1:]).all())
        assert control.layer_histogram(2) == located.layer_histogram(2)
    persona = objects["tables"]["persona"]
    assert [(r["dimension"], r["persona"]) for r in persona[:2]] == [
        ("openness_to_change", "openness_to_change"), ("openness_to_change", "conservation")]
    assert len(persona) == 8 and any(r["shift"] != 0 for r in persona)
    for name in ("neurons", "questionnaire", "open_ended", "perplexity", "persona_control"):
        assert (out / f"{name}.md").exists() and (out / f"{name}.csv").exists()
    for name in ("score_vs_gamma", "layers", "radar_conservation"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    rows = objects["tables"]["questionnaire"]
    assert len(rows) == 4 * 2 * 2 * 2  # dimensions x kinds x directions x gammas
    # forward for a dimension and reverse for its opposite steer the very same neurons
    scores = objects["scores"]
    assert set(scores) == {"base", *(f"{k}:{d}@{g}" for d in DIMENSIONS
                                     for k in ("located", "random") for g in ("0", "1"))}
    assert "perplexity/base" in metrics


def test_gamma_zero_without_clamp_changes_nothing(tmp_path):
    metrics, objects = locate_values(locate_cfg(
        [*QUICK, "steer.gamma=0", "steer.clamp_opposite=false", "validate.open_ended=0",
         "dimensions=[conservation]", "validate.personas=0"], tmp_path))
    scores = objects["scores"]
    for name, s in scores.items():
        assert torch.equal(s, scores["base"]), name
    assert all(v == 0 for k, v in metrics.items() if k.startswith("questionnaire/"))


def test_saved_neurons_are_reused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    _, objects = locate_values(locate_cfg([*QUICK, f"neurons={out}", "validate.open_ended=0",
                                           "validate.perplexity=false"], tmp_path))
    first = ValueNeurons.load(out / "neurons_conservation.json")
    assert torch.equal(objects["neurons"]["located"]["conservation"].index, first.index)


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "locate_values.py"), *args,
                           f"hydra.run.dir={cwd}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["dimensions=[kindness]"], "dimensions='kindness' is not a value dimension"),
    (["steer.gamma=-1"], "steer.gamma must be numbers >= 0"),
    (["steer.fraction=0"], "steer.fraction must be in (0, 1]"),
    (["locate.method=pca"], "locate.method must be contrast or lape"),
    (["neurons=/nonexistent"], "does not exist"),
    (["data.path=/nonexistent"], "is not a folder"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    proc = run_cli("policy=tiny", "locate.pairs=2", "locate.max_new_tokens=2", *args,
                   cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_neurons_from_another_model_are_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    proc = run_cli("policy=tiny", "policy.intermediate_size=96", f"neurons={out}",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "was located on" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_value_monitor_logs_during_training(tiny_cfg, tiny_run, tmp_path):
    out, _, _ = tiny_run
    metrics, objects = train(tiny_cfg("callbacks.value_monitor.every_n_steps=1",
                                      f"callbacks.value_monitor.neurons={out}",
                                      "trainer.max_steps=2"))
    for d in DIMENSIONS:
        assert f"values/{d}" in metrics and f"values/neuron_activation/{d}" in metrics
    monitor = next(c for c in objects["callbacks"] if type(c).__name__ == "ValueMonitor")
    # the centred dimension scores are a centring of the same items: they cannot all be > 0
    assert min(monitor.last[f"values/{d}"] for d in DIMENSIONS) < 0
    rows = open(tmp_path / "csv" / "metrics.csv").read()
    assert "values/conservation" in rows and "values/neuron_activation/conservation" in rows


def test_steered_policy_samples_and_scores_under_the_same_steering(tiny_cfg, tiny_run):
    """With policy.steer, a rollout's log-probs in the loss equal those of step-by-step
    decoding under the same steering (independently: prefill + one-token forwards)."""
    out, _, _ = tiny_run
    path = out / "neurons_conservation.json"
    _, objects = train(tiny_cfg(f"+policy.steer.neurons={path}", "+policy.steer.gamma=2.0",
                                "trainer.max_steps=1", "model.temperature=1.0"))
    module = objects["model"]
    rollouts, prompts = module.last_rollouts, None
    batch = next(iter(objects["datamodule"].train_dataloader()))
    prompts = batch["prompt_ids"]
    rollouts = module.generate(prompts, 2, module.spec())
    rows = torch.arange(len(rollouts))
    with torch.no_grad():
        logp, _ = module.log_probs(module.policy, prompts, rollouts, rows)
    policy = objects["policy"]
    model = module.policy.eval()
    with steer(model, policy.steering.target, 2.0, fraction=0.9) as _, torch.no_grad():
        for r in range(len(rollouts)):
            prompt = prompts[int(rollouts.prompt_index[r])]
            tokens = rollouts.completion_ids[r, : int(rollouts.lengths[r])].tolist()
            res = model(input_ids=torch.tensor([prompt]), use_cache=True)
            expected = []
            for k, token in enumerate(tokens):
                expected.append(float(torch.log_softmax(res.logits[0, -1].double(), -1)[token]))
                res = model(input_ids=torch.tensor([[token]]), past_key_values=res.past_key_values,
                            position_ids=torch.tensor([[len(prompt) + k]]), use_cache=True)
            torch.testing.assert_close(logp[r, : len(tokens)].double(),
                                       torch.tensor(expected, dtype=torch.float64),
                                       atol=1e-4, rtol=1e-4)
    plain = module.steering
    module.steering = None
    with torch.no_grad():
        unsteered, _ = module.log_probs(module.policy, prompts, rollouts, rows)
    module.steering = plain
    assert not torch.allclose(unsteered, logp)
    json.loads(path.read_text())  # the file the policy used is a real neuron set
    assert policy.steering.target.meta["model"] == model_signature(model)


@pytest.mark.slow
def test_gamma_multirun_sweep(tmp_path):
    """`locate_values.py -m steer.gamma=0,1`: one job per gamma, each with its own tables."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "locate_values.py"), "-m", "steer.gamma=0,1", *QUICK[:3],
         "validate.open_ended=0", "validate.perplexity=false", "validate.personas=0",
         "dimensions=[conservation]", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, gamma in (("0", 0.0), ("1", 1.0)):
        rows = (tmp_path / job / "questionnaire.csv").read_text().splitlines()[1:]
        assert rows and {float(r.split(",")[3]) for r in rows} == {gamma}


def test_bad_policy_steer_settings(tiny_cfg, tiny_run):
    """Each bad `policy.steer` value ends in the user error that train.py prints as one line."""
    from train import user_error

    out, _, _ = tiny_run
    cases = [(["+policy.steer.neurons=/nonexistent.json"], FileNotFoundError, "does not exist"),
             ([f"+policy.steer.neurons={out}/neurons_conservation.json", "+policy.steer.gamma=-2"],
              ValueError, "policy.steer.gamma must be a number >= 0"),
             (["+policy.steer.gamma=1.0"], ValueError, "policy.steer.neurons is empty")]
    for overrides, kind, message in cases:
        with pytest.raises(Exception) as info:
            train(tiny_cfg(*overrides))
        cause = user_error(info.value)
        assert isinstance(cause, kind) and message in str(cause)
