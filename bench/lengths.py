"""Length-aware scheduling benchmarks: Tables C and D of docs/ARCHITECTURE.md section 8.

    python -m bench table=record data=chat num_prompts=16 max_new_tokens=512   # sample once
    python -m bench table=predictor data=chat max_new_tokens=512               # Table D
    python -m bench table=scheduler data=chat max_new_tokens=512               # Table C

`record` samples the first `heldout_prompts` prompts with G = group_size (the held-out groups)
and the rest with `record_group_size` (the predictors' training prompts), and saves both as
rollout files (`predictors/rollouts.py`). Table D fits each predictor on the training file for
every probe length k and scores it on the held-out samples (the samples the sampler would ask
about: L > k). Table C schedules each held-out group on m slots: because every sample's
tokens do not depend on its schedule, the decoding steps of any schedule follow exactly from
the recorded lengths, so all schedule x predictor variants are computed on the same samples
(predictions clipped to [0, max_new_tokens - k], as the sampler does). Stream rows are the
`infinite` sampler's own queue (`simulate_stream`); two-phase rows are the paper's plan (probe
phase, then FPTAS grouping and a refill order; `plans` says which order it took). Every row
counts all the call's decoding steps, against the bound and against `continuous`.
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
from samplers.scheduling import (best_order, fptas_plan, list_schedule_makespan,
                                 planned_order, refill_order, rounds_steps, simulate_steps,
                                 simulate_stream, steps_lower_bound)

STREAM = [("stream auto", "auto", None), ("stream attained", "attained", "lpt"),
          ("stream predicted lpt", "predicted", "lpt"),
          ("stream predicted sjf", "predicted", "sjf")]  # (label, schedule, refill)
TWO_PHASE = [("two-phase fifo", "none", "fifo"), ("two-phase fptas", "fptas", "fifo"),
             ("two-phase sjf", "none", "sjf"), ("two-phase lpt", "none", "lpt"),
             ("two-phase fptas+sjf", "fptas", "sjf"),
             ("two-phase fptas+lpt", "fptas", "lpt")]  # (label, grouping, refill)
ORACLE = "oracle"  # the true lengths as predictions, known before anything runs

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
    """(predicted, true) remaining lengths after k probe tokens of the samples with L > k."""
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


def two_phase_order(predicted: list[float], slots: int, grouping: str, refill: str,
                    epsilon: float) -> tuple[str, list[int]]:
    """The paper's plan, as the `infinite` sampler made it before issue 27 (a probe phase,
    then one admission order of the probed samples): `grouping: none` is the refill order;
    `fptas` the best by predicted makespan of the FPTAS plan, the refill order and LPT."""
    if grouping == "none":
        return refill, refill_order(predicted, refill)
    plan = fptas_plan(predicted, slots, epsilon)
    candidates = {f"fptas+{refill}": planned_order(plan, predicted, refill),
                  refill: refill_order(predicted, refill), "lpt": refill_order(predicted, "lpt")}
    name, order, _ = best_order(candidates, predicted, slots)
    return name, order


def aligned(lengths: list[int], asked: list[float], k: int) -> list[float]:
    """One prediction per sample: those of the samples still running after k tokens (L > k),
    in order, and 0 for the others (never asked)."""
    values = iter(asked)
    return [next(values) if n > k else 0.0 for n in lengths]


def record_of(sampler: InfiniteSampler, held: Records, groups: list[int], k: int,
              predictions: dict[int, list[float]], upfront: bool) -> None:
    """Fill the sampler's `auto` record with other groups (each sample's length and the
    prediction it got), as if it had sampled them in earlier calls."""
    sampler.record.clear()
    for g in groups:
        lengths = held["lengths"][held["prompt_index"] == g].tolist()
        full = predictions[g] if upfront else aligned(lengths, predictions[g], k)
        sampler.record.append([(n, p if upfront or n > k else None)
                               for n, p in zip(lengths, full)])


def table_scheduler(b: Bench) -> Table:
    """Table C: each schedule x {oracle, each learned predictor} on each held-out group (median
    rows in the Markdown, per-group rows in the `_groups` files), then real runs on group 0.

    Stream rows are the `infinite` sampler's queue (`simulate_stream`, checked step for step
    against the engine by the tests) with the sampler's k and parking budget; `auto` decides
    with a record made of the other held-out groups. Two-phase rows are the paper's plan as
    it was before (probe phase, then one order). Every row counts all decoding steps of the
    call and is compared with `continuous` on the same lengths."""
    records, k, m = load_files(b.cfg), b.cfg.probe_tokens, b.cfg.micro_group_size
    held = records["heldout"]
    fitted = {name: fit_predictor(b, name, k, records["train"]) for name in b.cfg.predictors}
    groups = list(range(len(held["prompts"])))
    per_group = []
    for pname in [ORACLE, *fitted]:
        # the oracle predicts every sample's whole length before anything runs (it needs no
        # probe); a learned predictor the remaining length of each sample running after k
        upfront = pname == ORACLE
        predictions = {}
        for i in groups:
            lengths = held["lengths"][held["prompt_index"] == i].tolist()
            predictions[i] = ([float(n) for n in lengths] if upfront
                              else predict(b, fitted[pname], held, k, [i])[0].tolist())
        sampler = make_sampler("infinite", micro_group_size=m, probe_tokens=k,
                               predictor=make_predictor("oracle") if upfront
                               else fitted[pname])
        for i in groups:
            lengths = held["lengths"][held["prompt_index"] == i].tolist()
            base = dict(group=i, avg_len=sum(lengths) / len(lengths),
                        capped=sum(n >= b.cfg.max_new_tokens for n in lengths) / len(lengths),
                        lb=steps_lower_bound(lengths, m), micro=rounds_steps(lengths, m),
                        continuous=list_schedule_makespan(lengths, m), predictor=pname)
            full = predictions[i] if upfront else aligned(lengths, predictions[i], k)
            record_of(sampler, held, [g for g in groups if g != i], k, predictions, upfront)
            rows = {}
            for label, schedule, refill in STREAM:
                taken = sampler.choose(1, m, b.spec) if schedule == "auto" else schedule
                rows[label] = (taken, simulate_stream(
                    lengths, full, m, k, sampler.park_tokens(m, b.spec, taken),
                    "attained" if taken == "continuous" else taken, refill or sampler.refill,
                    upfront=upfront))
            probe = list_schedule_makespan([min(n, k + 1) for n in lengths], m) if k else 0
            # the old probe drew token k before parking: samples with L = k + 1 ended in it
            rest = [n - k for n in lengths if n > k + 1]
            parked = [p - (k if upfront else 0) for n, p in zip(lengths, full) if n > k + 1]
            for label, grouping, refill in TWO_PHASE:
                plan, order = two_phase_order(parked, m, grouping, refill, b.cfg.epsilon)
                rows[label] = (plan, probe + simulate_steps(rest, order, m))
            for label, (plan, steps) in rows.items():
                per_group.append(dict(**base, scheduler=label, plan=plan, steps=steps,
                                      steps_over_lb=steps / base["lb"],
                                      over_continuous=steps / base["continuous"]))
    rows = summarize(per_group)
    if b.cfg.real_runs:
        rows += real_runs(b, held, fitted[b.cfg.scheduler_predictor])
    return Table(rows, groups=per_group)


def summarize(per_group: list[Row]) -> list[Row]:
    """Median over the held-out groups of each (predictor, scheduler); `plans` counts what the
    row took (`auto`: the schedule; two-phase fptas: the order, e.g. `fptas+lpt x3, lpt x1`)."""
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
                         over_continuous=med("over_continuous"),
                         max_over_continuous=max(r["over_continuous"] for r in group),
                         micro=med("micro"), continuous=med("continuous")))
    return rows


def real_runs(b: Bench, held: Records, learned: LengthPredictor) -> list[Row]:
    """micro, continuous and infinite (its defaults, the learned predictor fresh from the
    training file) on the first held-out prompt: tokens/s, and steps as measured."""
    prompts, g, m = held["prompts"][:1], b.cfg.group_size, b.cfg.micro_group_size
    infinite = make_sampler("infinite", micro_group_size=m, probe_tokens=b.cfg.probe_tokens,
                            predictor=learned)
    runs = [("micro (real)", make_sampler("micro", micro_group_size=m), None),
            ("continuous (real)", make_sampler("continuous", micro_group_size=m), None),
            (f"infinite {infinite.schedule} (real)", infinite, b.cfg.scheduler_predictor)]
    rows = []
    for label, sampler, predictor in runs:
        r = b.measure(label, sampler, g, m, prompts=prompts)
        rows.append(dict(predictor=predictor, scheduler=label, groups=1, plans=r.get("schedule"),
                         steps=r["steps"], steps_over_lb=r["steps"] / r["lb"] if r["lb"] else 1.0,
                         over_continuous=r.get("over_continuous"), tok_s=r["tok_s"],
                         wall_s=r["wall_s"], peak_gb=r["peak_gb"]))
    return rows
