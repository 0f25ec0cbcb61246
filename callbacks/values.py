"""Value orientation during GRPO: does training shift the policy's values?

At setup, every configured instrument (values/instruments.py; forward-only ones by default)
is put through its positive control on the initial policy: persona prompts of each pole
must move it the intended way with a 95% interval excluding 0 (or the gate is read from a
locate_values.py run's control.json). Then, every `every_n_steps` steps (and before the
first), the instruments that passed are scored with the policy's current weights and logged
as `values/<instrument>/<dimension>`: the mean score toward the dimension minus that of the
initial policy. Given `neurons` (a locate_values.py run dir), it also logs
`values/neuron_activation/<dimension>`: the mean activation probability of the dimension's
neurons over the response tokens of the step's own rollouts.

By default only the first `dilemmas_per_axis` (16) held-out dilemmas of each axis are scored,
which keeps the monitor to seconds per log on a CPU.

    python train.py callbacks.value_monitor.every_n_steps=5 \
        callbacks.value_monitor.neurons=logs/locate_values/runs/<date>
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from values.data import AXES, AXIS_OF, load_value_data, toward
from values.effects import bootstrap_effect, control_passes, mean_effect
from values.location import response_statistics, sequences
from values.instruments import DilemmaMargin, Instrument, Subject
from values.neurons import DIMENSIONS, ActivationStats, ValueNeurons


class ValueMonitor(pl.Callback):
    def __init__(self, every_n_steps: int = 10, neurons: str | None = None,
                 data_path: str | None = None, instruments: dict | None = None,
                 control: str | None = None, personas: int = 1, bootstrap: int = 500,
                 dilemmas_per_axis: int | None = 16, max_rollouts: int = 16) -> None:
        if every_n_steps < 1:
            raise ValueError(f"value_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        if personas < 1:
            raise ValueError(f"value_monitor.personas must be >= 1, got {personas}")
        if dilemmas_per_axis is not None and dilemmas_per_axis < 1:
            raise ValueError("value_monitor.dilemmas_per_axis must be >= 1 or null (all), got "
                             f"{dilemmas_per_axis}")
        self.dilemmas_per_axis = dilemmas_per_axis
        self.every, self.neurons_dir, self.data_path = every_n_steps, neurons, data_path
        self.instruments: list[Instrument] = list((instruments or {}).values()) or \
            [DilemmaMargin()]
        self.control, self.personas, self.boot = control, personas, bootstrap
        self.max_rollouts = max_rollouts
        self.neurons: dict[str, ValueNeurons] = {}
        self.passed: dict[str, list[str]] = {}  # instrument -> dimensions it passed
        self.base: dict[tuple[str, str], torch.Tensor] = {}
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.data = load_value_data(self.data_path)
        if self.dilemmas_per_axis:  # the first dilemmas of each axis: a cheaper monitor
            keep = {q for axis in AXES for q in list(dict.fromkeys(
                r["question"] for r in self.data.answer_rows
                if r["axis"] == axis))[: self.dilemmas_per_axis]}
            self.data = dataclasses.replace(self.data, answer_rows=[
                r for r in self.data.answer_rows if r["question"] in keep])
        if self.neurons_dir:
            folder = Path(self.neurons_dir)
            found = {d: folder / f"neurons_{d}.json" for d in DIMENSIONS}
            if not any(p.exists() for p in found.values()):
                raise FileNotFoundError(f"value_monitor.neurons={self.neurons_dir!r} has no "
                                        "neurons_<dimension>.json (run locate_values.py)")
            self.neurons = {d: ValueNeurons.load(p, pl_module.policy)
                            for d, p in found.items() if p.exists()}
        if self.control:
            path = Path(self.control)
            if not path.is_file():
                raise FileNotFoundError(f"value_monitor.control={self.control!r} is not a "
                                        "control.json written by locate_values.py")
            self.gate = json.loads(path.read_text())
        else:
            self.gate = None

    def _subject(self, pl_module: Any) -> Subject:
        return Subject(_Policy(pl_module), pl_module.sampler, self.data)

    @torch.no_grad()
    def _scores(self, pl_module: Any, persona_gate: bool) -> dict[str, float]:
        model = pl_module.policy
        was_training = model.training
        model.eval()
        subject = self._subject(pl_module)
        metrics = {}
        try:
            for inst in self.instruments:
                inst.reset()  # the weights changed since the last call
                for axis in AXES:
                    signs = inst.signs(subject, axis)
                    score = inst.score(subject, axis, None, None)
                    if persona_gate:
                        self.base[(inst.name, axis)] = score
                        self._gate(subject, inst, axis, score, signs)
                    change = score - self.base[(inst.name, axis)]
                    for dim in self.passed.get(inst.name, []):
                        if AXIS_OF[dim] == axis:
                            metrics[f"values/{inst.name}/{dim}"] = \
                                toward(dim) * mean_effect(change, signs)
        finally:
            model.train(was_training)
        return metrics

    def _gate(self, subject: Subject, inst: Instrument, axis: str, base: torch.Tensor,
              signs: torch.Tensor) -> None:
        for dim in AXES[axis]:
            if self.gate is not None:
                ok = bool(self.gate.get(dim, {}).get(inst.name, False))
            else:
                persona = torch.stack([inst.score(subject, axis, p, None) for p in
                                       self.data.personas(dim)[:self.personas]]).mean(0)
                ok = control_passes(bootstrap_effect(persona - base, signs,
                                                     self.boot).toward(toward(dim)))
            if ok:
                self.passed.setdefault(inst.name, []).append(dim)

    @torch.no_grad()
    def neuron_activation(self, pl_module: Any, batch: dict) -> dict[str, float]:
        rollouts = pl_module.last_rollouts
        if not self.neurons or rollouts is None:
            return {}
        ids, mask = sequences(batch["prompt_ids"], rollouts,
                              pl_module.tokenizer.pad_token_id or 0, self.max_rollouts)
        model = pl_module.policy
        was_training = model.training
        model.eval()
        try:
            prob = response_statistics(model, ids, mask, ActivationStats.for_model(model)
                                       ).compute().prob.cpu()
        finally:
            model.train(was_training)
        return {f"values/neuron_activation/{d}": float(prob[n.layer, n.index].mean())
                for d, n in self.neurons.items() if len(n)}

    def _log(self, pl_module: Any, metrics: dict[str, float]) -> None:
        self.last.update(metrics)
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=pl_module.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.base:  # the initial policy: the gate and the baseline
            self._log(pl_module, self._scores(pl_module, persona_gate=True))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every:
            return
        metrics = {**self._scores(pl_module, persona_gate=False),
                   **self.neuron_activation(pl_module, batch)}
        self._log(pl_module, metrics)
        if metrics:
            pl_module.log_dict({k: torch.tensor(v, dtype=torch.float32)
                                for k, v in metrics.items()}, on_step=True,
                               on_epoch=False, logger=False,
                               batch_size=len(batch["prompt_ids"]))


class _Policy:
    """What `Subject` reads of a policy, from the GRPO module."""

    def __init__(self, pl_module: Any) -> None:
        self.model, self.tokenizer = pl_module.policy, pl_module.tokenizer
        self.eos_token_ids = pl_module.eos_token_ids
