"""`python -m bench.report`: the sweep report (entry/summary.py) over any train.py runs.

    python train.py -m sampler=full,micro model.group_size=8       # writes <sweep>/summary.*
    python -m bench.report logs/train/multiruns/<a> logs/train/multiruns/<b> --out cmp/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from entry.summary import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="One comparison table (summary.md/.csv/.png) over train.py runs and sweeps.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("--out", type=Path, default=None,
                        help="where summary.* go (default: the dir given, if one; else "
                             "./sweep_report)")
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("sweep_report"))
    try:
        _, text = report(args.dirs, out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text + f"\nwritten: {out / 'summary.md'} (and .csv, .png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
