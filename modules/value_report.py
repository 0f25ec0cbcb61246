"""Tables and plots of a value-neuron run: Markdown + CSV tables, PNG figures.

    write_table(rows, out_dir / "questionnaire")   # questionnaire.md and questionnaire.csv
    fig = gamma_figure(rows, dimensions)            # dimension shift vs gamma, located vs random
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_table(rows: list[dict[str, Any]], stem: Path, title: str = "") -> str:
    """Write rows as `<stem>.csv` and `<stem>.md`; return the Markdown."""
    if not rows:
        return ""
    columns = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"## {title}\n" if title else "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(line for line in lines if line) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text


def gamma_figure(rows: list[dict[str, Any]], dimensions: Sequence[str]) -> plt.Figure:
    """One panel per dimension: its questionnaire shift vs gamma for located and random
    neurons, steering toward the dimension (forward) and toward its opposite (reverse), with
    the bootstrap 95% interval as a band."""
    fig, axes = plt.subplots(1, len(dimensions), figsize=(4.2 * len(dimensions), 3.6),
                             squeeze=False)
    styles = {("located", "forward"): ("tab:blue", "-"), ("located", "reverse"): ("tab:red", "-"),
              ("random", "forward"): ("tab:blue", ":"), ("random", "reverse"): ("tab:red", ":")}
    for ax, dim in zip(axes[0], dimensions):
        for (kind, direction), (color, line) in styles.items():
            sel = sorted((r for r in rows if r["dimension"] == dim and r["neurons"] == kind
                          and r["direction"] == direction), key=lambda r: r["gamma"])
            if not sel:
                continue
            g = [r["gamma"] for r in sel]
            ax.plot(g, [r["shift"] for r in sel], line, color=color, marker="o", ms=3,
                    label=f"{kind} {direction}")
            ax.fill_between(g, [r["ci_low"] for r in sel], [r["ci_high"] for r in sel],
                            color=color, alpha=0.12 if kind == "located" else 0.05)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(dim.replace("_", " "))
        ax.set_xlabel("gamma")
    axes[0][0].set_ylabel("centred score shift (1-6 scale)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def radar_figure(values: Sequence[str], series: dict[str, Sequence[float]],
                 title: str = "") -> plt.Figure:
    """The 10 basic values' centred scores, one closed line per series (before / after)."""
    angles = [2 * math.pi * k / len(values) for k in range(len(values))]
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="polar")
    low = min(min(s) for s in series.values())
    offset = -low + 0.2 if low < 0 else 0.0  # polar radii must be >= 0: shift all series
    for name, scores in series.items():
        radii = [s + offset for s in scores]
        ax.plot(angles + angles[:1], radii + radii[:1], label=name)
        ax.fill(angles + angles[:1], radii + radii[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([v.replace("_", "\n") for v in values], fontsize="small")
    ax.set_yticklabels([])
    ax.set_title(title + (f"\n(radius = centred score + {offset:.2f})" if offset else ""),
                 fontsize="small")
    ax.legend(loc="upper left", fontsize="x-small", bbox_to_anchor=(-0.15, 1.12))
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


def by_gamma(rows: list[dict[str, Any]], value: str, interval: bool = True) -> list[dict]:
    """One row per (dimension, neurons, direction), one column per gamma:
    "shift [low, high]" (or the bare value), for reading a sweep at a glance."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["dimension"], r["neurons"], r["direction"])
        row = out.setdefault(key, dict(dimension=key[0], neurons=key[1], direction=key[2]))
        cell = f"{r[value]:+.4f}"
        if interval and "ci_low" in r:
            cell += f" [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        row[f"gamma {r['gamma']:g}"] = cell
    return list(out.values())
