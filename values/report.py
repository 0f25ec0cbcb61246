"""Tables, verdicts and plots of a value-neuron run: Markdown + CSV tables, PNG figures.

    write_table(rows, out_dir / "effects")          # effects.md and effects.csv
    fig = dose_figure(measurement, "dilemmas", dims, gammas)
    write_report(out, measurement, instruments, dims, gammas, ..., rule=VerdictRule())

The verdicts themselves are values/verdict.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import tables  # noqa: E402
from values.neurons import OPPOSITE  # noqa: E402
from values.verdict import VerdictRule, instrument_row, read, verdict  # noqa: E402


def write_table(rows: list[dict[str, Any]], stem: Path, title: str = "") -> str:
    """`rows` as <stem>.csv and <stem>.md under `## title`; returns the Markdown."""
    return tables.write_table(rows, stem, f"## {title}" if title else "")


def dose_figure(m: Any, instrument: str, dims: Sequence[str],
                gammas: Sequence[float]) -> plt.Figure:
    """One panel per dimension: the effect toward it vs gamma for the located, random and
    reverse arms (95% bands), the persona control as a dashed line."""
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    styles = {"located": "tab:blue", "random": "tab:grey", "reverse": "tab:red"}
    for ax, dim in zip(axes[0], dims):
        for kind, color in styles.items():
            sel = [(g, m.arms[(instrument, dim, kind, g)]) for g in gammas
                   if (instrument, dim, kind, g) in m.arms]
            if not sel:
                continue
            g = [x for x, _ in sel]
            ax.plot(g, [e.point for _, e in sel], color=color, marker="o", ms=3, label=kind)
            ax.fill_between(g, [e.low for _, e in sel], [e.high for _, e in sel], color=color,
                            alpha=0.12)
        persona = m.persona.get((instrument, dim))
        if persona is not None:
            ax.axhline(persona.point, color="tab:green", ls="--", lw=1, label="persona")
        ax.axhline(0.0, color="black", lw=0.5)
        passed = "control passed" if m.passes(instrument, dim) else "control FAILED"
        ax.set_title(f"{dim.replace('_', ' ')}\n({passed})", fontsize="small")
        ax.set_xlabel("gamma")
    axes[0][0].set_ylabel(f"{instrument}: effect toward the dimension")
    axes[0][-1].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def layer_figure(histograms: dict[str, list[int]]) -> plt.Figure:
    """Located neurons per layer, one bar series per dimension."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(1, len(histograms))
    for k, (dim, counts) in enumerate(histograms.items()):
        ax.bar([i + k * width for i in range(len(counts))], counts, width, label=dim)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def reliability_rows(items: Sequence[Any]) -> tuple[list[dict], list[dict]]:
    """(one row per dimension and contrast, one row per point of the split-half curve)."""
    summary, curve = [], []
    for r in items:
        full = r.curve[-1]
        summary.append({"dimension": r.dimension, "source": r.source, "contrast": r.contrast,
                        "located from it": "yes" if r.chosen else "",
                        "set size": r.set_size, "above null max 95%": r.above95,
                        "above null max 99%": r.above99, "FDR of the set": r.fdr_at_set,
                        "kept at FDR 5%": r.fdr05_count,
                        "prompts per half": full.prompts_per_half,
                        "split-half Spearman": full.spearman,
                        "Spearman-Brown (all prompts)": full.spearman_brown,
                        "top-k Jaccard": full.jaccard})
        curve += [{"dimension": r.dimension, "source": r.source, "contrast": r.contrast,
                   "prompts per half": p.prompts_per_half, "spearman": p.spearman,
                   "spearman_brown": p.spearman_brown, "jaccard": p.jaccard}
                  for p in r.curve]
    return summary, curve


