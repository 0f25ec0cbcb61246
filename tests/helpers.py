"""What the tests share (no test module imports another): tiny seeded models, prompts and a
spec, the Hydra config of any entry point, an entry point run as a user runs it, and the
test-only reward functions that configs name (`tests.helpers.char_fraction_reward`)."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

from modules.parallel import full_tensor
from common.compat import cache_keyword, output_cache
from samplers.base import GenerationSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

# prompts of 7, 2, 4 and 9 tokens and a sampled spec whose completions vary in length
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
SPEC = GenerationSpec(max_new_tokens=20, temperature=1.0, eos_token_ids=(3, 5, 7), seed=11)

# prompts of 41, 2, 17 and 5 tokens: rows of long and short prompts decode side by side
MIXED_PROMPTS = [[(7 * k) % 40 + 1 for k in range(41)], [9, 8], list(range(10, 27)),
                 [20, 21, 4, 5, 6]]
MIXED_SPEC = GenerationSpec(max_new_tokens=16, temperature=1.0, eos_token_ids=(3, 5, 7), seed=5)

# A whole GRPO run in a few seconds: random-init tiny policy, easy arithmetic prompts.
TINY = [
    "policy=tiny", "data=arithmetic", "data.source.size=64", "data.val_size=4",
    "data.batch_size=2", "data.val_batch_size=2", "model.group_size=4",
    "model.max_new_tokens=8", "model.update_micro_batch=4", "trainer.accelerator=cpu",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
]

# train.py overrides: a dense, learnable reward (the digit fraction) ...
DIGITS = ["+model.rewards.digits.fn._target_=tests.helpers.char_fraction_reward",
          "+model.rewards.digits.fn._partial_=true", "+model.rewards.digits.weight=1.0"]
# ... as the only reward
DENSE = [*DIGITS, "~model.rewards.gsm8k", "~model.rewards.format", "model.accuracy_reward=null"]


def completions(r: Any) -> list[list[int]]:
    """Each rollout's completion ids, cut at its length."""
    return [r.completion_ids[k, : r.lengths[k]].tolist() for k in range(len(r))]


