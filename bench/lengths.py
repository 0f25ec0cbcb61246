"""Length-aware scheduling benchmarks: Tables C and D of docs/ARCHITECTURE.md section 8.

    python -m bench table=record data=chat num_prompts=16 max_new_tokens=512   # sample once
    python -m bench table=predictor data=chat max_new_tokens=512               # Table D
    python -m bench table=scheduler data=chat max_new_tokens=512               # Table C

`record` samples the first `heldout_prompts` prompts with G = group_size (the held-out groups)
and the rest with `record_group_size` (the predictors' training prompts), and saves both as
rollout files (`predictors/rollouts.py`). Table D fits each predictor on the training file for
every probe length k and scores it on the held-out samples (the samples the sampler would ask
about: L > k + 1). Table C schedules each held-out group on m slots: because every sample's
tokens do not depend on its schedule, the decoding steps of any admission order follow exactly
from the recorded lengths (`simulate_steps`, the engine's own list scheduling), so all
scheduler x predictor variants are computed on the same samples (predictions are clipped to
[0, max_new_tokens - k], as the sampler does). Each scheduler row is the `infinite` sampler
of configs/sampler/infinite.yaml with its `grouping` and `refill`, and its admission order is
the sampler's own `order()` (with `grouping: fptas`, the best of the FPTAS plan, the plain
refill order and LPT by predicted makespan; the `plan` column says which it took).
`real_runs` also runs micro, continuous and infinite on the first group to measure tokens/s
and check simulated = measured.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bench.core import Bench, Row, Table, make_predictor, make_sampler, predictor_config
from samplers.prediction import LengthPredictor
from predictors.metrics import predictor_metrics
from predictors.rollouts import examples, load_rollouts, save_rollouts
from samplers.infinite import InfiniteSampler
from samplers.scheduling import (list_schedule_makespan, rounds_steps, simulate_steps,
                                 steps_lower_bound)

SCHEDULERS = [("fifo", "none", "fifo"), ("fptas", "fptas", "fifo"), ("sjf", "none", "sjf"),
              ("lpt", "none", "lpt"), ("fptas+sjf", "fptas", "sjf"),
              ("fptas+lpt", "fptas", "lpt")]  # (label, grouping, refill)
ORACLE = "oracle (k=0)"  # the true remaining lengths as predictions, no probe

Records = dict[str, Any]  # one rollouts file (predictors/rollouts.py)


def rollout_files(cfg: DictConfig) -> dict[str, Path]:
    return {part: Path(f"{cfg.rollouts}_{part}.pt") for part in ("train", "heldout")}


def table_record(b: Bench) -> Table:
    """Sample the held-out groups and the predictors' training prompts; save both."""
    h = b.cfg.heldout_prompts
    if not 0 < h < len(b.prompts):
        raise ValueError(f"heldout_prompts must be in [1, num_prompts), got {h} with "
                         f"num_prompts={len(b.prompts)}")
    sampler = make_sampler("continuous", micro_group_size=b.cfg.record_slots)
    rows = []
    for part, prompts, g in (("heldout", b.prompts[:h], b.cfg.group_size),
                             ("train", b.prompts[h:], b.cfg.record_group_size)):
        path = rollout_files(b.cfg)[part]
        if path.is_file() and not b.cfg.overwrite:  # e.g. re-record only the training part
            if load_rollouts(path)["prompts"] != prompts:
                raise ValueError(f"{path} holds other prompts: pass overwrite=true")
            continue
        rollouts = sampler.sample(b.model, prompts, g, b.spec)
        save_rollouts(path, prompts, rollouts)
        lengths = sorted(rollouts.lengths.tolist())
        rows.append(dict(part=part, prompts=len(prompts), G=g, samples=len(lengths),
                         avg_len=sum(lengths) / len(lengths),
                         median_len=statistics.median(lengths),
                         p90_len=lengths[int(0.9 * (len(lengths) - 1))], max_len=lengths[-1],
                         truncated=float((~rollouts.finished).float().mean()),
                         wall_s=rollouts.stats.wall_time_s, file=str(path)))
    return Table(rows)


