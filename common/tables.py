"""The one table writer: rows of dicts as `<stem>.csv` (every column) and `<stem>.md` (a
Markdown table under an optional header line), for the benchmarks, the run summary and the
value-neuron report.

    text = write_table(rows, out / "effects", header="## Effects")   # effects.csv, effects.md
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence


def cell(value: Any, nan: str = "nan") -> str:
    """A Markdown cell: floats to 4 significant digits (NaN as `nan`), None empty, `|`
    escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return nan if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_table(rows: list[dict[str, Any]], stem: Path, header: str = "",
                hide: Sequence[str] = (), nan: str = "nan") -> str:
    """Write `rows` (columns: every row's keys, in first-seen order; a missing one is empty)
    as <stem>.csv and, without the `hide` columns, as a Markdown table under `header` in
    <stem>.md; return the Markdown. No rows: nothing is written."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c not in hide]
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(r.get(c), nan) for c in shown) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text
