"""The run summary: one row per training run read back from what it logged, the report over
runs and sweeps, and the Hydra callback that writes it when a multirun ends.

    python train.py -m sampler=full,micro model.group_size=8       # writes <sweep>/summary.*
    python -m bench.report logs/train/multiruns/<a> logs/train/multiruns/<b> --out cmp/

One row per job (a run dir, or each job of a sweep dir): its overrides, status (a failed job's
one error line), steps done, the per-step means of `time/*` (sampling, reward, update, step),
decoding steps, steps over the lower bound, tokens/s, peak sampling memory and KV, the
predictor's MAE where there is one, the mean reward over the first and the last 5 steps and
the last validation accuracy. The values are read back from what the run logged: its
TensorBoard event files, or the CSV logger's metrics.csv. `summary.png` puts peak sampling
memory against decoding steps per step, one point per job, labelled by its overrides.

`SweepReport` is the Hydra callback (configs/train.yaml) that writes the report when a
multirun ends, and exits 1 when a job failed.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from common.tables import write_table

# (column, logged tag): per-step means of what the run logged
COLUMNS = [
    ("sampling s", "time/sampling_s"), ("reward s", "time/reward_s"),
    ("update s", "time/update_s"), ("step s", "time/step_s"),
    ("decoding steps", "sampling/decoding_steps"),
    ("steps / continuous", "sampling/total_over_continuous"),  # the same lengths refilled
    ("steps / LB", "sampling/steps_over_lb"),
    ("tokens/s", "sampling/tokens_per_s"), ("peak sampling GB", "memory/peak_sampling_gb"),
    ("KV peak GB", "memory/kv_peak_gb"), ("predictor MAE", "predictor/mae"),
    ("completion length", "train/completion_len_mean"),
]
WINDOW = 5  # steps averaged at the start and the end of a run for the reward


def job_dirs(path: Path) -> list[Path]:
    """A run dir itself, or the jobs of a sweep dir (folders holding .hydra/), in job order."""
    path = Path(path)
    if (path / ".hydra").is_dir():
        return [path]
    jobs = [d for d in path.iterdir() if d.is_dir() and (d / ".hydra").is_dir()] \
        if path.is_dir() else []
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit()
                                       else 0, d.name))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run logged: {tag: [(step, value), ...]} from its TensorBoard event
    files, else from the CSV logger's metrics.csv files."""
    series: dict[str, dict[int, float]] = {}
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        for folder in dict.fromkeys(e.parent for e in events):
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                for event in acc.Scalars(tag):
                    series.setdefault(tag, {})[event.step] = event.value
    else:
        for path in sorted(run_dir.rglob("metrics.csv")):
            with open(path) as handle:
                for row in csv.DictReader(handle):
                    step = int(float(row.get("step") or 0))
                    for tag, value in row.items():
                        if tag in ("step", "epoch") or value in ("", None):
                            continue
                        series.setdefault(tag, {})[step] = float(value)
    return {tag: sorted(values.items()) for tag, values in series.items()}


def overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else []
    # `ablation=<name>` picks the sweep itself: the same in every job, so not a label
    return ",".join(o for o in items or [] if not o.startswith(("hydra.", "ablation=")))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def job_row(run_dir: Path) -> dict[str, Any]:
    scalars = read_scalars(run_dir)
    error = run_dir / "error.txt"
    rewards = [v for _, v in scalars.get("train/reward", [])]
    row: dict[str, Any] = {"job": str(run_dir), "overrides": overrides(run_dir),
                           "status": "failed: " + error.read_text().strip().removeprefix(
                               "error: ") if error.is_file() else "ok",
                           "steps": len(rewards)}
    for column, tag in COLUMNS:
        row[column] = mean([v for _, v in scalars.get(tag, [])])
    row[f"reward first {WINDOW}"] = mean(rewards[:WINDOW])
    row[f"reward last {WINDOW}"] = mean(rewards[-WINDOW:])
    accuracy = scalars.get("val/accuracy", [])
    row["val accuracy (last)"] = accuracy[-1][1] if accuracy else float("nan")
    return row


