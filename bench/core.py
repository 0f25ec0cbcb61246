"""What every bench table shares: samplers and predictors built from their config groups, the
`Bench` (model, prompts, spec, `measure`) and the writers of Markdown, CSV and PNG outputs.

    from bench.core import make_sampler
    sampler = make_sampler("continuous", micro_group_size=4)   # configs/sampler/continuous.yaml

Memory is measured, not predicted: CUDA `max_memory_allocated` above the start, CPU peak RSS
above the start (sampled every 2 ms); `kv_gb` is the sampler's own KV tensors; `floor_gb` is the
analytical minimum of the engine samplers (KV of m slots + prompt KV + logits buffers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from common.units import GB
from callbacks.memory import PeakMemory
from callbacks.plots import gantt_figure
from callbacks.sampling import sampling_metrics
from modules.rewards import gsm8k_reward
from samplers.prediction import LengthPredictor
from samplers.base import GenerationSpec, Sampler, SlotSpan
from samplers.memory import predict_peak_bytes

log = logging.getLogger("bench")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# `infinite` reads its predictor from the top-level `predictor` group (`${predictor}`); a sampler
# is composed with training's default choice, and make_sampler(..., predictor=<object>) swaps it
DEFAULT_PREDICTOR = "history"

Row = dict[str, Any]  # one line of a table: column -> value (None = empty cell)


# ----------------------------------------------------------------------------- config groups


def compose(overrides: list[str]) -> DictConfig:
    """The configs/ groups named by `overrides` (`+group=name`), composed by Hydra.

    Inside `@hydra.main` (`python -m bench`) the global Hydra is initialised with configs/ on
    its search path and `hydra.compose` uses it; elsewhere (tests, a notebook) configs/ is
    initialised for this one call.
    """
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(overrides=overrides)
    with hydra.initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra.compose(overrides=overrides)


def sampler_config(name: str) -> DictConfig:
    """`configs/sampler/<name>.yaml`, as `python train.py sampler=<name>` composes it."""
    return compose([f"+sampler={name}", f"+predictor={DEFAULT_PREDICTOR}"]).sampler


def has_slots(name: str) -> bool:
    """Whether sampler `name` decodes on m slots of its own (micro, continuous, infinite: its
    slot settings name m or `auto`); `full` takes one slot per sample of a group and
    `hf_generate` has no slots."""
    settings = make_sampler(name).settings
    return settings is not None and settings.micro_group_size is not None


def make_sampler(name: str, **overrides: Any) -> Sampler:
    """The sampler of `configs/sampler/<name>.yaml` with `overrides` replacing its settings
    (`micro_group_size=4`, `mode="dynamic"`, `predictor=<a LengthPredictor object>`, ...).

    A new `configs/sampler/foo.yaml` is available to every table by name, with no bench edit.
    """
    return hydra.utils.instantiate(sampler_config(name), **overrides)


def predictor_config(name: str) -> DictConfig:
    """`configs/predictor/<name>.yaml`, as `python train.py predictor=<name>` composes it."""
    return compose([f"+predictor={name}"]).predictor


def make_predictor(name: str, **overrides: Any) -> LengthPredictor:
    """A fresh length predictor of `configs/predictor/<name>.yaml`, `overrides` replacing its
    settings (`refit_steps=400`, ...)."""
    return hydra.utils.instantiate(predictor_config(name), **overrides)


# ----------------------------------------------------------------------------- tables


@dataclass
class Table:
    """What a table function returns; `python -m bench` writes it under `<out_dir>/<name>`."""
    rows: list[Row]  # the table: <stem>.{md,csv}
    groups: list[Row] = field(default_factory=list)  # per-group rows behind it: <stem>_groups.*
    plot: Callable[[list[Row], Path], None] | None = None  # a figure of the rows: <stem>.png


class Bench:
    """Model, prompts and spec shared by every measurement of one bench run."""

    cfg: DictConfig  # the composed configs/bench.yaml
    model: torch.nn.Module  # the policy's causal LM, in eval mode, on `device`
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    prompts: list[list[int]]  # token ids of the B = num_prompts prompts of the first batch
    answers: list[str | None]  # their gold answers (None for data without answers, e.g. chat)
    spec: GenerationSpec
    weight_bytes: int
    traces: dict[str, tuple[list[SlotSpan], int]]  # label -> (slot trace, decoding steps)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        policy = hydra.utils.instantiate(cfg.policy)
        self.model, self.tokenizer = policy.model.eval(), policy.tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        data = hydra.utils.instantiate(cfg.data, tokenizer=self.tokenizer,
                                       batch_size=cfg.num_prompts)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        self.prompts, self.answers = batch["prompt_ids"], batch["answer"]
        self.spec = GenerationSpec(cfg.max_new_tokens, temperature=cfg.temperature,
                                   eos_token_ids=policy.eos_token_ids, seed=cfg.seed)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.traces = {}
        # first-call costs (kernels, allocator) out of the first measurement
        make_sampler("full").sample(self.model, self.prompts[:1], 2, GenerationSpec(4))

    def measure(self, label: str, sampler: Sampler, group_size: int, slots: int | None = None,
                prompts: list[list[int]] | None = None, **extra: Any) -> Row:
        """One `sample()` call of `sampler` on `prompts` (the bench's by default) x group_size.

        `slots` is the m the sampler was built with (None: it decodes all G rows at once); it
        sizes the optional warm-up round. `extra` columns are appended to the row.
        """
        prompts = self.prompts if prompts is None else prompts
        if self.cfg.warmup:  # one round of the same shapes first: no first-call allocations
            sampler.sample(self.model, prompts[:1], min(group_size, slots or group_size),
                           self.spec)
        with PeakMemory(self.device) as meter:
            rollouts = sampler.sample(self.model, prompts, group_size, self.spec)
        stats, metrics = rollouts.stats, sampling_metrics(rollouts)  # what training logs
        m = stats.slots if stats.slots is not None else stats.max_concurrency
        row = dict(sampler=label, G=group_size, m=m, peak_gb=meter.peak_bytes / GB,
                   kv_gb=metrics["memory/kv_peak_gb"], avg_len=metrics["sampling/avg_length"],
                   steps=stats.decoding_steps, lb=int(metrics["sampling/steps_lower_bound"]),
                   wall_s=stats.wall_time_s, tok_s=metrics["sampling/tokens_per_s"],
                   decode_s=stats.wall_time_s - stats.prefill_time_s,
                   truncated=metrics["sampling/clipped_ratio"], **extra)
        if self.answers[0] is not None and prompts is self.prompts:
            texts = self.tokenizer.batch_decode(
                [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids, rollouts.lengths)],
                skip_special_tokens=True)
            owners = rollouts.prompt_index.tolist()
            row["reward"] = sum(gsm8k_reward(texts, [self.answers[p] for p in owners])) / len(texts)
        if stats.schedule is not None:  # infinite
            row.update(schedule=stats.schedule, parks=stats.parks)
        if "sampling/total_over_continuous" in metrics:
            row["over_continuous"] = metrics["sampling/total_over_continuous"]
        if stats.slot_trace:
            self.traces[f"{label} m={m}"] = (stats.slot_trace, stats.decoding_steps)
        log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        return row

    def floor_gb(self, slots: int, sampler: Sampler) -> float:
        """The engine's analytical peak above the weights on `slots` rows, in GiB, in the
        sampler's prompt-KV layout (`hf_generate`, which has none: the default layout's)."""
        settings = sampler.settings or make_sampler("full").settings
        peak = predict_peak_bytes(self.model, self.prompts, self.spec, slots, settings.layout)
        return (peak - self.weight_bytes) / GB


# ----------------------------------------------------------------------------- outputs


def plot_gantts(traces: dict[str, tuple[list[SlotSpan], int]], stem: Path) -> None:
    """One slot Gantt chart per measured engine run: <stem>_gantt_<label>.png."""
    import matplotlib.pyplot as plt

    for label, (trace, steps) in traces.items():
        fig = gantt_figure(trace, f"{label}: {steps} decoding steps")
        fig.savefig(f"{stem}_gantt_{label.replace(' ', '_').replace('=', '')}.png", dpi=90)
        plt.close(fig)