def load_files(cfg: DictConfig) -> dict[str, Records]:
    """Both rollouts files of `table=record`, checked against this run's max_new_tokens."""
    files = rollout_files(cfg)
    for path in files.values():
        if not path.is_file():
            raise ValueError(f"rollouts file {path} is missing: run `python -m bench "
                             f"table=record` with the same data and max_new_tokens first")
    records = {part: load_rollouts(path) for part, path in files.items()}
    longest = max(int(r["lengths"].max()) for r in records.values())
    if longest > cfg.max_new_tokens:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} is below the recorded "
                         f"lengths (up to {longest}): use the value the rollouts were made with")
    return records


def fit_predictor(b: Bench, name: str, k: int, train: Records) -> LengthPredictor:
    """A fresh predictor of config `name`, fitted on the training file at probe length k."""
    learned = "refit_steps" in predictor_config(name)  # a head: fit_steps steps on all of it
    predictor = make_predictor(name, **(dict(refit_steps=b.cfg.fit_steps, buffer_size=1 << 20)
                                        if learned else {}))
    predictor.bind(b.tokenizer)
    batch, remaining = examples(train, k, model=b.model, needs_hidden=predictor.needs_hidden)
    if not predictor.needs_oracle:
        predictor.observe(batch, remaining)
    return predictor


