"""ValueLocate entry point: locate the value neurons of a policy, steer them, measure.

    python locate_values.py                                   # SmolLM2-135M, all 4 dimensions
    python locate_values.py policy=tiny                       # seconds, random-init model
    python locate_values.py locate.method=lape                # the LAPE-style ablation
    python locate_values.py -m steer.gamma=0,0.5,1,1.5,2      # one job per gamma
    python locate_values.py neurons=logs/locate_values/runs/<date>   # re-validate saved sets
    python locate_values.py statistics=<run dir>/pole_statistics.pt locate.method=lape

`locate_values(cfg)` is one flat, ordered function (seed -> policy -> data -> sampler ->
pole statistics -> neuron sets -> questionnaire, open-ended answers, perplexity -> tables,
plots, TensorBoard) that returns (metrics, objects). Outputs go to the run dir:
neurons_<dimension>.json (loadable with `ValueNeurons.load(path, model)`), random_*.json, the
tables as .md/.csv, and PNG plots, also written to <run dir>/tensorboard.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, ListConfig  # noqa: E402

from datamodules.values import load_value_data  # noqa: E402
from modules.policy import describe  # noqa: E402
from modules.value_eval import BASIC_VALUES, centred_scores, dimension_shift  # noqa: E402
from modules.value_experiment import Condition, ValueExperiment  # noqa: E402
from modules.value_neurons import (OPPOSITE, ActivationSummary, ValueNeurons,  # noqa: E402
                                   check_dimension, model_signature)
from modules.value_report import (by_gamma, gamma_figure, layer_figure,  # noqa: E402
                                  radar_figure, write_table)
from train import run_reporting_errors  # noqa: E402

log = logging.getLogger("locate_values")
KINDS = ("located", "random")


def gammas_of(value: Any) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    for g in values:
        if not isinstance(g, (int, float)) or g < 0:
            raise ValueError(f"steer.gamma must be numbers >= 0, got {g!r}")
    return [float(g) for g in values]


def save_statistics(summaries: dict[str, ActivationSummary], signature: dict,
                    path: Path) -> None:
    torch.save({"model": signature, "poles": {p: {"prob": s.prob, "p95": s.p95,
                                                  "tokens": s.tokens}
                                              for p, s in summaries.items()}}, path)


def load_statistics(path: str, signature: dict) -> dict[str, ActivationSummary]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"statistics={path!r} does not exist (locate_values.py writes "
                                "pole_statistics.pt in its run dir)")
    try:
        saved = torch.load(path, weights_only=True)
        poles = {p: ActivationSummary(v["prob"], v["p95"], int(v["tokens"]))
                 for p, v in saved["poles"].items()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"statistics={path!r} is not a pole statistics file: {err}") from err
    if saved["model"] != signature:
        raise ValueError(f"statistics={path!r} was gathered on {saved['model']}, but this "
                         f"model is {signature}")
    return poles


@dataclass
class Run:
    """What every phase of one run reads and adds to."""
    cfg: DictConfig
    exp: ValueExperiment
    out: Path
    dims: list[str]  # the dimensions to validate
    wanted: list[str]  # ... and their opposites: the sets to locate
    gammas: list[float]
    sets: dict[str, dict[str, ValueNeurons]] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rows: dict[str, list[dict]] = field(default_factory=dict)

    def toward(self, dim: str, kind: str, gamma: float) -> Condition:
        """Steer `kind` neurons of `dim` up (clamping its opposite's, if configured)."""
        opposite = self.sets[kind][OPPOSITE[dim]] if self.cfg.steer.clamp_opposite else None
        return Condition(f"{kind}:{dim}@{gamma:g}", self.sets[kind][dim], opposite, gamma)

    def conditions(self) -> list[Condition]:
        return [self.toward(d, k, g) for d in self.wanted for k in KINDS for g in self.gammas]

    def directions(self, dim: str) -> tuple[tuple[str, str], ...]:
        return (("forward", dim), ("reverse", OPPOSITE[dim]))


def locate_values(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    dims = [check_dimension(d, "dimensions") for d in cfg.dimensions]
    if not dims:
        raise ValueError("dimensions is empty: name at least one value dimension")
    gammas = gammas_of(cfg.steer.gamma)
    if not 0 < cfg.steer.fraction <= 1:
        raise ValueError(f"steer.fraction must be in (0, 1], got {cfg.steer.fraction}")

    policy = hydra.utils.instantiate(cfg.policy)
    log.info(describe(policy))
    data = load_value_data(cfg.data.path)
    sampler = hydra.utils.instantiate(cfg.sampler)
    exp = ValueExperiment(policy, sampler, data, cfg.seed, cfg.steer.fraction, cfg.steer.seed)
    run = Run(cfg, exp, Path(cfg.paths.output_dir), dims,
              list(dict.fromkeys([*dims, *(OPPOSITE[d] for d in dims)])), gammas)

    neuron_sets(run)
    scores = questionnaire(run)
    persona_control(run, scores["base"])
    open_ended(run)
    perplexity_cost(run)
    write_outputs(run)
    objects = dict(cfg=cfg, policy=policy, data=data, sampler=sampler, experiment=exp,
                   neurons=run.sets, scores=scores, tables=run.rows)
    return run.metrics, objects


def neuron_sets(run: Run) -> None:
    """Located sets (from pole statistics, new or saved) or saved sets; random controls."""
    cfg, exp, out = run.cfg, run.exp, run.out
    model = exp.model
    signature = model_signature(model)
    if cfg.neurons:
        located = {d: ValueNeurons.load(Path(cfg.neurons) / f"neurons_{d}.json", model)
                   for d in run.wanted}
    else:
        if cfg.statistics:  # the pole statistics of an earlier run (e.g. to compare methods)
            summaries = load_statistics(cfg.statistics, signature)
            missing = sorted(set(run.wanted) - set(summaries))
            if missing:
                raise ValueError(f"statistics={cfg.statistics!r} has no pole {missing}")
        else:
            summaries = exp.pole_statistics(cfg.locate.pairs, cfg.locate.max_new_tokens,
                                            cfg.locate.batch_size, tuple(run.wanted), log.info)
        save_statistics(summaries, signature, out / "pole_statistics.pt")
        with open(out / "pole_responses.jsonl", "w") as handle:
            for pole, answers in exp.pole_responses.items():
                handle.writelines(json.dumps({"pole": pole, "text": a}) + "\n" for a in answers)
        located = {d: exp.locate(summaries, d, cfg.locate.method, cfg.locate.top_k,
                                 cfg.locate.min_delta) for d in run.wanted}
    controls = exp.controls(located, signature["d_ff"], cfg.seed)
    run.sets = {"located": located, "random": controls}
    rows = []
    for d in run.wanted:
        located[d].save(out / f"neurons_{d}.json")
        controls[d].save(out / f"random_{d}.json")
        n, some = located[d], len(located[d]) > 0
        rows.append({"dimension": d, "neurons": len(n),
                     "max_delta": float(n.delta.max()) if some else 0.0,
                     "mean_delta": float(n.delta.mean()) if some else 0.0,
                     "mean_scale": float(n.scale.mean()) if some else 0.0,
                     "layers": " ".join(map(str, n.layer_histogram(signature["layers"])))})
    run.tables["neurons"] = write_table(rows, out / "neurons", "Located neurons")
    log.info("\n%s", run.tables["neurons"])


def questionnaire(run: Run) -> dict[str, torch.Tensor]:
    """Each dimension's centred-score shift per condition, with a bootstrap interval."""
    cfg, exp, data = run.cfg, run.exp, run.exp.data
    _, items = data.items()
    clock = time.perf_counter()
    conditions = [Condition("base"), *run.conditions()]
    scores = {c.name: exp.questionnaire(c) for c in conditions}
    log.info("questionnaire: %d conditions x %d items, %.0f s", len(scores), len(items),
             time.perf_counter() - clock)
    rows = []
    for d in run.dims:
        for kind in KINDS:
            for direction, pole in run.directions(d):
                for g in run.gammas:
                    shift, low, high = dimension_shift(
                        scores["base"], scores[f"{kind}:{pole}@{g:g}"], items,
                        data.value_dims, d, cfg.validate.bootstrap, cfg.seed)
                    rows.append(dict(dimension=d, neurons=kind, direction=direction,
                                     gamma=g, shift=shift, ci_low=low, ci_high=high))
                    run.metrics[f"questionnaire/{d}/{kind}_{direction}@{g:g}"] = shift
    run.rows["questionnaire"] = rows
    write_table(rows, run.out / "questionnaire")
    run.tables["questionnaire"] = write_table(
        by_gamma(rows, "shift"), run.out / "questionnaire_by_gamma",
        "Questionnaire: centred dimension score shift [95% CI]")
    # How much the unsteered answers depend on the item at all (the instrument's resolution).
    probs = exp.questionnaire_probs(conditions[0]).mean(0)
    run.tables["instrument"] = write_table(
        [dict(items=len(items), score_mean=float(scores["base"].mean()),
              score_std_over_items=float(scores["base"].std()),
              **{f"p_option_{k + 1}": float(v) for k, v in enumerate(probs)})],
        run.out / "questionnaire_instrument", "Questionnaire: unsteered answer distribution")
    values = []
    for name, s in scores.items():
        per_value, per_dim = centred_scores(s, items, data.value_dims)
        values.append({"condition": name, **{v: per_value.get(v, float("nan"))
                                             for v in BASIC_VALUES}, **per_dim})
    run.rows["values"] = values
    write_table(values, run.out / "questionnaire_values")
    return scores


def persona_control(run: Run, base: torch.Tensor) -> None:
    """The questionnaire's control: a persona prompt of each pole instead of steering; and the
    pyvalues margins of the persona-prompted location responses."""
    cfg, exp, data = run.cfg, run.exp, run.exp.data
    _, items = data.items()
    rows = []
    if cfg.validate.personas > 0:
        persona = {p: exp.persona_questionnaire(p, cfg.validate.personas) for p in run.wanted}
        for d in run.dims:
            for direction, pole in run.directions(d):
                shift, low, high = dimension_shift(base, persona[pole], items, data.value_dims,
                                                   d, cfg.validate.bootstrap, cfg.seed)
                rows.append(dict(dimension=d, persona=pole, direction=direction,
                                 shift=shift, ci_low=low, ci_high=high))
                run.metrics[f"questionnaire/{d}/persona_{direction}"] = shift
        run.tables["persona"] = write_table(
            rows, run.out / "persona_control",
            "Questionnaire control: persona prompt instead of steering")
    run.rows["persona"] = rows
    if exp.pole_responses:
        text = {p: exp.text_scores(a) for p, a in exp.pole_responses.items()}
        margins = [dict(dimension=d, margin_pole=text[d][d] - text[d][OPPOSITE[d]],
                        margin_opposite=text[OPPOSITE[d]][d] - text[OPPOSITE[d]][OPPOSITE[d]])
                   for d in run.dims if d in text and OPPOSITE[d] in text]
        for r in margins:
            r["difference"] = r["margin_pole"] - r["margin_opposite"]
        run.tables["persona_text"] = write_table(
            margins, run.out / "persona_text_control",
            "Open-ended control: pyvalues margin of persona responses (pole minus opposite)")


def open_ended(run: Run) -> None:
    """Answers to held-out questions, scored by the pyvalues dictionaries: the shift of the
    dimension's margin over its opposite."""
    cfg, exp = run.cfg, run.exp
    rows: list[dict] = []
    run.rows["open_ended"] = rows
    if cfg.validate.open_ended <= 0:
        return
    clock = time.perf_counter()
    count, tokens = cfg.validate.open_ended, cfg.validate.max_new_tokens
    for d in run.dims:
        base = exp.open_ended(Condition("base"), d, count, tokens)[0]
        for kind in KINDS:
            for direction, pole in run.directions(d):
                for g in gammas_of(cfg.validate.open_gamma):
                    s, answers = exp.open_ended(run.toward(pole, kind, g), d, count, tokens)
                    shift = (s[d] - s[OPPOSITE[d]]) - (base[d] - base[OPPOSITE[d]])
                    rows.append(dict(dimension=d, neurons=kind, direction=direction, gamma=g,
                                     margin_shift=shift,
                                     example=answers[0][:80].replace("\n", " ")))
                    run.metrics[f"open_ended/{d}/{kind}_{direction}@{g:g}"] = shift
    write_table(rows, run.out / "open_ended")
    run.tables["open_ended"] = write_table(by_gamma(rows, "margin_shift"),
                                           run.out / "open_ended_by_gamma",
                                           "Open-ended answers: pyvalues margin shift")
    log.info("open-ended answers: %d rows, %.0f s", len(rows), time.perf_counter() - clock)


def perplexity_cost(run: Run) -> None:
    """The cost of steering: perplexity of neutral passages, steered at every position."""
    rows: list[dict] = []
    run.rows["perplexity"] = rows
    if not run.cfg.validate.perplexity:
        return
    clock = time.perf_counter()
    ppl = {c.name: run.exp.perplexity(c, run.cfg.validate.passages)
           for c in [Condition("base"), *run.conditions()]}
    rows += [{"condition": name, "perplexity": value, "ratio": value / ppl["base"]}
             for name, value in ppl.items()]
    run.metrics["perplexity/base"] = ppl["base"]
    log.info("perplexity: %d conditions, %.0f s", len(ppl), time.perf_counter() - clock)
    run.tables["perplexity"] = write_table(rows, run.out / "perplexity",
                                           "Neutral-text perplexity")


def write_outputs(run: Run) -> None:
    """PNG plots and summary.md; plots, tables and the sweep into TensorBoard (global step =
    100 x gamma for the sweep scalars)."""
    from torch.utils.tensorboard import SummaryWriter

    layers = model_signature(run.exp.model)["layers"]
    figures = {"score_vs_gamma": gamma_figure(run.rows["questionnaire"], run.dims),
               "layers": layer_figure({d: run.sets["located"][d].layer_histogram(layers)
                                       for d in run.wanted})}
    top, values = max(run.gammas), run.rows["values"]
    for d in run.dims:
        row = next(r for r in values if r["condition"] == f"located:{d}@{top:g}")
        series = {"unsteered": [values[0][v] for v in BASIC_VALUES],
                  f"toward {d} (gamma {top:g})": [row[v] for v in BASIC_VALUES]}
        figures[f"radar_{d}"] = radar_figure(BASIC_VALUES, series, d.replace("_", " "))
    writer = SummaryWriter(str(run.out / "tensorboard"))
    for name, fig in figures.items():
        fig.savefig(run.out / f"{name}.png", dpi=110)
        writer.add_figure(f"values/{name}", fig)
    for r in run.rows["questionnaire"]:
        writer.add_scalar(f"values/{r['dimension']}/{r['neurons']}_{r['direction']}", r["shift"],
                          global_step=round(100 * r["gamma"]))
    for name, text in run.tables.items():
        writer.add_text(f"values/{name}", text)
    writer.close()
    (run.out / "summary.md").write_text("\n".join(t for t in run.tables.values() if t))


@hydra.main(version_base="1.3", config_path="configs", config_name="locate_values.yaml")
def main(cfg: DictConfig) -> float | None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics, objects = run_reporting_errors(locate_values, cfg)
    print("\n" + (Path(cfg.paths.output_dir) / "summary.md").read_text())
    print(f"outputs: {cfg.paths.output_dir}")
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
