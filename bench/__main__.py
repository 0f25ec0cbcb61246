"""Hydra entry of the benchmarks: `python -m bench table=<name> [overrides]` (configs/bench.yaml).

    python -m bench table=memory policy=tiny data=arithmetic num_prompts=2 group_size=4

Builds the `Bench` (policy, the first batch of prompts, the spec), runs one table and writes it
to `<out_dir>/<name>.{md,csv}` (per-group rows to `<name>_groups.*`, plots to `<name>*.png`),
then prints the Markdown. The tables are listed in bench/__init__.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench.core import CONFIGS, Bench, Table, plot_gantts
from common.tables import write_table
from entry.run import run_reporting_errors
from bench.lengths import table_predictor, table_record, table_scheduler
from bench.prompt_kv import table_prompt_kv
from bench.sampling import table_dynamic, table_memory, table_sweep, table_throughput

TABLES: dict[str, Callable[[Bench], Table]] = {
    "memory": table_memory, "sweep": table_sweep, "throughput": table_throughput,
    "dynamic": table_dynamic, "record": table_record, "predictor": table_predictor,
    "scheduler": table_scheduler, "prompt_kv": table_prompt_kv}


def header(bench: Bench) -> str:
    """The first line of every .md output: the command and what it ran on."""
    overrides = " ".join(HydraConfig.get().overrides.task)
    return (f"`python -m bench {overrides}`"
            f" on {bench.device} ({torch.get_num_threads()} threads): B={len(bench.prompts)}, "
            f"prompt tokens={[len(p) for p in bench.prompts]}, max_new_tokens="
            f"{bench.cfg.max_new_tokens}, seed={bench.cfg.seed}")


def run(cfg: DictConfig) -> tuple[dict, dict]:
    if cfg.table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)}, got {cfg.table!r}")
    known = sorted(path.stem for path in (CONFIGS / "sampler").glob("*.yaml"))
    if unknown := [name for name in cfg.samplers if name not in known]:  # before the policy loads
        raise ValueError(f"samplers must be configs/sampler/ names {known}, got {unknown}")
    bench = Bench(cfg)
    table = TABLES[cfg.table](bench)
    stem = Path(cfg.out_dir) / cfg.name
    write_table(table.rows, stem, header(bench))
    if table.groups:
        write_table(table.groups, stem.with_name(stem.name + "_groups"), header(bench))
    plot_gantts(bench.traces, stem)
    if table.plot is not None:
        table.plot(table.rows, stem)
    return {}, {"stem": stem}


@hydra.main(config_path="../configs", config_name="bench.yaml", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = run_reporting_errors(run, cfg)
    if result is not None:
        print(result[1]["stem"].with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