def predict(b: Bench, predictor: LengthPredictor, records: Records, k: int,
            prompts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) remaining lengths after k probe tokens of the samples with L > k + 1."""
    batch, remaining = examples(records, k, prompts, model=b.model,
                                needs_hidden=predictor.needs_hidden)
    limit = b.cfg.max_new_tokens - k  # as the sampler does: nothing has more tokens left
    return predictor.predict(batch).float().clamp(0, limit), remaining


def table_predictor(b: Bench) -> Table:
    """Table D: k x predictor, scored on the held-out samples."""
    records = load_files(b.cfg)
    rows = []
    for k in b.cfg.probe_sweep:
        _, train_remaining = examples(records["train"], k)
        for name in b.cfg.predictors:
            start = time.perf_counter()
            predictor = fit_predictor(b, name, k, records["train"])
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            predicted, true = predict(b, predictor, records["heldout"], k)
            per_sample_ms = 1e3 * (time.perf_counter() - start) / max(1, len(true))
            rows.append(dict(k=k, predictor=name, **metric_row(predicted, true),
                             train_n=len(train_remaining), fit_s=fit_s,
                             predict_ms_with_features=per_sample_ms))
        mean = float(train_remaining.float().mean()) if len(train_remaining) else 0.0
        _, true = examples(records["heldout"], k)
        rows.append(dict(k=k, predictor="constant (train mean)",
                         **metric_row(torch.full((len(true),), mean), true),
                         train_n=len(train_remaining)))
    return Table(rows)


def metric_row(predicted: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    return {key.split("/")[1]: value for key, value in predictor_metrics(predicted, true).items()}


def schedulers(cfg: DictConfig) -> dict[str, InfiniteSampler]:
    """One `infinite` sampler per SCHEDULERS row: configs/sampler/infinite.yaml with the row's
    grouping and refill (its predictor is unused: Table C hands it the predictions)."""
    built = {}
    for label, grouping, refill in SCHEDULERS:
        sampler = make_sampler("infinite", micro_group_size=cfg.micro_group_size,
                               grouping=grouping, refill=refill, epsilon=cfg.epsilon)
        if not isinstance(sampler, InfiniteSampler):
            raise ValueError("configs/sampler/infinite.yaml must build an InfiniteSampler "
                             f"(Table C calls its order()), got {type(sampler).__name__}")
        built[label] = sampler
    return built


def table_scheduler(b: Bench) -> Table:
    """Table C: every scheduler x {oracle, each learned predictor} on each held-out group
    (median rows in the Markdown, per-group rows in the `_groups` files), then real runs on
    group 0."""
    records, k, m = load_files(b.cfg), b.cfg.probe_tokens, b.cfg.micro_group_size
    held = records["heldout"]
    fitted = {name: fit_predictor(b, name, k, records["train"]) for name in b.cfg.predictors}
    orders = schedulers(b.cfg)
    per_group = []
    for i in range(len(held["prompts"])):
        lengths = held["lengths"][held["prompt_index"] == i].tolist()
        base = dict(group=i, avg_len=sum(lengths) / len(lengths),
                    capped=sum(n >= b.cfg.max_new_tokens for n in lengths) / len(lengths),
                    micro=rounds_steps(lengths, m),
                    continuous=list_schedule_makespan(lengths, m),
                    probe_steps=list_schedule_makespan([min(n, k + 1) for n in lengths], m)
                    if k else 0)
        predictions: dict[str, tuple[list[float] | None, int]] = {ORACLE: (None, 0)}
        for name, predictor in fitted.items():
            predictions[name] = (predict(b, predictor, held, k, [i])[0].tolist(), k)
        for pname, (pred, probe) in predictions.items():
            rest = [n - probe for n in lengths if n > probe + 1]  # the decode phase's work
            pred = [float(x) for x in (rest if pred is None else pred)]
            lb = steps_lower_bound(rest, m)
            for label, sampler in orders.items():
                plan, order = sampler.order(pred, m)
                steps = simulate_steps(rest, order, m)
                total = steps + (base["probe_steps"] if probe else 0)
                per_group.append(dict(**base, predictor=pname, scheduler=label, plan=plan,
                                      steps=steps, lb=lb, steps_over_lb=steps / lb if lb else 1.0,
                                      total_steps=total, micro_over_total=base["micro"] / total))
    rows = summarize(per_group)
    if b.cfg.real_runs:
        rows += real_runs(b, held, fitted[b.cfg.scheduler_predictor])
    return Table(rows, groups=per_group)


def summarize(per_group: list[Row]) -> list[Row]:
    """Median over the held-out groups of each (predictor, scheduler); `plans` counts the
    orders the sampler took (e.g. `fptas+lpt x3, lpt x1`)."""
    rows = []
    for key in dict.fromkeys((r["predictor"], r["scheduler"]) for r in per_group):
        group = [r for r in per_group if (r["predictor"], r["scheduler"]) == key]
        med = lambda f: statistics.median(r[f] for r in group)  # noqa: E731
        plans = Counter(r["plan"] for r in group)
        rows.append(dict(predictor=key[0], scheduler=key[1], groups=len(group),
                         plans=", ".join(f"{name} x{n}" for name, n in plans.most_common()),
                         avg_len=med("avg_len"), capped=med("capped"),
                         steps=med("steps"), steps_over_lb=med("steps_over_lb"),
                         max_steps_over_lb=max(r["steps_over_lb"] for r in group),
                         total_steps=med("total_steps"), micro=med("micro"),
                         continuous=med("continuous"),
                         micro_over_total=med("micro_over_total")))
    return rows


def real_runs(b: Bench, held: Records, learned: LengthPredictor) -> list[Row]:
    """micro, continuous and infinite on the first held-out prompt: tokens/s and steps."""
    prompts, g, m = held["prompts"][:1], b.cfg.group_size, b.cfg.micro_group_size
    infinite = make_sampler("infinite", micro_group_size=m, probe_tokens=b.cfg.probe_tokens,
                            refill=b.cfg.refill, grouping=b.cfg.grouping, epsilon=b.cfg.epsilon,
                            predictor=learned)
    runs = [("micro (real)", make_sampler("micro", micro_group_size=m), None),
            ("continuous (real)", make_sampler("continuous", micro_group_size=m), None),
            (f"infinite {b.cfg.grouping}+{b.cfg.refill} (real)", infinite,
             b.cfg.scheduler_predictor)]
    rows = []
    for label, sampler, predictor in runs:
        r = b.measure(label, sampler, g, m, prompts=prompts)
        rows.append(dict(predictor=predictor, scheduler=label, groups=1, plans=r.get("plan"),
                         steps=r["steps"], steps_over_lb=r["steps"] / r["lb"] if r["lb"] else 1.0,
                         total_steps=r.get("total_steps", r["steps"]), tok_s=r["tok_s"],
                         wall_s=r["wall_s"], peak_gb=r["peak_gb"]))
    return rows
