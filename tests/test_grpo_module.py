"""GRPOModule checks against independent computations: log-probs under the sampling
temperature and across padding, micro-batching that leaves the gradient unchanged, the first
of several iterations being exactly on-policy, and the LoRA reference being the base model."""
from __future__ import annotations

import pytest
import torch

import modules.grpo as grpo
from modules.policy import tiny
from train import train
from tests.helpers import DIGITS, read_metrics

# Reward = fraction of digit characters (variance within every group of the random policy);
# without it the tiny policy's arithmetic reward is 0 everywhere and every advantage is 0.
DENSE = [*DIGITS, "~model.rewards.gsm8k", "~model.rewards.format", "model.accuracy_reward=null"]


def plain_log_probs(model, prompt: list[int], completion: list[int],
                    temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, from one unpadded forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_log_probs_are_under_the_sampling_temperature_and_padding_free(tiny_cfg, temperature):
    _, objects = train(tiny_cfg(f"model.temperature={temperature}", "trainer.max_steps=1",
                                "callbacks=none", "data.batch_size=2"))
    module = objects["model"]
    batch = next(iter(objects["datamodule"].train_dataloader()))
    prompts = [batch["prompt_ids"][0], batch["prompt_ids"][1][:-5]]  # different lengths
    rollouts = module.generate(prompts, 3, module.spec())
    module.policy.eval()
    with torch.no_grad():
        logp, _ = module.log_probs(module.policy, prompts, rollouts, torch.arange(len(rollouts)))
    for r in range(len(rollouts)):
        n = int(rollouts.lengths[r])
        expected = plain_log_probs(module.policy, prompts[int(rollouts.prompt_index[r])],
                                   rollouts.completion_ids[r, :n].tolist(), temperature)
        torch.testing.assert_close(logp[r, :n].double(), expected, atol=2e-5, rtol=1e-5)


def test_update_micro_batch_does_not_change_the_gradient(tiny_cfg):
    """One optimizer step's gradient is the same with 1 or 8 completions per forward."""
    grads = []
    for micro in (1, 8):
        _, objects = train(tiny_cfg(*DENSE, f"model.update_micro_batch={micro}",
                                    "trainer.max_steps=1",
                                    "callbacks=none", "+callbacks.grads._target_="
                                    "tests.helpers.GradRecorder", "model.max_grad_norm=1e9"))
        grads.append(objects["callbacks"][0].grads[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_first_of_two_iterations_is_on_policy(tiny_cfg, monkeypatch):
    """num_iterations=2: the first pass has ratio exactly 1 and nothing clipped; the second,
    after one optimizer step, does not."""
    calls = []
    original = grpo.clipped_surrogate

    def spy(logp, old, advantages, low, high):
        calls.append((logp.detach() - old.detach()).abs().max().item())
        per_token, clipped = original(logp, old, advantages, low, high)
        calls[-1] = (calls[-1], bool(clipped.any()))
        return per_token, clipped

    monkeypatch.setattr(grpo, "clipped_surrogate", spy)
    train(tiny_cfg(*DENSE, "model.num_iterations=2", "model.update_micro_batch=8", "model.lr=1e-2",
                   "trainer.max_steps=1", "callbacks=none"))
    assert len(calls) == 2  # one micro-batch of 8 per iteration
    assert calls[0] == (0.0, False)
    assert calls[1][0] > 0


def test_lora_reference_is_the_base_model(tiny_cfg):
    lora = [*DENSE, "+policy.lora.r=4", "+policy.lora.lora_alpha=8",
            "+policy.lora.target_modules=all-linear",
            "model.beta=0.1", "model.lr=5e-2", "trainer.max_steps=2", "callbacks=none"]
    _, objects = train(tiny_cfg(*lora))
    module = objects["model"]
    base = tiny(seed=objects["cfg"].seed).model.eval()  # the same random init, no adapters
    ids = torch.tensor([[5, 9, 14, 3, 27, 8]])
    module.policy.eval()
    with torch.no_grad():
        reference = module.reference()(input_ids=ids).logits
        trained = module.policy(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(trained, expected)  # the adapters did train


def test_validation_does_not_train_the_length_predictor(tiny_cfg, monkeypatch):
    """Greedy G = 1 validation lengths come from another distribution: only the training
    step's lengths reach the predictor's observe()."""
    from predictors import HistoryPredictor

    seen = []
    original = HistoryPredictor.observe
    monkeypatch.setattr(HistoryPredictor, "observe",
                        lambda self, batch, true: (seen.append(len(true)),
                                                   original(self, batch, true))[1])
    _, objects = train(tiny_cfg("sampler=infinite", "predictor=history", "trainer.max_steps=1",
                                "trainer.val_check_interval=1", "data.val_size=4",
                                "sampler.probe_tokens=2", "callbacks=none"))
    assert objects["trainer"].global_step == 1
    assert len(seen) == 1  # the one training step; the validation pass (2 batches) observed nothing
    assert objects["sampler"].learning is True  # restored after validation


def test_kl_is_zero_against_the_initial_policy_then_grows(tiny_cfg, tmp_path):
    """beta > 0: the reference is a frozen copy of the initial policy, so the logged k3 KL is
    exactly 0 at the first step (policy = reference) and positive once the policy moved; the
    reference's weights equal a fresh model with the same seed at the end."""

    cfg = tiny_cfg(*DENSE, "model.beta=0.1", "model.lr=1e-2", "trainer.max_steps=3",
                   "callbacks=none")
    _, objects = train(cfg)
    kl = [float(row["train/kl"]) for row in read_metrics(tmp_path) if row.get("train/kl")]
    assert len(kl) == 3 and kl[0] == 0.0 and kl[1] > 0 and kl[2] > 0
    initial = tiny(seed=cfg.seed).model.state_dict()
    for name, value in objects["model"].reference().state_dict().items():
        assert torch.equal(value, initial[name]), name
