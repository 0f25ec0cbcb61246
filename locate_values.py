"""ValueLocate entry point: locate the value neurons of a policy, check how reliable they are,
steer them, and measure the change with instruments that pass their positive controls.

    python locate_values.py                                   # SmolLM2-135M, all 4 dimensions
    python locate_values.py policy=tiny                       # seconds, random-init model
    python locate_values.py locate/select=null_fdr            # keep neurons above the null
    python locate_values.py locate.contrast=opposite_pole     # pole against pole
    python locate_values.py neurons=logs/locate_values/runs/<date>   # re-validate saved sets
    python locate_values.py statistics=<run dir>/pole_statistics.pt locate/select=lape

`locate_values(cfg)` is one flat, ordered function (seed -> policy -> data -> sampler ->
location statistics -> neuron sets -> reliability -> instruments under every arm -> report)
that returns (metrics, objects); the phases live in values/location.py and
values/experiment.py. The run dir gets summary.md (a verdict per dimension first),
neurons_<dimension>.json and _away.json (loadable with `ValueNeurons.load(path, model)`),
random_*.json, tables as .md/.csv, PNG plots, control.json (which instrument passed its
control) and TensorBoard.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402

from entry.run import instantiate_group, run_and_report  # noqa: E402
from modules.policy import describe  # noqa: E402
from values.data import load_value_data  # noqa: E402
from values.experiment import (CONTRASTS, LocateSettings, arms,  # noqa: E402
                               choose_sources, locate, measure, neuron_sets, nulls_for,
                               reliability)
from values.location import (location_prompts, location_statistics,  # noqa: E402
                             teacher_forced_statistics)
from values.instruments import Subject  # noqa: E402
from values.neurons import OPPOSITE, check_dimension, check_gamma, model_signature  # noqa: E402
from values.report import write_report  # noqa: E402
from values.verdict import VerdictRule  # noqa: E402
from values.storage import (load_sets, load_statistics, location_key, save_sets,  # noqa: E402
                            save_statistics)

log = logging.getLogger("locate_values")


def locate_values(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dims = [check_dimension(d, "dimensions") for d in cfg.dimensions]
    if not dims:
        raise ValueError("dimensions is empty: name at least one value dimension")
    gamma = cfg.steer.gamma
    gammas = [check_gamma(g) for g in (gamma if isinstance(gamma, ListConfig) else [gamma])]
    max_perplexity = cfg.validate.max_perplexity
    if max_perplexity is not None:
        if not isinstance(max_perplexity, (int, float)) or not max_perplexity >= 1.0:
            raise ValueError(f"validate.max_perplexity={max_perplexity}: a perplexity ratio "
                             "limit is a number >= 1 (or null to measure every arm)")
        max_perplexity = float(max_perplexity)
    personas = cfg.validate.personas
    if personas is not None and (isinstance(personas, bool) or not isinstance(personas, int)
                                 or personas < 1):
        raise ValueError(f"validate.personas must be an integer >= 1 or null (every wording), "
                         f"got {personas!r}")
    draws = cfg.validate.random_sets
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"validate.random_sets must be an integer >= 1, got {draws!r}")
    v = cfg.validate
    rule = VerdictRule(v.verdict_gamma, v.equivalence, max_perplexity, v.min_reliability,
                       tuple(v.verdict_limits))
    if float(rule.gamma) not in gammas:
        raise ValueError(f"validate.verdict_gamma={rule.gamma:g} is not among steer.gamma "
                         f"{gammas}: the verdict reads one measured gamma, fixed before the run")
    settings = LocateSettings(**{k: v for k, v in OmegaConf.to_container(cfg.locate).items()
                                 if k not in ("select", "top_k", "min_delta")})
    select = hydra.utils.instantiate(cfg.locate.select)
    instruments = instantiate_group(cfg.instruments)
    out = Path(cfg.paths.output_dir)

    policy = hydra.utils.instantiate(cfg.policy)
    log.info(describe(policy))
    model, signature = policy.model, model_signature(policy.model)
    data = load_value_data(cfg.data.path)
    sampler = hydra.utils.instantiate(cfg.sampler)
    subject = Subject(policy, sampler, data, cfg.seed, cfg.validate.max_new_tokens)

    reliabilities, prob = [], None
    if cfg.neurons:  # saved sets: skip location
        located = load_sets(cfg.neurons, dims, model)
    else:
        sources = settings.sources(dims)
        by_source = {}
        if "generated" in settings.location_sources:
            if cfg.statistics:
                by_source["generated"] = load_statistics(cfg.statistics, signature, sources)
            else:
                cached = cache_path(cfg, subject, settings, sources) if settings.cache else None
                stats = cached_statistics(cached, signature, sources)
                if stats is None:
                    stats = location_statistics(subject, settings, sources, log.info)
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        save_statistics(stats, signature, cached, responses=False)
                by_source["generated"] = stats
            save_statistics(by_source["generated"], signature, out / "pole_statistics.pt")
        if "teacher_forced" in settings.location_sources:
            both = list(dict.fromkeys([*sources, *(OPPOSITE[d] for d in dims)]))
            by_source["teacher_forced"] = teacher_forced_statistics(subject, both, log.info)
            save_statistics(by_source["teacher_forced"], signature,
                            out / "pole_statistics_teacher_forced.pt", responses=False)
        candidates = {}
        for source, stats in by_source.items():
            contrasts = [c for c in CONTRASTS if all(CONTRASTS[c](d) in stats for d in dims)]
            pairs = [(a, b) for c in contrasts for d in dims for a, b in
                     ((d, CONTRASTS[c](d)), (CONTRASTS[c](d), d))]
            nulls = nulls_for(stats, pairs, settings.null_shuffles, cfg.seed)
            candidates[source] = locate(stats, select, dims, settings.negative, nulls,
                                        {"model": signature, "contrast": settings.contrast,
                                         "source": source})
            for contrast in contrasts:
                for d in dims:
                    neg = CONTRASTS[contrast](d)
                    chosen = candidates[source][d][0] if contrast == settings.contrast else \
                        select(stats, d, neg, nulls[(d, neg)])
                    reliabilities.append(reliability(
                        stats, d, neg, contrast, chosen, cfg.locate.top_k, nulls[(d, neg)],
                        settings.split_half_repeats, cfg.seed, source))
        # before anything is steered: each dimension's set from its more reliable source
        chosen_source = choose_sources(reliabilities, dims, settings.contrast)
        for d, source in chosen_source.items():
            log.info(f"location of {d}: source {source} (Spearman-Brown " + ", ".join(
                f"{r.source} {r.spearman_brown:.2f}" for r in reliabilities
                if r.dimension == d and r.contrast == settings.contrast) + ")")
        located = {d: candidates[chosen_source[d]][d] for d in dims}
        # the random null's matching: each neuron's activation probability over the
        # dimension's location data (its pole and its negative, in the chosen source)
        prob = {d: (by_source[chosen_source[d]][d].summary.prob
                    + by_source[chosen_source[d]][settings.negative(d)].summary.prob) / 2
                for d in dims}
    sets = neuron_sets(located, signature["d_ff"], cfg.seed, draws, prob)
    sets_rows = save_sets(sets, out, signature["layers"])

    all_arms = arms(sets, gammas, cfg.steer.fraction, cfg.steer.seed, cfg.steer.scale,
                    null_gamma=float(rule.gamma))
    measurement = measure(subject, instruments, dims, all_arms, personas,
                          [float(g) for g in cfg.validate.generate_gamma],
                          cfg.validate.bootstrap, cfg.validate.passages, log.info,
                          cfg.validate.controls_first, max_perplexity)

    header = (f"# Value neurons of {signature['model_type']} ({signature['layers']} layers x "
              f"{signature['d_ff']}): contrast {settings.contrast}, selection "
              f"{type(select).__name__}, steer.scale {cfg.steer.scale}; verdicts read gamma "
              f"{rule.gamma:g}, ruled out below {rule.equivalence:g} x the persona effect, "
              f"location reliable from Spearman-Brown {rule.min_reliability:g}\n")
    metrics = write_report(out, measurement, [i.name for i in instruments], dims, gammas,
                           sets_rows, reliabilities,
                           {d: s.toward.layer_histogram(signature["layers"])
                            for d, s in sets.items()}, header, rule, settings.contrast)
    objects = dict(cfg=cfg, policy=policy, data=data, sampler=sampler, subject=subject,
                   sets=sets, measurement=measurement, reliability=reliabilities,
                   instruments=instruments)
    return metrics, objects


def cache_path(cfg: DictConfig, subject: Subject, settings: LocateSettings,
               sources: list[str]) -> Path:
    """Where `locate.cache` keeps the location statistics of exactly this model, these
    prompts and this sampler."""
    prompts = {s: location_prompts(subject, s, settings.pairs) for s in sources}
    code = [sys.modules[name] for name in ("values.statistics", "values.location",
                                           "values.prompts", "samplers.engine",
                                           type(subject.sampler).__module__)]
    key = location_key(subject.model, prompts, settings.max_new_tokens, subject.eos,
                       OmegaConf.to_yaml(cfg.sampler), code)
    return Path(cfg.paths.cache_dir) / "pole_statistics" / f"{key[:32]}.pt"


def cached_statistics(path: Path | None, signature: dict, sources: list[str]) -> Any:
    """The cached statistics, or None (no cache, no entry, or one unreadable: gathered anew)."""
    if path is None or not path.is_file():
        return None
    try:
        stats = load_statistics(str(path), signature, sources)
    except ValueError as err:
        log.warning(f"locate.cache: {err}; gathering the statistics anew")
        return None
    log.info(f"location statistics from the cache {path} (locate.cache=false gathers them "
             "anew)")
    return stats


@hydra.main(version_base="1.3", config_path="configs", config_name="locate_values.yaml")
def main(cfg: DictConfig) -> float | None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return run_and_report(locate_values, cfg, report)


def report(cfg: DictConfig, metrics: dict[str, float], objects: dict[str, Any]) -> float | None:
    print("\n" + (Path(cfg.paths.output_dir) / "summary.md").read_text())
    print(f"outputs: {cfg.paths.output_dir}")
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
