"""Length predictors of the `infinite` sampler, the saved-rollouts format and the offline
trainer (predictors/, predictors/rollouts.py, train_predictor.py).

The synthetic rollouts make the remaining length learnable: three prompt templates (yes/no,
counting, story) whose completions start with a template-specific probe and have lengths
~10, ~30 and ~60 tokens. Predictors are trained on some prompts and scored on held-out ones.

    PYTHONPATH=. python -m pytest -q tests/test_predictors.py
"""
from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from predictors.rollouts import (PredictorDataModule, examples, hidden_states_at,
                                  load_rollouts, save_rollouts, split_prompts)
from samplers.base import SamplingStats, pack_rollouts
from predictors import hidden_predictor, HistoryPredictor, minilm_predictor, OraclePredictor
from samplers.prediction import ProbeBatch
from predictors.text_encoder import load_encoder
from tests.helpers import compose_entry, tiny_lm

K = 4  # probe tokens
CLASSES = (("Say yes or no: is {} even?", "yes, ", 10),
           ("Count up from {}:", "1 2 3 4", 30),
           ("Write a long story about {}.", "Once upon", 60))
NUM_PROMPTS, GROUP = 24, 4
TRAIN, HELD_OUT = list(range(18)), list(range(18, 24))  # both hold all three templates
FAST = dict(refit_steps=40, batch_size=32, lr=3e-3, seed=0)