HPARAMS = ("model.group_size", "data.batch_size", "model.max_new_tokens", "model.lr",
           "model.loss_type", "model.beta", "model.temperature", "sampler.micro_group_size",
           "sampler.mode", "sampler.schedule", "sampler.refill", "sampler.prompt_kv",
           "trainer.max_steps", "seed")


def hparams_of(cfg: Any) -> dict[str, Any]:
    """The settings a person sorts runs by in TensorBoard's HPARAMS tab: the config groups
    chosen, the main numbers, and every override of the command line."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from entry.run import override_key
    params: dict[str, Any] = {}
    task: list[str] = []
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        params.update({g: choices[g] for g in ("policy", "sampler", "data", "predictor",
                                               "experiment") if choices.get(g)})
        task = list(HydraConfig.get().overrides.task)
    keys = list(HPARAMS) + [override_key(o) for o in task if "=" in o]
    for key in dict.fromkeys(keys):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and key not in params:
            params[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return params


def log_run_summary(cfg: Any, loggers: list[Any]) -> dict[str, float]:
    """At the end of a run: its report row, read back from what it logged, as the final
    metrics of TensorBoard's HPARAMS tab (tags `summary/*`)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    tensorboards = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    for logger in tensorboards:
        logger.experiment.flush()
    row = job_row(Path(cfg.paths.output_dir))
    metrics = {f"summary/{k.replace(' ', '_').replace('/', '_per_')}": float(v)
               for k, v in row.items() if isinstance(v, (int, float)) and not
               (isinstance(v, float) and math.isnan(v))}
    for logger in tensorboards:
        logger.log_hyperparams(hparams_of(cfg), metrics)
        logger.experiment.flush()
    return metrics


def write_summary(rows: list[dict[str, Any]], out: Path, title: str = "") -> str:
    """summary.csv, summary.md (returned; without the job folder) and summary.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    text = write_table(rows, out / "summary", f"# {title}" if title else "", hide=("job",),
                       nan="")
    plot(rows, out / "summary.png")
    return text


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak sampling memory against decoding steps per step, one labelled point per job."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["decoding steps"], r["peak sampling GB"]
        if isinstance(x, float) and isinstance(y, float) and not (math.isnan(x) or
                                                                  math.isnan(y)):
            ax.scatter([x], [y])
            ax.annotate(r["overrides"] or Path(r["job"]).name, (x, y), fontsize="x-small",
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decoding steps per training step (mean)")
    ax.set_ylabel("peak sampling memory, GB (mean)")
    ax.set_title("memory / decoding-steps trade-off, one point per job", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(dirs: list[Path], out: Path, title: str = "") -> tuple[list[dict], str]:
    jobs = [job for d in dirs for job in job_dirs(Path(d))]
    if not jobs:
        raise ValueError(f"no run found in {', '.join(map(str, dirs))}: give run dirs or sweep "
                         "dirs of train.py (folders with .hydra/)")
    rows = [job_row(job) for job in jobs]
    return rows, write_summary(rows, out, title)


class SweepReport(Callback):
    """Writes <sweep dir>/summary.{md,csv,png} when a multirun ends; exits 1 if a job failed."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from entry.run import SWEPT_KEYS, swept_keys
        SWEPT_KEYS.clear()
        SWEPT_KEYS.update(swept_keys(config.hydra))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not job_dirs(sweep):
            return
        rows, text = report([sweep], sweep, f"Sweep {sweep}")
        print(f"\n{text}\nsweep summary: {sweep / 'summary.md'} (and .csv, .png)", flush=True)
        failed = [r for r in rows if r["status"] != "ok"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed", file=sys.stderr, flush=True)
            raise SystemExit(1)