def reliability_figure(curve: list[dict]) -> plt.Figure:
    """Split-half Spearman and top-k Jaccard against prompts per half, per dimension."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    keys = dict.fromkeys((r["dimension"], r["contrast"], r["source"]) for r in curve)
    for dim, contrast, source in keys:
        rows = [r for r in curve if (r["dimension"], r["contrast"], r["source"]) ==
                (dim, contrast, source)]
        line = "-" if contrast == "reversed" else ":"
        marker = "o" if source == "teacher_forced" else "x"
        for ax, key in zip(axes, ("spearman", "jaccard")):
            ax.plot([r["prompts per half"] for r in rows], [r[key] for r in rows], line,
                    marker=marker, ms=3, label=f"{dim} ({contrast}, {source})")
    for ax, name in zip(axes, ("split-half Spearman of delta", "top-k Jaccard")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("location units per half (prompts or statements)")
        ax.set_ylabel(name)
    axes[0].axhline(0.8, color="grey", lw=0.6)
    axes[1].legend(fontsize="xx-small")
    fig.tight_layout()
    return fig


def effect_rows(m: Any) -> list[dict]:
    """Every measured effect, one row each (the CSV behind the plots)."""
    rows = [{"instrument": i, "dimension": d, "arm": "persona", "gamma": float("nan"),
             "effect": e.point, "low": e.low, "high": e.high, "perplexity_ratio": float("nan")}
            for (i, d), e in m.persona.items()]
    rows += [{"instrument": i, "dimension": axis, "arm": "persona first pole - second",
              "gamma": float("nan"), "effect": e.point, "low": e.low, "high": e.high,
              "perplexity_ratio": float("nan")} for (i, axis), e in m.persona_axis.items()]
    rows += [{"instrument": i, "dimension": d, "arm": k, "gamma": g, "effect": e.point,
              "low": e.low, "high": e.high,
              "perplexity_ratio": m.perplexity.get(f"{k}:{d}@{g:g}", float("nan"))}
             for (i, d, k, g), e in m.arms.items()]
    rows += [{"instrument": i, "dimension": d, "arm": "located - random", "gamma": g,
              "effect": e.point, "low": e.low, "high": e.high,
              "perplexity_ratio": float("nan"),
              "null quantile": m.quantiles.get((i, d, g), (float("nan"), 0))[0],
              "random sets": m.quantiles.get((i, d, g), (float("nan"), 0))[1]}
             for (i, d, g), e in m.contrasts.items()]
    # the verdict's pole-specificity: this pole's located - random minus the opposite's
    rows += [{"instrument": i, "dimension": d, "arm": "this pole's set - opposite's",
              "gamma": g, "effect": e.point, "low": e.low, "high": e.high,
              "perplexity_ratio": float("nan")} for (i, d, g), e in m.specific.items()]
    return rows


def write_report(out: Path, m: Any, instruments: Sequence[str], dims: Sequence[str],
                 gammas: Sequence[float], sets_rows: list[dict], reliability: Sequence[Any],
                 layer_counts: dict[str, list[int]], header: str = "",
                 rule: VerdictRule = VerdictRule(),
                 contrast: str | None = None) -> dict[str, float]:
    """summary.md (verdicts first), CSV/MD tables, PNG plots, TensorBoard, control.json;
    returns the run's scalar metrics. The verdict gate reads the split-half reliability of
    the location each set came from (the `chosen` rows of `reliability`)."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    max_perplexity = rule.max_perplexity
    reliable = {r.dimension: r.spearman_brown for r in reliability if r.chosen}
    tables, metrics, verdicts, gate = [header] if header else [], {}, {}, {}
    for dim in dims:
        rows = [instrument_row(m, name, dim, rule.gamma) for name in instruments]
        specificity = OPPOSITE[dim] in dims
        verdicts[dim] = verdict(dim, rows, rule, reliable.get(dim), specificity)
        gate[dim] = {r.instrument: r.control for r in rows}
        cells = []
        for r in rows:
            reading = read(r, rule, max_perplexity, specificity) if r.control else None
            cells.append({**r.cells(), "reading": reading.word if reading else "not read",
                          "bound": reading.bound if reading else float("nan"),
                          "smallest detectable": reading.detectable if reading
                          else float("nan")})
        text = write_table(cells, out / f"verdict_{dim}", f"{dim}: {verdicts[dim][0]}")
        tables.append(text + "\n" + verdicts[dim][1] + "\n")
        for r in rows:
            metrics[f"{r.instrument}/{dim}/persona"] = r.persona.point
            metrics[f"{r.instrument}/{dim}/located_minus_random"] = r.located_minus_random.point
    (out / "control.json").write_text(json.dumps(gate, indent=1))
    failed: dict[str, list[str]] = {}
    for i, axis in m.skipped:
        failed.setdefault(i, []).append(axis)
    unmeasured = [f"arms whose perplexity ratio exceeds x{max_perplexity:g}"
                  ] if max_perplexity is not None else []
    if failed:
        unmeasured.append("the arms of instruments whose control fails on both poles of an "
                          "axis: " + ", ".join(f"{i} ({' and '.join(a)})"
                                               for i, a in failed.items()))
    poles: dict[str, list[str]] = {}
    for i, dim in m.no_reverse:
        poles.setdefault(i, []).append(dim)
    if poles:
        unmeasured.append("the reverse arms of a pole whose control fails (nothing reads "
                          "them): " + ", ".join(f"{i} ({' and '.join(d)})"
                                                for i, d in poles.items()))
    if unmeasured:
        tables.append("Not measured: " + "; ".join(unmeasured) + ".\n")
    tables.append(write_table(sets_rows, out / "neurons", "Located neuron sets"))
    summary, curve = reliability_rows(reliability)
    if summary:
        tables.append(write_table(summary, out / "reliability",
                                  "Reliability: permutation null and split-half"))
        write_table(curve, out / "reliability_curve")
    write_table(effect_rows(m), out / "effects")
    tables.append(write_table([{"arm": k, "perplexity ratio": v} for k, v in
                               m.perplexity.items()], out / "perplexity",
                              f"Neutral-text perplexity ratio (base {m.base_perplexity:.3f})"))
    metrics["perplexity/base"] = m.base_perplexity
    figures = {f"dose_{name}": dose_figure(m, name, dims, gammas) for name in instruments}
    figures["layers"] = layer_figure(layer_counts)
    if curve:
        figures["reliability"] = reliability_figure(curve)
    writer = SummaryWriter(str(out / "tensorboard"))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(f"values/{name}", fig)
        plt.close(fig)
    for (name, dim, kind, g), e in m.arms.items():
        writer.add_scalar(f"values/{name}/{dim}/{kind}", e.point, global_step=round(100 * g))
    for k, text in enumerate(t for t in tables if t):
        writer.add_text("values/summary", text, global_step=k)
    writer.close()
    (out / "summary.md").write_text("\n".join(t for t in tables if t))
    return metrics
