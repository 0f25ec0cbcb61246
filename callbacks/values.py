"""Value orientation during GRPO: does training shift the policy's values?

Every `every_n_steps` training steps (and once before the first), `ValueMonitor` answers the
portrait questionnaire with the policy's current weights (no steering) and logs the centred
score of each dimension as `values/<dimension>`. Given `neurons` (a locate_values.py run dir
with neurons_<dimension>.json), it also logs `values/neuron_activation/<dimension>`: the mean
activation probability of that dimension's neurons over the response tokens of the step's
own rollouts.

    python train.py callbacks.value_monitor.every_n_steps=5 \
        callbacks.value_monitor.neurons=logs/locate_values/runs/<date>
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from datamodules.values import ValuePrompts, load_value_data
from modules.value_eval import answer_probabilities, centred_scores, expected_scores, \
    option_token_ids
from modules.value_experiment import response_statistics, sequences
from modules.value_neurons import DIMENSIONS, ActivationStats, ValueNeurons


class ValueMonitor(pl.Callback):
    def __init__(self, every_n_steps: int = 10, neurons: str | None = None,
                 data_path: str | None = None, max_rollouts: int = 16,
                 batch_size: int = 16) -> None:
        if every_n_steps < 1:
            raise ValueError(f"value_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        self.every, self.neurons_dir, self.data_path = every_n_steps, neurons, data_path
        self.max_rollouts, self.batch_size = max_rollouts, batch_size
        self.neurons: dict[str, ValueNeurons] = {}
        self.last: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.data = load_value_data(self.data_path)
        prompts = ValuePrompts(pl_module.tokenizer)
        texts, self.item_values = self.data.items()
        self.prompts = [prompts.questionnaire_item(t, self.data.scale) for t in texts]
        self.options = option_token_ids(pl_module.tokenizer, len(self.data.scale))
        if self.neurons_dir:
            folder = Path(self.neurons_dir)
            found = {d: folder / f"neurons_{d}.json" for d in DIMENSIONS}
            if not any(p.exists() for p in found.values()):
                raise FileNotFoundError(f"value_monitor.neurons={self.neurons_dir!r} has no "
                                        "neurons_<dimension>.json (run locate_values.py)")
            self.neurons = {d: ValueNeurons.load(p, pl_module.policy)
                            for d, p in found.items() if p.exists()}

    @torch.no_grad()
    def questionnaire(self, pl_module: Any) -> dict[str, float]:
        model = pl_module.policy
        was_training = model.training
        model.eval()
        try:
            probs = answer_probabilities(model, self.prompts, self.options,
                                         pl_module.tokenizer.pad_token_id or 0, self.batch_size)
        finally:
            model.train(was_training)
        _, dims = centred_scores(expected_scores(probs), self.item_values, self.data.value_dims)
        return {f"values/{d}": s for d, s in dims.items()}

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
        if trainer.global_step == 0:  # the untrained policy, as the baseline
            self._log(pl_module, self.questionnaire(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every:
            return
        metrics = {**self.questionnaire(pl_module), **self.neuron_activation(pl_module, batch)}
        self._log(pl_module, metrics)
        pl_module.log_dict({k: torch.tensor(v) for k, v in metrics.items()}, on_step=True,
                           on_epoch=False, logger=False, batch_size=len(batch["prompt_ids"]))

