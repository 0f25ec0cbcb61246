"""locate_values.py end to end on the tiny policy, its clear errors, the training callback
and steered GRPO (sampling and scoring under the same steering)."""
from __future__ import annotations

import csv
import json
import re
import subprocess

import hydra

import pytest
import torch

from locate_values import locate_values
from tests.helpers import compose_entry, past, run_entry
from train import train
from values.data import AXES, AXIS_OF, NEUTRAL, load_value_data
from values.experiment import arms, measure
from values.instruments import DilemmaMargin, Subject
from values.neurons import DIMENSIONS, OPPOSITE, ValueNeurons, model_signature, steer

AXIS = "openness_vs_conservation"
DENSE = ["+model.rewards.digits.fn._target_=tests.helpers.char_fraction_reward",
         "+model.rewards.digits.fn._partial_=true", "+model.rewards.digits.weight=1.0",
         "~model.rewards.gsm8k", "~model.rewards.format", "model.accuracy_reward=null"]

QUICK = ["policy=tiny", "locate.pairs=8", "locate.max_new_tokens=6", "validate.max_new_tokens=6",
         "steer.gamma=[0,1]", "validate.verdict_gamma=1", "validate.bootstrap=50",
         "locate.top_k=20", "locate.null_shuffles=10", "locate.split_half_repeats=1",
         "validate.personas=1", "validate.passages=2", "locate.cache=false",
         "validate.random_sets=3", "instruments=all",
         # every instrument steered at every gamma (the gates have their own test)
         "validate.controls_first=false", "validate.max_perplexity=null"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("locate")
    metrics, objects = locate_values(compose_entry("locate_values", QUICK, out))
    return out, metrics, objects


def test_entry_point_writes_sets_tables_and_plots(tiny_run):
    out, metrics, objects = tiny_run
    model = objects["policy"].model
    for d in DIMENSIONS:
        located = ValueNeurons.load(out / f"neurons_{d}.json", model)
        away = ValueNeurons.load(out / f"neurons_{d}_away.json", model)
        control = ValueNeurons.load(out / f"random_{d}.json", model)
        assert len(located) >= 1 and located.meta["dimension"] == d
        assert located.meta["negative"] == f"{d}_reversed" and away.meta["direction"] == "away"
        assert bool((located.delta > 0).all()) and located.prob is not None
        assert len(located) <= 20 or bool((located.delta[20:] >= 0.1).all())
        assert bool((located.delta[:-1] >= located.delta[1:]).all())
        assert control.layer_histogram(2) == located.layer_histogram(2)
        assert not set(zip(control.layer.tolist(), control.index.tolist())) & \
            set(zip(located.layer.tolist(), located.index.tolist()))
    summary = (out / "summary.md").read_text()
    for d in DIMENSIONS:  # a verdict per dimension, one of the five words
        assert re.search(rf"## {d}: (shown|ruled out|inconclusive|location unreliable|"
                         rf"not testable on this model)", summary)
    assert "refuted" not in summary
    # the reliability gate, read from the run's own files: a dimension with a valid instrument
    # whose location's Spearman-Brown (reversed contrast) is below 0.5 is "location unreliable"
    gate_of = json.loads((out / "control.json").read_text())
    brown = {r["dimension"]: float(r["Spearman-Brown (all prompts)"])
             for r in csv.DictReader(open(out / "reliability.csv"))
             if r["located from it"] == "yes"}
    assert len(brown) == len(DIMENSIONS)
    for d in DIMENSIONS:
        word = re.search(rf"## {d}: ([a-z ]+)\n", summary).group(1)
        if not any(gate_of[d].values()):
            assert word == "not testable on this model"
        elif brown[d] < 0.5:
            assert word == "location unreliable"
        else:
            assert word in ("shown", "ruled out", "inconclusive")
    gate = json.loads((out / "control.json").read_text())
    names = ["dilemmas", "statements", "questionnaire", "lettered", "embedding", "pyvalues"]
    assert set(gate) == set(DIMENSIONS) and all(list(g) == names for g in gate.values())
    m = objects["measurement"]
    for name in names:
        assert (out / f"dose_{name}.png").stat().st_size > 1000
        for d in DIMENSIONS:
            assert gate[d][name] == m.passes(name, d)
            assert (name, d, "located", 1.0) in m.arms and (name, d, "reverse", 1.0) in m.arms
    # generated-answer instruments only at validate.generate_gamma
    assert ("embedding", "conservation", "located", 0.0) not in m.arms
    assert ("dilemmas", "conservation", "located", 0.0) in m.arms
    for name in ("neurons", "reliability", "reliability_curve", "effects", "perplexity",
                 "verdict_conservation"):
        assert (out / f"{name}.md").exists() and (out / f"{name}.csv").exists()
    # both contrasts and both sources get a reliability row per dimension (the reversed run
    # has both poles); each dimension's set comes from its more reliable reversed source
    rows = list(csv.DictReader(open(out / "reliability.csv")))
    assert {(r["dimension"], r["contrast"], r["source"]) for r in rows} == {
        (d, c, s) for d in DIMENSIONS for c in ("reversed", "opposite_pole")
        for s in ("generated", "teacher_forced")}
    for d in DIMENSIONS:
        mine = {r["source"]: float(r["Spearman-Brown (all prompts)"]) for r in rows
                if r["dimension"] == d and r["contrast"] == "reversed"}
        chosen = [r["source"] for r in rows if r["dimension"] == d and r["located from it"]]
        assert chosen == [max(mine, key=mine.get)]
        assert ValueNeurons.load(out / f"neurons_{d}.json", model).meta["source"] == chosen[0]
    # the null: 3 random sets per arm at the verdict gamma, its quantile in effects.csv
    sets = objects["sets"]
    assert all(len(s.random_toward) == 3 for s in sets.values())
    quantiles = [r for r in csv.DictReader(open(out / "effects.csv"))
                 if r["arm"] == "located - random" and float(r["gamma"]) == 1.0]
    assert quantiles and all(r["random sets"] == "3" for r in quantiles)
    assert set(m.quantiles) == set(m.contrasts)  # 3 sets at the verdict gamma, else 1
    assert all(n == (3 if g == 1.0 else 1) for (_, _, g), (_, n) in m.quantiles.items())
    # effects.csv carries each pole-specificity difference: this pole's located - random
    # toward it, plus the opposite pole's toward its own (its push away from this pole)
    specific = {(r["instrument"], r["dimension"], float(r["gamma"])): float(r["effect"])
                for r in csv.DictReader(open(out / "effects.csv"))
                if r["arm"] == "this pole's set - opposite's"}
    assert specific and set(specific) == set(m.specific)
    for (name, d, g), value in specific.items():
        expected = m.contrasts[(name, d, g)].point + m.contrasts[(name, OPPOSITE[d], g)].point
        assert value == pytest.approx(expected, abs=1e-5)
    assert any((out / "tensorboard").iterdir())
    assert set(m.perplexity) == {f"{k}:{d}@{g}" for k in ("located", "random", "reverse")
                                 for d in DIMENSIONS for g in ("0", "1")
                                 if k != "reverse" or g == "1"}  # reverse: the verdict's gamma
    assert "perplexity/base" in metrics


def test_saved_neurons_are_reused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    _, objects = locate_values(compose_entry(
        "locate_values", [*QUICK, f"neurons={out}", "instruments=fast",
                          "dimensions=[conservation]"], tmp_path))
    first = ValueNeurons.load(out / "neurons_conservation.json")
    assert torch.equal(objects["sets"]["conservation"].toward.index, first.index)
    assert not (tmp_path / "pole_statistics.pt").exists()  # no location was run


def test_saved_statistics_give_the_same_sets(tiny_run, tmp_path):
    out, _, objects = tiny_run
    _, again = locate_values(compose_entry(
        "locate_values", [*QUICK, f"statistics={out}/pole_statistics.pt", "instruments=fast",
                          "dimensions=[conservation]"], tmp_path))
    assert torch.equal(again["sets"]["conservation"].toward.index,
                       objects["sets"]["conservation"].toward.index)


def test_location_statistics_are_cached_and_keyed(tmp_path, monkeypatch):
    import locate_values as entry

    base = [*(o for o in QUICK if not o.startswith("locate.cache")), "locate.cache=true",
            f"paths.cache_dir={tmp_path / 'cache'}", "instruments=none",
            "dimensions=[conservation]"]
    for run in "abcde":
        (tmp_path / run).mkdir()
    _, first = locate_values(compose_entry("locate_values", base, tmp_path / "a"))
    cached = list((tmp_path / "cache" / "pole_statistics").glob("*.pt"))
    assert len(cached) == 1

    def no_location(*args, **kwargs):
        raise AssertionError("location ran although its statistics were cached")

    monkeypatch.setattr(entry, "location_statistics", no_location)
    # a hit: same sets, same texts
    _, second = locate_values(compose_entry("locate_values", base, tmp_path / "b"))
    for kind in ("toward", "away"):
        assert torch.equal(getattr(second["sets"]["conservation"], kind).index,
                           getattr(first["sets"]["conservation"], kind).index)
    assert (tmp_path / "a" / "pole_responses.jsonl").read_text() == \
        (tmp_path / "b" / "pole_responses.jsonl").read_text() != ""
    # an unreadable entry is gathered anew, not an error
    cached[0].write_bytes(b"not a torch file")
    with pytest.raises(AssertionError, match="location ran"):
        locate_values(compose_entry("locate_values", base, tmp_path / "e"))
    # another response length is another key: location runs again
    with pytest.raises(AssertionError, match="location ran"):
        locate_values(compose_entry("locate_values", [*base, "locate.max_new_tokens=5"],
                                    tmp_path / "c"))
    monkeypatch.undo()
    locate_values(compose_entry("locate_values", [*base, "locate.cache=false"], tmp_path / "d"))
    assert len(list((tmp_path / "cache" / "pole_statistics").glob("*.pt"))) == 1


class PlantedControl:
    """An instrument whose persona control passes on one axis only (personas of that axis
    move every unit toward their pole) and that counts its steered scores."""
    name, generates = "planted", False

    def __init__(self, data, passing_axis: str, failing_pole: str | None = None) -> None:
        self.pole_of = {p: d for d in (*DIMENSIONS, NEUTRAL) for p in data.personas(d)}
        self.passing_axis, self.failing_pole, self.steered = passing_axis, failing_pole, []

    def signs(self, subject, axis):
        return torch.ones(6)

    def score(self, subject, axis, persona, settings):
        if settings is not None:  # each set moves every unit toward its own pole
            self.steered.append(settings.name)
            kind, dim = settings.name.split("@")[0].split(":")
            kind = kind.rstrip("0123456789")  # random<draw>: one set of the null
            toward_own = 1.0 if dim == AXES[axis][0] else -1.0
            amount = {"located": 0.3, "random": 0.1, "reverse": -0.2}[kind]
            return torch.full((6,), toward_own * amount, dtype=torch.float64)
        if persona is None or self.pole_of[persona] == NEUTRAL:
            return torch.zeros(6, dtype=torch.float64)
        if self.pole_of[persona] == self.failing_pole:  # no move: its control fails
            return torch.linspace(-0.1, 0.1, 6, dtype=torch.float64)
        sign = 1.0 if self.pole_of[persona] == AXES[axis][0] else -1.0
        return torch.full((6,), sign if axis == self.passing_axis else -sign,
                          dtype=torch.float64) + torch.linspace(-0.1, 0.1, 6)

    def reset(self):
        pass


def test_controls_first_and_the_cost_limit_decide_what_is_measured(tiny_run):
    _, _, objects = tiny_run
    subject, sets = objects["subject"], objects["sets"]
    all_arms = arms(sets, [0.0, 1.0, 4.0], 0.9, 0, "probability")
    planted = PlantedControl(subject.data, AXIS)
    everything = measure(subject, [planted], DIMENSIONS, all_arms, 1, [], 20, 2, lambda _: None,
                         controls_first=False, max_perplexity=None)
    assert len(planted.steered) == len(all_arms)  # ungated: every arm on both axes
    other = next(a for a in AXES if a != AXIS)
    assert all(everything.passes("planted", d) == (AXIS_OF[d] == AXIS) for d in DIMENSIONS)
    # the cost limit: between the located arms' ratios, so that some pass and some do not
    ratio = everything.perplexity
    cheapest = sorted(min(ratio[f"located:{d}@{g:g}"] for d in AXES[AXIS])
                      for g in (0.0, 1.0, 4.0))  # per gamma, the cheaper pole's located arm
    limit = cheapest[1]  # the dearest gamma is left out on both poles
    planted.steered.clear()
    gated = measure(subject, [planted], DIMENSIONS, all_arms, 1, [], 20, 2, lambda _: None,
                    controls_first=True, max_perplexity=limit)
    assert gated.skipped == {("planted", other): "fails its control on both poles"}
    def measured(a):  # reverse: its own cost; located, random: either pole's located cost
        if a.kind == "reverse":
            return ratio[a.settings.name] <= limit
        return min(ratio[f"located:{d}@{a.gamma:g}"] for d in AXES[AXIS]) <= limit

    expected = [a.settings.name for a in all_arms if AXIS_OF[a.dimension] == AXIS and
                measured(a)]
    assert 0 < len(expected) < 18 and planted.steered == expected
    assert {(d, k, g) for _, d, k, g in gated.arms} == {
        (a.dimension, a.kind, a.gamma) for a in all_arms if a.settings.name in expected}
    assert all((AXIS_OF[d] == AXIS) for _, d, _ in gated.contrasts)
    # pole-specificity by hand: (0.3 - 0.1) toward its pole minus (0.3 - 0.1) toward the other
    pairs = {(d, g) for _, d, g in gated.contrasts}
    assert {(d, g) for _, d, g in gated.specific} == {
        (d, g) for d, g in pairs if (OPPOSITE[d], g) in pairs} != set()
    assert all(abs(e.point - 0.4) < 1e-9 for e in gated.specific.values())
    # one pole's control fails: its reverse arms are read by nothing and not measured; its
    # located and random arms still are (the passing pole's specificity check reads them)
    failing, passing = AXES[AXIS][1], AXES[AXIS][0]
    one_pole = PlantedControl(subject.data, AXIS, failing_pole=failing)
    half = measure(subject, [one_pole], DIMENSIONS, all_arms, 1, [], 20, 2, lambda _: None,
                   controls_first=True, max_perplexity=None)
    assert half.passes("planted", passing) and not half.passes("planted", failing)
    assert one_pole.steered == [a.settings.name for a in all_arms if AXIS_OF[a.dimension] == AXIS
                                and not (a.dimension == failing and a.kind == "reverse")]
    assert {(d, g) for _, d, g in half.specific} == {(d, g) for d in AXES[AXIS]
                                                     for g in (0.0, 1.0, 4.0)}
    assert half.no_reverse == [("planted", failing)] and gated.no_reverse == []


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_entry("locate_values.py", *args, f"hydra.run.dir={cwd}")


@pytest.mark.parametrize("args, message", [
    (["dimensions=[kindness]"], "dimensions='kindness' is not a value dimension"),
    (["steer.gamma=-1"], "steer.gamma must be a number >= 0"),
    (["steer.fraction=0"], "steer.fraction must be in (0, 1]"),
    (["steer.scale=huge"], "steer.scale must be one of"),
    (["locate.contrast=sideways"], "locate.contrast must be one of reversed, opposite_pole"),
    (["locate.null_shuffles=0"], "locate.null_shuffles must be an integer >= 1"),
    (["locate.cache=maybe"], "locate.cache must be true or false, got 'maybe'"),
    (["locate.top_k=-3"], "locate.top_k must be an integer >= 0"),
    (["neurons=/nonexistent"], "does not exist"),
    (["statistics=/nonexistent.pt"], "does not exist"),
    (["data.path=/nonexistent"], "is not a folder"),
    (["validate.max_perplexity=0.5"], "validate.max_perplexity=0.5: a perplexity ratio limit"),
    (["validate.max_perplexity=abc"], "validate.max_perplexity=abc: a perplexity ratio limit"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    proc = run_cli("policy=tiny", "locate.pairs=2", "locate.max_new_tokens=2", *args,
                   cwd=tmp_path)
    assert proc.returncode == 1
    assert message in proc.stdout and "Traceback" not in proc.stdout


def test_neurons_from_another_model_are_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    proc = run_cli("policy=tiny", "policy.intermediate_size=96", f"neurons={out}",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "was located on" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_value_monitor_logs_the_instruments_that_pass(tiny_cfg, tiny_run, tmp_path):
    """With a gate that passes the dilemmas for conservation only, the monitor logs that
    instrument and dimension alone: the margin change toward conservation, equal to the one
    computed independently from the initial and the trained policy."""
    out, _, _ = tiny_run
    gate = tmp_path / "control.json"
    gate.write_text(json.dumps({d: {"dilemmas": d == "conservation"} for d in DIMENSIONS}))
    cfg = tiny_cfg(*DENSE, "callbacks.value_monitor.every_n_steps=1", "model.lr=0.05",
                   f"callbacks.value_monitor.neurons={out}",
                   f"callbacks.value_monitor.control={gate}", "trainer.max_steps=2")
    metrics, objects = train(cfg)
    monitor = next(c for c in objects["callbacks"] if type(c).__name__ == "ValueMonitor")
    logged = {k for k in monitor.last if k.startswith("values/dilemmas/")}
    assert logged == {"values/dilemmas/conservation"}
    assert all(f"values/neuron_activation/{d}" in metrics for d in DIMENSIONS)
    initial = hydra.utils.instantiate(cfg.policy)  # the same seed: the untrained weights
    trained = objects["model"].policy.eval()
    data = monitor.data  # the first 16 held-out dilemmas of each axis (dilemmas_per_axis)
    first = [r["text"] for r in load_value_data().question_rows
             if r["axis"] == AXIS and r["split"] == "validate"][:16]
    assert [q for q, _ in data.dilemmas(AXIS)] == first
    before = DilemmaMargin().score(Subject(initial, None, data), AXIS, None, None)
    after = DilemmaMargin().score(Subject(objects["policy"], None, data), AXIS, None, None)
    assert trained is objects["policy"].model
    assert monitor.last["values/dilemmas/conservation"] == pytest.approx(
        -float((after - before).mean()), abs=1e-6)  # conservation is the axis's second pole
    assert monitor.last["values/dilemmas/conservation"] != 0.0
    rows = open(tmp_path / "csv" / "metrics.csv").read()
    assert "values/dilemmas/conservation" in rows


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
                res = model(input_ids=torch.tensor([[token]]), **past(model, res),
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
def test_scale_multirun_sweep(tmp_path):
    """`locate_values.py -m steer.scale=probability,p95`: one job each, each with its tables."""
    run_entry("locate_values.py", "-m", "steer.scale=probability,p95", *QUICK,
              "instruments=fast", "dimensions=[conservation]", f"hydra.sweep.dir={tmp_path}",
              timeout=600, check=True)
    for job, scale in (("0", "probability"), ("1", "p95")):
        assert f"steer.scale {scale}" in (tmp_path / job / "summary.md").read_text()
        assert (tmp_path / job / "effects.csv").read_text().count("\n") > 10


def test_bad_policy_steer_settings(tiny_cfg, tiny_run):
    """Each bad `policy.steer` value ends in the user error that train.py prints as one line."""
    from train import user_error

    out, _, _ = tiny_run
    cases = [(["+policy.steer.neurons=/nonexistent.json"], FileNotFoundError, "does not exist"),
             ([f"+policy.steer.neurons={out}/neurons_conservation.json", "+policy.steer.gamma=-2"],
              ValueError, "policy.steer.gamma must be a number >= 0"),
             ([f"+policy.steer.neurons={out}/neurons_conservation.json",
               "+policy.steer.scale=huge"], ValueError, "steer.scale must be one of"),
             (["+policy.steer.gamma=1.0"], ValueError, "policy.steer.neurons is empty")]
    for overrides, kind, message in cases:
        with pytest.raises(Exception) as info:
            train(tiny_cfg(*overrides))
        cause = user_error(info.value)
        assert isinstance(cause, kind) and message in str(cause)
