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


def locate_values(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    dims = [check_dimension(d, "dimensions") for d in cfg.dimensions]
    if not dims:
        raise ValueError("dimensions is empty: name at least one value dimension")
    gammas = gammas_of(cfg.steer.gamma)
    if not 0 < cfg.steer.fraction <= 1:
        raise ValueError(f"steer.fraction must be in (0, 1], got {cfg.steer.fraction}")
    wanted = list(dict.fromkeys([*dims, *(OPPOSITE[d] for d in dims)]))

    policy = hydra.utils.instantiate(cfg.policy)
    log.info(describe(policy))
    data = load_value_data(cfg.data.path)
    sampler = hydra.utils.instantiate(cfg.sampler)
    exp = ValueExperiment(policy, sampler, data, cfg.seed, cfg.steer.fraction, cfg.steer.seed)
    signature = model_signature(policy.model)

    # 1. Neuron sets: located from pole statistics, or loaded from an earlier run.
    if cfg.neurons:
        located = {d: ValueNeurons.load(Path(cfg.neurons) / f"neurons_{d}.json", policy.model)
                   for d in wanted}
    else:
        if cfg.statistics:  # the pole statistics of an earlier run (e.g. to compare methods)
            summaries = load_statistics(cfg.statistics, signature)
            missing = sorted(set(wanted) - set(summaries))
            if missing:
                raise ValueError(f"statistics={cfg.statistics!r} has no pole {missing}")
        else:
            summaries = exp.pole_statistics(cfg.locate.pairs, cfg.locate.max_new_tokens,
                                            cfg.locate.batch_size, tuple(wanted), log.info)
        save_statistics(summaries, signature, out / "pole_statistics.pt")
        with open(out / "pole_responses.jsonl", "w") as handle:
            for pole, answers in exp.pole_responses.items():
                handle.writelines(json.dumps({"pole": pole, "text": a}) + "\n" for a in answers)
        located = {d: exp.locate(summaries, d, cfg.locate.method, cfg.locate.top_k,
                                 cfg.locate.min_delta) for d in wanted}
    controls = exp.controls(located, signature["d_ff"], cfg.seed)
    sets = {"located": located, "random": controls}
    for d in wanted:
        located[d].save(out / f"neurons_{d}.json")
        controls[d].save(out / f"random_{d}.json")
    neuron_rows = [{"dimension": d, "neurons": len(located[d]),
                    "max_delta": float(located[d].delta.max()) if len(located[d]) else 0.0,
                    "mean_delta": float(located[d].delta.mean()) if len(located[d]) else 0.0,
                    "mean_scale": float(located[d].scale.mean()) if len(located[d]) else 0.0,
                    "layers": " ".join(map(str, located[d].layer_histogram(signature["layers"])))}
                   for d in wanted]
    tables = {"neurons": write_table(neuron_rows, out / "neurons", "Located neurons")}
    log.info("\n%s", tables["neurons"])

    def toward(dim: str, kind: str, gamma: float) -> Condition:
        opposite = sets[kind][OPPOSITE[dim]] if cfg.steer.clamp_opposite else None
        return Condition(f"{kind}:{dim}@{gamma:g}", sets[kind][dim], opposite, gamma)

    conditions = [toward(d, kind, g) for d in wanted for kind in KINDS for g in gammas]
    base = Condition("base")
    metrics: dict[str, float] = {}

    # 2. Questionnaire: shift of each dimension's centred score, with a bootstrap interval.
    _, item_values = data.items()
    clock = time.perf_counter()
    scores = {c.name: exp.questionnaire(c) for c in [base, *conditions]}
    log.info("questionnaire: %d conditions x %d items, %.0f s", len(scores), len(item_values),
             time.perf_counter() - clock)
    q_rows = []
    for d in dims:
        for kind in KINDS:
            for direction, pole in (("forward", d), ("reverse", OPPOSITE[d])):
                for g in gammas:
                    shift, low, high = dimension_shift(
                        scores["base"], scores[f"{kind}:{pole}@{g:g}"], item_values,
                        data.value_dims, d, cfg.validate.bootstrap, cfg.seed)
                    q_rows.append(dict(dimension=d, neurons=kind, direction=direction,
                                       gamma=g, shift=shift, ci_low=low, ci_high=high))
                    metrics[f"questionnaire/{d}/{kind}_{direction}@{g:g}"] = shift
    write_table(q_rows, out / "questionnaire")
    tables["questionnaire"] = write_table(by_gamma(q_rows, "shift"), out / "questionnaire_by_gamma",
                                          "Questionnaire: centred dimension score shift [95% CI]")
    # How much the unsteered answers depend on the item at all (the instrument's resolution).
    base_probs = exp.questionnaire_probs(base)
    tables["instrument"] = write_table(
        [dict(items=len(item_values), score_mean=float(scores["base"].mean()),
              score_std_over_items=float(scores["base"].std()),
              **{f"p_option_{k + 1}": float(v) for k, v in enumerate(base_probs.mean(0))})],
        out / "questionnaire_instrument", "Questionnaire: unsteered answer distribution")
    c_rows = []
    if cfg.validate.personas > 0:  # the instrument's control: a persona prompt per pole
        persona = {p: exp.persona_questionnaire(p, cfg.validate.personas) for p in wanted}
        for d in dims:
            for direction, pole in (("forward", d), ("reverse", OPPOSITE[d])):
                shift, low, high = dimension_shift(scores["base"], persona[pole], item_values,
                                                   data.value_dims, d, cfg.validate.bootstrap,
                                                   cfg.seed)
                c_rows.append(dict(dimension=d, persona=pole, direction=direction,
                                   shift=shift, ci_low=low, ci_high=high))
                metrics[f"questionnaire/{d}/persona_{direction}"] = shift
        tables["persona"] = write_table(c_rows, out / "persona_control",
                                        "Questionnaire control: persona prompt instead of steering")
    value_rows = []
    for name, s in scores.items():
        values, dim_scores = centred_scores(s, item_values, data.value_dims)
        value_rows.append({"condition": name, **{v: values.get(v, float("nan"))
                                                 for v in BASIC_VALUES}, **dim_scores})
    write_table(value_rows, out / "questionnaire_values")

    # 3. Open-ended answers to held-out questions, scored by the pyvalues dictionaries.
    o_rows = []
    clock = time.perf_counter()
    if cfg.validate.open_ended > 0:
        count, tokens = cfg.validate.open_ended, cfg.validate.max_new_tokens
        base_text = {d: exp.open_ended(base, d, count, tokens)[0] for d in dims}
        for d in dims:
            margin = lambda s: s[d] - s[OPPOSITE[d]]  # noqa: E731
            for kind in KINDS:
                for direction, pole in (("forward", d), ("reverse", OPPOSITE[d])):
                    for g in gammas_of(cfg.validate.open_gamma):
                        s, answers = exp.open_ended(toward(pole, kind, g), d, count, tokens)
                        o_rows.append(dict(dimension=d, neurons=kind, direction=direction,
                                           gamma=g, margin_shift=margin(s) - margin(base_text[d]),
                                           example=answers[0][:80].replace("\n", " ")))
                        metrics[f"open_ended/{d}/{kind}_{direction}@{g:g}"] = o_rows[-1][
                            "margin_shift"]
        write_table(o_rows, out / "open_ended")
        tables["open_ended"] = write_table(by_gamma(o_rows, "margin_shift"),
                                           out / "open_ended_by_gamma",
                                           "Open-ended answers: pyvalues margin shift")
        log.info("open-ended answers: %d rows, %.0f s", len(o_rows), time.perf_counter() - clock)

    # The open-ended instrument's control: pyvalues margins of the persona-prompted location
    # responses (prompted toward each pole), relative to the opposite pole's responses.
    if exp.pole_responses:
        text = {p: exp.text_scores(a) for p, a in exp.pole_responses.items()}
        rows = [dict(dimension=d, margin_pole=text[d][d] - text[d][OPPOSITE[d]],
                     margin_opposite=text[OPPOSITE[d]][d] - text[OPPOSITE[d]][OPPOSITE[d]])
                for d in dims if d in text and OPPOSITE[d] in text]
        for r in rows:
            r["difference"] = r["margin_pole"] - r["margin_opposite"]
        tables["persona_text"] = write_table(rows, out / "persona_text_control",
                                             "Open-ended control: pyvalues margin of persona "
                                             "responses (pole minus opposite)")

    # 4. The cost of steering: perplexity of neutral passages, steered at every position.
    p_rows = []
    clock = time.perf_counter()
    if cfg.validate.perplexity:
        ppl = {c.name: exp.perplexity(c, cfg.validate.passages) for c in [base, *conditions]}
        p_rows = [{"condition": name, "perplexity": value, "ratio": value / ppl["base"]}
                  for name, value in ppl.items()]
        metrics["perplexity/base"] = ppl["base"]
        log.info("perplexity: %d conditions, %.0f s", len(ppl), time.perf_counter() - clock)
        tables["perplexity"] = write_table(p_rows, out / "perplexity", "Neutral-text perplexity")

    # 5. Plots, also into TensorBoard (global step = 100 x gamma for the sweep scalars).
    figures = {"score_vs_gamma": gamma_figure(q_rows, dims),
               "layers": layer_figure({d: located[d].layer_histogram(signature["layers"])
                                       for d in wanted})}
    top = max(gammas)
    for d in dims:
        series = {"unsteered": [value_rows[0][v] for v in BASIC_VALUES]}
        row = next(r for r in value_rows if r["condition"] == f"located:{d}@{top:g}")
        series[f"toward {d} (gamma {top:g})"] = [row[v] for v in BASIC_VALUES]
        figures[f"radar_{d}"] = radar_figure(BASIC_VALUES, series, d.replace("_", " "))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"values/{name}", fig)
    for r in q_rows:
        writer.add_scalar(f"values/{r['dimension']}/{r['neurons']}_{r['direction']}", r["shift"],
                          global_step=round(100 * r["gamma"]))
    for name, text in tables.items():
        writer.add_text(f"values/{name}", text)
    writer.close()
    summary = "\n".join(t for t in tables.values() if t)
    (out / "summary.md").write_text(summary)
    objects = dict(cfg=cfg, policy=policy, data=data, sampler=sampler, experiment=exp,
                   neurons=sets, scores=scores, tables=dict(questionnaire=q_rows, persona=c_rows,
                                                             open_ended=o_rows,
                                                             perplexity=p_rows))
    return metrics, objects


@hydra.main(version_base="1.3", config_path="configs", config_name="locate_values.yaml")
def main(cfg: DictConfig) -> float | None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics, objects = run_reporting_errors(locate_values, cfg)
    print("\n" + (Path(cfg.paths.output_dir) / "summary.md").read_text())
    print(f"outputs: {cfg.paths.output_dir}")
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
