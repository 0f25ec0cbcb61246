"""Every config group composes, and every group that can be built here instantiates."""
from __future__ import annotations

import inspect

import hydra
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tests.helpers import ROOT, TINY, compose_entry, full_sampler



def binds(target: str, node, *, given: tuple[str, ...] = ()) -> None:
    """The config's keys are arguments that the target accepts (a typo'd key fails here)."""
    keys = {k: None for k in node if not str(k).startswith("_")}
    keys.update({k: None for k in given})
    inspect.signature(hydra.utils.get_method(target)).bind(**keys)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def test_groups_are_not_empty():
    for group in ("data", "policy", "sampler", "model", "callbacks", "logger", "trainer",
                  "paths", "hydra", "experiment", "debug", "hparams_search", "predictor"):
        assert options(group), group


@pytest.mark.parametrize("name", options("predictor"))
def test_infinite_sampler_receives_each_predictor(name):
    sampler = instantiate(compose_entry("train", ["sampler=infinite", f"predictor={name}"]).sampler)
    assert sampler.predictor.name == name


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_config_builds_a_sampler_that_decodes_like_generate(name):
    """Built with no further arguments, each sampler's greedy completions are those of
    `model.generate` (float64 tiny model, EOS cut), group by group."""
    from tests.helpers import tiny_lm

    from samplers.base import Sampler

    sampler = instantiate(compose_entry("train", [f"sampler={name}"]).sampler)
    assert isinstance(sampler, Sampler)  # sample, bind, predictor, learning
    model, eos = tiny_lm("llama"), 3
    prompts = [[1, 2, 4, 6, 7, 9], [9, 8], [10, 11, 12, 13]]
    spec_args = dict(max_new_tokens=12, temperature=0.0, eos_token_ids=(eos,))
    from samplers.base import GenerationSpec
    r = sampler.sample(model, prompts, 2, GenerationSpec(**spec_args))
    for row in range(len(r)):
        prompt = prompts[int(r.prompt_index[row])]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        expected = out[: out.index(eos) + 1] if eos in out else out
        assert r.completion_ids[row, : r.lengths[row]].tolist() == expected, (name, row)


@pytest.mark.parametrize("name", options("policy"))
def test_policy_config_keys_are_arguments_of_its_target(name):
    cfg = compose_entry("train", [f"policy={name}"])
    binds(cfg.policy._target_, cfg.policy)


def test_tiny_policy_instantiates():
    policy = instantiate(compose_entry("train", ["policy=tiny"]).policy)
    assert policy.tokenizer.eos_token_id in policy.eos_token_ids
    assert policy.model.config.vocab_size == len(policy.tokenizer)


@pytest.mark.parametrize("name", options("data"))
def test_data_instantiates_and_yields_batches(name, char_tokenizer):
    cfg = compose_entry("train", [f"data={name}", "data.source.size=40", "data.val_size=4"])
    datamodule = instantiate(cfg.data, tokenizer=char_tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert len(batch["prompt_ids"]) == cfg.data.batch_size
    assert all(len(p) > 0 for p in batch["prompt_ids"])
    assert len(next(iter(datamodule.val_dataloader()))["prompt_ids"]) > 0


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_callbacks_and_loggers_instantiate(group, tmp_path):
    from train import instantiate_group
    for name in options(group):
        cfg = compose_entry("train", [*TINY, f"{group}={name}"], tmp_path)
        built = instantiate_group(cfg.get(group))
        assert name == "none" or built, name


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(name, tmp_path):
    cfg = compose_entry("train", [f"trainer={name}"], tmp_path)
    needs_gpu = cfg.trainer.accelerator == "gpu"
    if needs_gpu and not torch.cuda.is_available():  # what can be checked without CUDA
        binds(cfg.trainer._target_, cfg.trainer, given=("callbacks", "logger"))
        if OmegaConf.is_dict(cfg.trainer.get("strategy")):
            instantiate(cfg.trainer.strategy)  # its arguments are the strategy's
        return
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_steps == cfg.trainer.max_steps
    assert trainer.world_size == cfg.trainer.devices


@pytest.mark.parametrize("group", ["experiment", "debug", "hparams_search"])
def test_global_groups_set_only_keys_that_their_targets_accept(group):
    """Every experiment/debug/search config composes into a model, sampler, data and trainer
    whose keys are arguments of their targets; a sweep sweeps keys that exist."""
    for name in options(group):
        cfg = compose_entry("train", [f"{group}={name}"])
        binds(cfg.model._target_, cfg.model, given=("policy", "sampler"))
        binds(cfg.sampler._target_, cfg.sampler)
        binds(cfg.data._target_, cfg.data, given=("tokenizer", "max_prompt_tokens"))
        binds(cfg.trainer._target_, cfg.trainer, given=("callbacks", "logger"))
        for key in OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}:
            assert OmegaConf.select(cfg, key, default=None) is not None, (name, key)


def test_model_builds_from_config():
    cfg = compose_entry("train", TINY)
    policy = instantiate(cfg.policy)
    model = instantiate(cfg.model, policy=policy, sampler=instantiate(cfg.sampler))
    assert set(model.reward_fns) == {"gsm8k", "format"}
    assert model.hparams.group_size == 4


@pytest.mark.slow
def test_offline_default_policy_loads_and_generates(tmp_path):
    """The packaged SmolLM2 GGUF converts (once) and decodes a chat prompt."""
    from samplers.base import GenerationSpec

    cfg = compose_entry("train", [], tmp_path)
    policy = instantiate(cfg.policy)
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
        tokenize=False)
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    spec = GenerationSpec(8, temperature=0.0, eos_token_ids=policy.eos_token_ids)
    rollouts = full_sampler().sample(policy.model, [ids], 1, spec)
    assert "5" in policy.tokenizer.decode(rollouts.completion_ids[0])