def compose_entry(config: str, overrides: Sequence[str],
                  output_dir: Path | None = None) -> DictConfig:
    """The config `python <entry point> <overrides>` would see (config: "train",
    "locate_values", "train_predictor", "bench"), writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(f"{config}.yaml", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            if config != "locate_values":  # its cache_dir follows root_dir, not log_dir
                cfg.paths.log_dir = str(output_dir)
    return cfg


def run_entry(*args: str, timeout: float = 300, check: bool = False
              ) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root as a user runs it: stdout and stderr merged
    into `.stdout`, as a terminal shows them; with `check`, a failure shows its last lines."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV logger (logger=csv)."""
    with open(output_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def char_fraction_reward(completions: list[str], chars: str = "0123456789",
                         **batch: Any) -> list[float]:
    """Fraction of characters that are in `chars` (digits): trivially learnable by a tiny
    random policy, and dense enough (~10% at random init) that groups have reward variance."""
    return [sum(ch in chars for ch in c) / max(1, len(c)) for c in completions]


def raising_reward(completions: list[str], **batch: Any) -> list[float]:
    raise RuntimeError("scorer crashed")


def nan_reward(completions: list[str], **batch: Any) -> list[float]:
    return [math.nan for _ in completions]


def sampler_of(name: str, *args: Any, **overrides: Any) -> Any:
    """The sampler of configs/sampler/<name>.yaml (its settings' one default, with the
    default predictor), `args` and `overrides` replacing its settings in their order."""
    import inspect

    import hydra
    from omegaconf import OmegaConf

    from bench.core import sampler_config

    settings = OmegaConf.to_container(sampler_config(name), resolve=True)
    cls = hydra.utils.get_class(settings.pop("_target_"))
    names = list(inspect.signature(cls).parameters)
    settings.update(zip(names, args), **overrides)
    if isinstance(settings.get("predictor"), dict):  # the config's, not one the test passed
        settings["predictor"] = hydra.utils.instantiate(settings["predictor"])
    return cls(**settings)  # called directly: a bad setting raises its own ValueError


def full_sampler(*args: Any, **overrides: Any) -> Any:
    return sampler_of("full", *args, **overrides)


def micro_sampler(*args: Any, **overrides: Any) -> Any:
    return sampler_of("micro", *args, **overrides)


def continuous_sampler(*args: Any, **overrides: Any) -> Any:
    return sampler_of("continuous", *args, **overrides)


def infinite_sampler(*args: Any, **overrides: Any) -> Any:
    return sampler_of("infinite", *args, **overrides)


def hf_generate_sampler(*args: Any, **overrides: Any) -> Any:
    return sampler_of("hf_generate", *args, **overrides)


FAMILIES = {"llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_lm(family: str = "llama", vocab_size: int = 48, attn: str = "sdpa",
            dtype: torch.dtype = torch.float64, seed: int = 0, max_positions: int = 256,
            **config_overrides: Any) -> Any:
    """A 2-layer random-init causal LM of the given family, in eval mode; `config_overrides`
    go to its config (e.g. sliding_window=5)."""
    config = FAMILIES[family](
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
        head_dim=8, tie_word_embeddings=True, **config_overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def past(model: Any, out: Any) -> dict[str, Any]:
    """The keyword argument that feeds `out`'s KV cache to the next forward of `model`
    (`cache` where transformers has it; `past_key_values` is deprecated there)."""
    return {cache_keyword(model): output_cache(out)}


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose completions have hand-made lengths, for scheduling tests.

    A prompt's first token is the completion length L (EOS included): the model emits the
    filler token until it has produced L - 1 tokens, then EOS. It keeps what it needs in its
    KV cache like a real model (key[..., 0] = token, key[..., 1] = 1 for completion tokens), so
    it runs through the decode engine's slot cache, masks and refills unchanged. With
    group_size = 1 every sample's length is chosen by its prompt.
    """

    EOS, FILLER, VOCAB = 1, 2, 8

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.config = LlamaConfig(vocab_size=self.VOCAB, hidden_size=2, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                                  max_position_embeddings=4096)

    def forward(self, input_ids, position_ids, past_key_values=None, attention_mask=None,
                output_hidden_states=False, **kwargs):
        past_key_values = kwargs.pop("cache", past_key_values)
        from types import SimpleNamespace

        n, t = input_ids.shape
        # the engine's prefill passes an empty DynamicCache; its decode steps a SlotCache
        decoding = past_key_values is not None and hasattr(past_key_values, "write_cols")
        key = torch.stack([input_ids.double(), torch.full_like(input_ids, int(decoding),
                                                               dtype=torch.float64)], -1)
        key = key[:, None] * self.scale  # [n, 1 head, t, 2]
        if decoding:
            keys, _ = past_key_values.update(key, key, 0)  # [n, 1, W, 2]
            valid = attention_mask[:, 0, 0, :] == 0  # [n, W]
            fed = (keys[:, 0, :, 1] * valid).sum(-1)  # completion tokens fed so far
            shared = kwargs.get("shared_prefix")
            if shared is None:  # prompt_kv=copied: the prompt's KV leads every row
                target = keys[:, 0, 0, 0]  # [n]: L, from the prompt's first token
            else:  # prompt_kv=shared: rows hold completion KV, the prompts are apart
                target = torch.zeros(n, dtype=torch.float64)
                for i, rows in shared.groups:
                    target[rows] = shared.keys[i][0][0, 0, 0]
        else:
            cache = SimpleNamespace(layers=[SimpleNamespace(keys=key, values=key)])
            fed, target = torch.zeros(n, dtype=torch.float64), input_ids[:, 0].double()
        token = torch.where(fed >= target - 1, self.EOS, self.FILLER)  # next token [n]
        logits = torch.full((n, 1, self.VOCAB), -1e4, dtype=torch.float64)
        logits.scatter_(2, token.long().view(n, 1, 1), 0.0)
        hidden = torch.stack([target, fed], -1)[:, None]  # [n, 1, 2]
        return SimpleNamespace(logits=logits, past_key_values=None if decoding else cache,
                               hidden_states=(hidden,) if output_hidden_states else None)


class GradRecorder:
    """Lightning callback (by duck typing, added with `+callbacks.grads._target_=...`) that
    keeps a copy of every policy gradient just before each optimizer step."""

    def __new__(cls, *args, **kwargs):
        import lightning.pytorch as pl

        class _Recorder(pl.Callback):
            def __init__(self) -> None:
                self.grads: list[dict[str, torch.Tensor]] = []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
                self.grads.append({n: p.grad.detach().clone()
                                   for n, p in pl_module.policy.named_parameters()
                                   if p.grad is not None})

        return _Recorder()


class GradDump:
    """Lightning callback that saves the policy gradients of the first optimizer step to
    `<dirpath>/grads_rank<r>.pt` (for runs in another process, such as DDP ranks)."""

    def __new__(cls, dirpath: str):
        import lightning.pytorch as pl

        class _Dump(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
                if trainer.global_step == 0:
                    grads = {n: full_tensor(p.grad.detach()).cpu().clone()  # FSDP: gathered
                             for n, p in pl_module.policy.named_parameters()
                             if p.grad is not None}
                    torch.save(grads, f"{dirpath}/grads_rank{trainer.global_rank}.pt")

        return _Dump()


class ClipRecorder:
    """Lightning callback that keeps the total gradient norm of every optimizer step twice:
    as `on_before_optimizer_step` sees it (callback hooks run before the module's, so before
    its clip) and after the step (the gradients stay until the next step's zero_grad); and
    the device type of the weights during each step (Lightning moves them back to the CPU
    when `fit` ends)."""

    def __new__(cls, *args, **kwargs):
        import lightning.pytorch as pl

        def norm(module) -> float:
            grads = [p.grad.detach().double() for p in module.policy.parameters()
                     if p.grad is not None]
            return float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])))

        class _Recorder(pl.Callback):
            def __init__(self) -> None:
                self.before: list[float] = []
                self.after: list[float] = []
                self.devices: list[str] = []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
                self.before.append(norm(pl_module))

            def on_train_batch_end(self, trainer, pl_module, *args) -> None:
                self.after.append(norm(pl_module))
                self.devices.append(next(pl_module.policy.parameters()).device.type)

        return _Recorder()


class PromptSeededSampler:
    """Samples each prompt's group with a seed taken from the prompt's tokens, so that the
    rollouts of a prompt do not depend on the rank, batch or position it was sampled in (the
    DDP test compares two ranks with one process on the same prompts). Built from a `full`
    config (`sampler._target_=tests.helpers.PromptSeededSampler`)."""

    predictor = None
    learning = True

    def __init__(self, prompt_kv: str, gather_weights: bool) -> None:
        from samplers.full import FullSampler

        self.inner = FullSampler(prompt_kv, gather_weights)
        self.settings, self.gather_weights = self.inner.settings, gather_weights

    def bind(self, tokenizer: Any) -> None:
        """Nothing to bind."""

    def sample(self, model, prompts, group_size, spec):
        import dataclasses
        import zlib

        from samplers.base import pack_rollouts

        completions, finished = [], []
        for prompt in prompts:
            seed = zlib.crc32(bytes(str(prompt), "ascii"))
            part = self.inner.sample(model, [prompt], group_size,
                                     dataclasses.replace(spec, seed=seed))
            for ids, n, done in zip(part.completion_ids, part.lengths, part.finished):
                completions.append(ids[:n].tolist())
                finished.append(bool(done))
        return pack_rollouts(completions, finished, len(prompts), group_size, part.stats)


class RolloutDump:
    """Lightning callback that saves, per rank, each prompt's completions from the training
    steps (sampled) and the validation steps (greedy) to `<dirpath>/rollouts_rank<r>.pt` as
    {"train": {(step, prompt tokens): [completion tokens...]}, "val": {...}}."""

    def __new__(cls, dirpath: str):
        import lightning.pytorch as pl

        def by_prompt(record, step):
            rollouts, out = record.rollouts, {}
            for ids, n, owner in zip(rollouts.completion_ids, rollouts.lengths,
                                     rollouts.prompt_index.tolist()):
                key = (step, tuple(record.prompts[owner]))
                out.setdefault(key, []).append(ids[:n].tolist())
            return out

        class _Dump(pl.Callback):
            def __init__(self) -> None:
                self.seen = {"train": {}, "val": {}}

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.seen["train"].update(by_prompt(pl_module.last_step, trainer.global_step))

            def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                        dataloader_idx=0):
                self.seen["val"].update(by_prompt(pl_module.last_validation,
                                                  trainer.global_step))

            def on_fit_end(self, trainer, pl_module) -> None:
                torch.save(self.seen, f"{dirpath}/rollouts_rank{trainer.global_rank}.pt")

        return _Dump()


class ForwardCounter:
    """Counts a model's forwards by their input width, from a forward pre-hook (independent
    of any sampler's own counters): forwards over more than one token per row consume prompt
    tokens; `prompt_tokens` sums the non-padding prompt tokens they were given.

        with ForwardCounter(model) as seen:
            sampler.sample(model, prompts, 4, spec)
        assert seen.prefills == len(prompts)
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.widths, self.prompt_tokens = model, [], 0

    def _record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(int(ids.shape[1]))
        if ids.shape[1] > 1:
            mask = kwargs.get("attention_mask")
            real = ids.numel() if mask is None or mask.dim() != 2 else int(mask.sum())
            self.prompt_tokens += real

    @property
    def prefills(self) -> int:
        return sum(1 for w in self.widths if w > 1)

    def __enter__(self) -> "ForwardCounter":
        self.handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- a planted neuron
# (the value-neuron tests: one neuron of a tiny model that fires on one pole's tokens only)

POLE_A, POLE_B = list(range(4, 24)), list(range(24, 44))
PLANTED = 17  # neuron of layer 0


def planted_model() -> torch.nn.Module:
    """Layer 0's attention is switched off, embedding feature 0 is +3 on POLE_A tokens and -3
    on POLE_B tokens, and neuron PLANTED of layer 0 reads only feature 0: it fires on A, not B.
    No other neuron reads feature 0, and PLANTED writes nothing downstream."""
    model = tiny_lm(vocab_size=48, seed=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[POLE_A, 0], emb[POLE_B, 0] = 3.0, -3.0
        gate = model.model.layers[0].mlp.gate_proj.weight
        gate[:, 0] = 0.0
        gate[PLANTED] = 0.0
        gate[PLANTED, 0] = 4.0
        model.model.layers[0].mlp.down_proj.weight[:, PLANTED] = 0.0  # nothing downstream
        model.model.layers[1].mlp.gate_proj.weight[:, 0] = 0.0  # feature 0 is read only there
    return model


def pole_batch(tokens: list[int], seed: int, rows: int = 6, width: int = 12):
    """Random sequences: a 4-token 'prompt' from the whole vocab, then pole tokens as the
    'response' (the only tokens counted)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 48, (rows, width), generator=gen)
    pick = torch.tensor(tokens)[torch.randint(len(tokens), (rows, width - 4), generator=gen)]
    ids[:, 4:] = pick
    mask = torch.zeros(rows, width, dtype=torch.bool)
    mask[:, 4:] = True
    return ids, mask


def hooked_acts(model, ids) -> list[torch.Tensor]:
    """Every layer's act_fn output by plain forward hooks (independent of the module)."""
    from values.neurons import gated_mlps

    out = []
    hooks = [mlp.act_fn.register_forward_hook(lambda m, i, o: out.append(o.detach()))
             for mlp in gated_mlps(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return out
