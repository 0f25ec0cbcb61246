"""Tests for `callbacks/predictor.py`: hand-computed predictor metrics and the logging callback.

Run: `python -m pytest -q tests/test_predictor_callback.py`
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.predictor import PredictorMetricsLogger, predictor_metrics, scatter_figure
from samplers.base import PredictorRecord, Rollouts, SamplingStats

KEYS = {"predictor/mae", "predictor/smape", "predictor/kendall_tau", "predictor/acc_within_10",
        "predictor/n"}

# |p - t| = 2, 0, 15, 20; pairs: 5 concordant, 1 discordant (samples 3 and 4)
PREDICTED = torch.tensor([10.0, 20.0, 30.0, 60.0])
TRUE = torch.tensor([12, 20, 45, 40])


def test_metrics_match_hand_computed_values() -> None:
    m = predictor_metrics(PREDICTED, TRUE)
    assert set(m) == KEYS
    assert m["predictor/mae"] == pytest.approx(37 / 4)
    smape = (2 * 2 / 22 + 0 + 2 * 15 / 75 + 2 * 20 / 100) / 4  # a fraction in [0, 2]
    assert m["predictor/smape"] == pytest.approx(smape, rel=1e-5)
    assert m["predictor/kendall_tau"] == pytest.approx((5 - 1) / 6)
    assert m["predictor/acc_within_10"] == pytest.approx(2 / 4)
    assert m["predictor/n"] == 4.0


def test_kendall_tau_is_one_when_ordered_and_minus_one_when_reversed() -> None:
    true = torch.tensor([5, 50, 100, 300])
    ordered = predictor_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), true)
    reversed_ = predictor_metrics(torch.tensor([4.0, 3.0, 2.0, 1.0]), true)
    assert ordered["predictor/kendall_tau"] == pytest.approx(1.0)
    assert reversed_["predictor/kendall_tau"] == pytest.approx(-1.0)


def test_smape_extremes_and_within_boundary() -> None:
    exact = predictor_metrics(torch.tensor([0.0, 7.0]), torch.tensor([0, 7]))
    assert exact["predictor/smape"] == 0.0 and exact["predictor/mae"] == 0.0
    worst = predictor_metrics(torch.tensor([0.0, 9.0]), torch.tensor([5, 0]))
    assert worst["predictor/smape"] == pytest.approx(2.0)
    edge = predictor_metrics(torch.tensor([10.0, 10.0]), torch.tensor([0, 21]), within=10.0)
    assert edge["predictor/acc_within_10"] == 0.5  # |diff| = 10 counts, 11 does not


def test_degenerate_inputs_give_nan_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    empty = predictor_metrics(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert set(empty) == KEYS and empty["predictor/n"] == 0.0
    assert all(math.isnan(v) for k, v in empty.items() if k != "predictor/n")
    one = predictor_metrics(torch.tensor([3.0]), torch.tensor([5]))
    assert one["predictor/mae"] == 2.0 and math.isnan(one["predictor/kendall_tau"])
    constant = predictor_metrics(torch.tensor([4.0, 4.0, 4.0]), torch.tensor([1, 2, 3]))
    assert math.isnan(constant["predictor/kendall_tau"])
    assert len(recwarn) == 0


def test_scatter_figure_has_labels_and_stats_in_title() -> None:
    fig = scatter_figure(PREDICTED, TRUE, "history")
    ax = fig.axes[0]
    assert "tokens" in ax.get_xlabel() and "tokens" in ax.get_ylabel()
    assert "MAE 9.2" in ax.get_title() and "τ 0.67" in ax.get_title()
    fig.clf()


# ----------------------------------------------------------------------------- callback


def _rollouts(fields: dict[str, Any]) -> Rollouts:
    stats = SamplingStats(decoding_steps=5, prefill_passes=1, prefill_tokens=3,
                          generated_tokens=8, peak_kv_bytes=0, max_concurrency=2,
                          wall_time_s=0.1, **fields)
    return Rollouts(prompt_index=torch.zeros(2, dtype=torch.long), sample_index=torch.arange(2),
                    completion_ids=torch.zeros(2, 4, dtype=torch.long),
                    completion_mask=torch.ones(2, 4, dtype=torch.bool),
                    lengths=torch.full((2,), 4), finished=torch.ones(2, dtype=torch.bool),
                    stats=stats)


def _record(predicted: torch.Tensor, true: torch.Tensor) -> PredictorRecord:
    return PredictorRecord("history", 8, predicted, true)


def _fake(fields: dict[str, Any], step: int, loggers: list[Any]) -> tuple[Any, Any]:
    calls: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    module = SimpleNamespace(last_rollouts=_rollouts(fields), calls=calls,
                             log_dict=lambda metrics, **kw: calls.append((metrics, kw)))
    return SimpleNamespace(global_step=step, loggers=loggers), module


def _scatter_steps(logger: TensorBoardLogger) -> list[int]:
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    if "predictor/scatter" not in events.Tags()["images"]:
        return []
    return [image.step for image in events.Images("predictor/scatter")]


def test_callback_logs_metrics_and_scatter(tmp_path: Path) -> None:
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    loggers = [CSVLogger(save_dir=tmp_path, name="csv"), tb]  # non-TB loggers are skipped
    callback = PredictorMetricsLogger(scatter_every_n_steps=10)
    for step in (3, 4, 10):  # first call, off-cadence, on-cadence
        trainer, module = _fake({"predictor": _record(PREDICTED, TRUE)}, step, loggers)
        callback.on_train_batch_end(trainer, module, None, None, 0)
        ((metrics, kwargs),) = module.calls
        assert set(metrics) == KEYS
        assert kwargs == {"on_step": True, "on_epoch": False, "batch_size": 4}
    assert callback.last["predictor/mae"] == pytest.approx(37 / 4)
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))
    assert _scatter_steps(tb) == [3, 10]


def test_callback_logs_nothing_without_predictor_or_with_n_zero(tmp_path: Path) -> None:
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    callback = PredictorMetricsLogger()
    empty = _record(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    for fields in ({}, {"slots": 2}, {"predictor": empty}):
        trainer, module = _fake(fields, 0, [tb])
        callback.on_train_batch_end(trainer, module, None, None, 0)
        assert module.calls == []
    trainer, module = _fake({}, 0, [tb])
    module.last_rollouts = None
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.calls == [] and callback.last == {} and _scatter_steps(tb) == []


def test_callback_leaves_out_undefined_tau_for_one_sample() -> None:
    trainer, module = _fake({"predictor": _record(torch.tensor([3.0]), torch.tensor([5]))}, 0, [])
    callback = PredictorMetricsLogger()
    callback.on_train_batch_end(trainer, module, None, None, 0)
    ((metrics, kwargs),) = module.calls
    assert set(metrics) == KEYS - {"predictor/kendall_tau"} and kwargs["batch_size"] == 1
    with pytest.raises(ValueError, match="scatter_every_n_steps"):
        PredictorMetricsLogger(scatter_every_n_steps=0)