def synthetic(tokenizer, seed: int = 0):
    """(prompts, Rollouts): completion length is set by the prompt's template (+-3 tokens)."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for i in range(NUM_PROMPTS):
        template, start, base = CLASSES[i % 3]
        prompts.append(tokenizer(template.format(i))["input_ids"])
        for _ in range(GROUP):
            length = base + rng.randint(-3, 3)
            body = start + "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(100))
            completions.append(tokenizer(body)["input_ids"][: length - 1]
                               + [tokenizer.eos_token_id])
    stats = SamplingStats(0, 0, 0, 0, 0, 0, 0.0)
    return prompts, pack_rollouts(completions, [True] * len(completions), NUM_PROMPTS, GROUP,
                                  stats)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rollouts_file(tmp_path_factory, char_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.pt"
    save_rollouts(path, *synthetic(char_tokenizer))
    return path


@pytest.fixture(scope="module")
def records(rollouts_file):
    return load_rollouts(rollouts_file)


@pytest.fixture(scope="module")
def policy_lm(char_tokenizer):
    return tiny_lm(vocab_size=len(char_tokenizer), dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder():
    """The shipped MiniLM, loaded once: every minilm predictor of the process shares it."""
    return load_encoder(None)


def mae(predicted: torch.Tensor, true: torch.Tensor) -> float:
    return float((predicted - true.float()).abs().mean())


def train_online(predictor, records, model=None, calls: int = 4):
    """observe() the training prompts in `calls` chunks; return held-out (batch, remaining)."""
    needs_hidden = predictor.needs_hidden
    for part in range(calls):
        batch, remaining = examples(records, K, TRAIN[part::calls], model, needs_hidden)
        predictor.observe(batch, remaining)
    return examples(records, K, HELD_OUT, model, needs_hidden)


def assert_reload_identical(predictor, make, batch, tmp_path):
    """save -> load in a fresh predictor, and state_dict round trip: identical predictions."""
    before = predictor.predict(batch)
    predictor.save(tmp_path / "p.pt")
    reloaded = make(path=str(tmp_path / "p.pt"))
    assert torch.equal(reloaded.predict(batch), before)
    fresh = make()
    fresh.load_state_dict(predictor.state_dict())
    assert torch.equal(fresh.predict(batch), before)
    torch.save(predictor.state_dict(), tmp_path / "state.pt")  # weights_only friendly
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(fresh.predict(batch), before)


# ----------------------------------------------------------------------------- rollouts file


def test_rollouts_roundtrip_and_examples(records, char_tokenizer):
    prompts, rollouts = synthetic(char_tokenizer)
    assert records["prompts"] == prompts
    assert torch.equal(records["lengths"], rollouts.lengths)
    batch, remaining = examples(records, K)
    keep = rollouts.lengths > K  # still running after K tokens: what the sampler asks about
    assert len(batch) == int(keep.sum()) == len(remaining)
    assert torch.equal(remaining, rollouts.lengths[keep] - K)
    assert torch.equal(batch.true_remaining, remaining)
    assert batch.probe_ids[0] == rollouts.completion_ids[0, :K].tolist()
    dropped, _ = examples(records, 9)  # the yes/no samples (L <= 13) are dropped at k = 9
    assert len(dropped) == int((rollouts.lengths > 9).sum()) < len(batch)


def test_hidden_states_at_and_saved_hidden(policy_lm, records, char_tokenizer, tmp_path):
    prompt, completion = records["prompts"][0], records["completion_ids"][0].tolist()
    states = hidden_states_at(policy_lm, prompt, completion, [0, 2, K])  # [3, H]
    ids = torch.tensor([prompt + completion[:K]])
    with torch.inference_mode():
        full = policy_lm(ids, output_hidden_states=True).hidden_states[-1][0]  # [T, H]
    for row, k in enumerate([0, 2, K]):
        torch.testing.assert_close(states[row], full[len(prompt) - 1 + k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ks"):
        hidden_states_at(policy_lm, prompt, completion, [len(completion) + 1])
    batch, _ = examples(records, K, model=policy_lm, needs_hidden=True)
    torch.testing.assert_close(batch.hidden[0], states[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden states for probe_tokens"):
        examples(records, K, needs_hidden=True)
    # a file that carries hidden[k] is used as is
    n = len(records["lengths"])
    prompts, rollouts = synthetic(char_tokenizer)
    save_rollouts(tmp_path / "h.pt", prompts, rollouts, hidden={K: torch.arange(n * 3.0)
                                                                    .view(n, 3)})
    batch, _ = examples(load_rollouts(tmp_path / "h.pt"), K, needs_hidden=True)
    assert batch.hidden.shape == (len(batch), 3)
    with pytest.raises(ValueError, match="rollouts="):
        load_rollouts(tmp_path / "missing.pt")


def test_split_is_by_prompt(rollouts_file):
    train, val = split_prompts(10, 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(10))
    dm = PredictorDataModule(str(rollouts_file), K, featurize=lambda b: b.prompt_index[:, None]
                             .float(), val_fraction=0.25)
    dm.setup("fit")
    train_prompts = set(dm.train_set.tensors[0][:, 0].tolist())
    val_prompts = set(dm.val_set.tensors[0][:, 0].tolist())
    assert train_prompts and val_prompts and not train_prompts & val_prompts


# ----------------------------------------------------------------------------- predictors


def test_oracle():
    oracle = OraclePredictor()
    batch = ProbeBatch([[1, 2]], torch.tensor([0, 0]), torch.tensor([0, 1]), [[3], [4]],
                       true_remaining=torch.tensor([5, 0]))
    assert torch.equal(oracle.predict(batch), torch.tensor([5.0, 0.0]))
    batch.true_remaining = None
    with pytest.raises(ValueError, match="true_remaining"):
        oracle.predict(batch)


def test_history_learns_falls_back_and_reloads(records, tmp_path):
    def make(**kwargs):
        return HistoryPredictor(min_count=2, neighbours=2, default=64.0, **kwargs)

    history = make()
    held_out, true = train_online(history, records)  # prompts never seen
    own, own_true = examples(records, K, TRAIN)  # prompts with their own history
    assert torch.equal(make().predict(own), torch.full((len(own),), 64.0))
    untrained = mae(make().predict(held_out), true)
    assert mae(history.predict(own), own_true) < 3.0 < 0.2 * untrained
    assert mae(history.predict(held_out), true) < 0.3 * untrained  # similar-prompt fallback
    # no similar prompt (token ids 0 never occur in the prompts): global mean of recent lengths
    lone = ProbeBatch([[0, 0]], torch.tensor([0]), torch.tensor([0]), [[5] * K])
    global_mean = examples(records, K, TRAIN)[1].float().mean().item()
    assert abs(history.predict(lone).item() - global_mean) < 1e-3
    assert_reload_identical(history, make, held_out, tmp_path)
    small = HistoryPredictor(max_prompts=3, max_per_prompt=2)
    train_online(small, records)
    assert len(small.history) == 3 and all(len(h) <= 2 for h in small.history.values())


def test_minilm_learns_and_reloads(encoder, records, char_tokenizer, tmp_path):
    def make(**kwargs):
        predictor = minilm_predictor(**FAST, **kwargs)
        predictor.bind(char_tokenizer)
        return predictor

    predictor = make()
    assert predictor.featurizer.encoder is encoder  # loaded once per process
    held_out, true = examples(records, K, HELD_OUT)
    untrained = mae(predictor.predict(held_out), true)
    assert torch.allclose(predictor.predict(held_out), torch.tensor(64.0))
    train_online(predictor, records)
    assert predictor.learner.refits == 4
    assert mae(predictor.predict(held_out), true) < 0.2 * untrained
    assert_reload_identical(predictor, make, held_out, tmp_path)
    unbound = minilm_predictor()
    with pytest.raises(ValueError, match="bind"):
        unbound.predict(held_out)


def test_minilm_finetune_encoder_trains_a_copy(encoder, records, char_tokenizer, tmp_path):
    def make(**kwargs):
        predictor = minilm_predictor(finetune_encoder=True, max_input_tokens=24, refit_steps=1,
                                    batch_size=8, **kwargs)
        predictor.bind(char_tokenizer)
        return predictor

    predictor = make()
    batch, remaining = examples(records, K, TRAIN[:3])
    predictor.observe(batch, remaining)
    tuned = predictor.learner.module.encoder.embeddings.word_embeddings.weight
    frozen = encoder.model.embeddings.word_embeddings.weight
    assert not torch.equal(tuned, frozen) and not frozen.requires_grad
    reloaded = make()
    predictor.save(tmp_path / "p.pt")
    reloaded.load(tmp_path / "p.pt")
    assert torch.equal(reloaded.predict(batch), predictor.predict(batch))
    with pytest.raises(ValueError, match="finetune_encoder"):
        minilm_predictor().load(tmp_path / "p.pt")


def test_hidden_learns_lazily_and_reloads(policy_lm, records, tmp_path):
    def make(**kwargs):
        return hidden_predictor(**FAST, **kwargs)

    predictor = make()
    assert predictor.learner.module is None and predictor.state_dict()["learner"]["module"] \
        is None
    held_out, true = examples(records, K, HELD_OUT, policy_lm, needs_hidden=True)
    untrained = mae(predictor.predict(held_out), true)  # builds the head: input size 32
    assert predictor.learner.in_features == 32 and untrained > 20
    with torch.inference_mode():  # the sampler calls observe() under inference_mode
        train_online(predictor, records, policy_lm)
    assert mae(predictor.predict(held_out), true) < 0.2 * untrained
    assert_reload_identical(predictor, make, held_out, tmp_path)
    held_out.hidden = None
    with pytest.raises(ValueError, match="batch.hidden"):
        predictor.predict(held_out)


def test_save_on_refit_writes_path(policy_lm, records, tmp_path):
    path = tmp_path / "online.pt"
    predictor = hidden_predictor(path=str(path), save_on_refit=True, refit_every=2,
                                refit_steps=1)
    batch, remaining = examples(records, K, TRAIN[:2], policy_lm, needs_hidden=True)
    predictor.observe(batch, remaining)
    assert not path.exists()  # refit_every=2: no refit after the first call
    predictor.observe(batch, remaining)
    assert path.exists() and hidden_predictor(path=str(path)).learner.refits == 1


def test_empty_batch_predicts_empty(encoder, char_tokenizer):
    empty = ProbeBatch([[1, 2]], torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), [], hidden=torch.zeros(0, 8),
                       true_remaining=torch.zeros(0, dtype=torch.long))
    minilm = minilm_predictor()
    minilm.bind(char_tokenizer)
    for predictor in (OraclePredictor(), HistoryPredictor(), minilm, hidden_predictor()):
        out = predictor.predict(empty)
        assert out.shape == (0,) and out.dtype == torch.float32
        predictor.observe(empty, torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("cls, kwargs, name", [
    (hidden_predictor, dict(refit_every=0), "refit_every"),
    (hidden_predictor, dict(refit_steps=-1), "refit_steps"),
    (hidden_predictor, dict(buffer_size=0), "buffer_size"),
    (hidden_predictor, dict(lr=0.0), "lr"),
    (hidden_predictor, dict(head_width=0), "head_width"),
    (hidden_predictor, dict(log_target="yes"), "log_target"),
    (HistoryPredictor, dict(min_count=0), "min_count"),
    (HistoryPredictor, dict(max_prompts=0), "max_prompts"),
    (minilm_predictor, dict(max_input_tokens=2), "max_input_tokens"),
    (minilm_predictor, dict(default=-1.0), "default"),
])
def test_bad_config_values_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_load_checks_the_predictor_name(tmp_path):
    HistoryPredictor().save(tmp_path / "history.pt")
    with pytest.raises(ValueError, match="'history' predictor"):
        hidden_predictor().load(tmp_path / "history.pt")


# ----------------------------------------------------------------------------- configs, entry


@pytest.mark.parametrize("name", ["oracle", "history", "minilm", "hidden"])
def test_predictor_configs_build_predictors_that_learn(name, encoder, records, policy_lm,
                                                      char_tokenizer, tmp_path):
    """Each configs/predictor/<name>.yaml, with its default settings, builds a predictor that
    learns online: after observing the training prompts its held-out error is below that of
    the same config untrained (oracle: exact); its state reloads to identical predictions."""
    def make(**kwargs):
        cfg = compose_entry("train_predictor", [f"predictor={name}"], tmp_path).predictor
        predictor = instantiate(cfg, **kwargs)
        predictor.bind(char_tokenizer)
        return predictor

    predictor = make()
    assert predictor.name == name
    model = policy_lm if predictor.needs_hidden else None
    held_out, true = train_online(predictor, records, model)
    if predictor.needs_oracle:
        held_out.true_remaining = true
        assert torch.equal(predictor.predict(held_out), true.float())
    else:
        assert mae(predictor.predict(held_out), true) < 0.8 * mae(make().predict(held_out), true)
    fresh = make()
    fresh.load_state_dict(predictor.state_dict())
    assert torch.equal(fresh.predict(held_out), predictor.predict(held_out))


@pytest.mark.parametrize("name", ["hidden", "minilm"])
def test_train_predictor_entry_point(name, encoder, rollouts_file, tmp_path):
    from train_predictor import train_predictor

    cfg = compose_entry("train_predictor", [
                             f"predictor={name}", "policy=tiny", f"rollouts={rollouts_file}",
                             f"probe_tokens={K}", "max_epochs=4", "batch_size=16",
                             "val_fraction=0.25", "logger=csv", "trainer.accelerator=cpu",
                             "predictor.lr=3e-3"], tmp_path)
    metrics, objects = train_predictor(cfg)
    path = Path(objects["path"])
    assert path == tmp_path / "predictor.pt" and path.is_file()
    assert {"predictor/mae", "predictor/kendall_tau", "predictor/train_loss"} <= set(metrics)
    predictor, policy = objects["predictor"], objects["policy"]
    batch, _ = examples(load_rollouts(rollouts_file), K, model=policy.model,
                        needs_hidden=predictor.needs_hidden)
    reloaded = instantiate(cfg.predictor, path=str(path))
    reloaded.bind(policy.tokenizer)
    assert torch.equal(reloaded.predict(batch), predictor.predict(batch))
    assert not torch.allclose(predictor.predict(batch), torch.tensor(64.0))  # it trained


@pytest.mark.parametrize("override, name", [("probe_tokens=-1", "probe_tokens"),
                                            ("rollouts=/nonexistent.pt", "rollouts"),
                                            ("predictor=history", "trainable head")])
def test_train_predictor_bad_input(override, name, rollouts_file, tmp_path):
    from train_predictor import train_predictor

    cfg = compose_entry("train_predictor", ["policy=tiny", "predictor=history",
                                            f"rollouts={rollouts_file}", override], tmp_path)
    with pytest.raises(ValueError, match=name):
        train_predictor(cfg)
