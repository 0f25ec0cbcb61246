"""Scale-out table: one process against DDP against FSDP2 (gathered weights, layer by layer).

    python -m bench.scale_out                      # SmolLM2, 2 CPU processes, 3 steps each
    python -m bench.scale_out --steps 2 --extra policy=tiny --out /tmp/scale_out

Each setting is a `train.py` run (a subprocess, as a user runs it) on the same global batch:
one process takes `--prompts` prompts, two ranks take half each. Per setting the table gives
the mean step, sampling and update time per step (the module's `time/*` scalars), rank 0's
peak sampling memory above the phase start (`memory/peak_sampling_gb`), each rank's peak RSS
during training (sampled every 5 ms from the first step, after sharding) and the collectives
of one step, counted by `CollectiveCounter` from outside the code under test. Writes
`<out>.{md,csv}` and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (overrides, ranks)
    "one process": ([], 1),
    "ddp": (["trainer=ddp"], 2),
    "fsdp, gathered": (["trainer=fsdp"], 2),
    "fsdp, layer by layer": (["trainer=fsdp", "sampler.gather_weights=false"], 2),
}
PREFIXES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")


class CollectiveCounter(pl.Callback):
    """Counts the collectives each training phase ("sampling", "update") issues on this rank:
    every call of a `torch.distributed` function named all_gather*, reduce_scatter*,
    all_reduce* or broadcast* (the module's attributes are wrapped, so it sees what FSDP and
    Lightning call; nested calls count once), and DDP's gradient buckets through a DDP
    communication hook (`ddp_buckets`: DDP reduces in C++ without a Python call).
    Writes `<dirpath>/collectives_rank<r>.json`: {phase: [{name: count}, one per phase run]}.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.records: dict[str, list[dict[str, int]]] = {}
        self.current: dict[str, int] | None = None
        self.depth, self.saved = 0, {}

    def count(self, name: str) -> None:
        if self.current is not None:
            self.current[name] = self.current.get(name, 0) + 1

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        import torch.distributed as dist

        for name in dir(dist):
            fn = getattr(dist, name)
            if name.startswith(PREFIXES) and callable(fn) and name not in self.saved:
                self.saved[name] = fn
                setattr(dist, name, self.wrap(name, fn))

    def wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.depth == 0:
                self.count(name)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
            def hook(state, bucket):  # noqa: ANN001 - DDP checks any annotation it finds
                self.count("ddp_buckets")
                return default_hooks.allreduce_hook(state, bucket)
            trainer.model.register_comm_hook(None, hook)

    def on_phase_start(self, trainer: pl.Trainer, pl_module: Any, name: str) -> None:
        self.current = {}
        self.records.setdefault(name, []).append(self.current)

    def on_phase_end(self, trainer: pl.Trainer, pl_module: Any, name: str) -> None:
        self.current = None

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        import torch.distributed as dist

        for name, fn in self.saved.items():
            setattr(dist, name, fn)
        self.saved = {}
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"collectives_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.records))


class PeakRSS(pl.Callback):
    """This rank's resident memory from the first training batch on (after FSDP sharded the
    model), sampled every 5 ms: `<dirpath>/rss_rank<r>.json` with `start_gb` and `peak_gb`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.start = self.peak = 0
        self.running = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        import psutil

        from callbacks.memory import release_cpu_memory

        release_cpu_memory()  # what the full model held before sharding goes back to the OS
        process = psutil.Process()
        self.start = self.peak = process.memory_info().rss
        self.running = True

        def poll() -> None:
            while self.running:
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.005)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.running = False
        self.thread.join()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rss_rank{trainer.global_rank}.json").write_text(json.dumps(
            {"start_gb": self.start / 2**30, "peak_gb": self.peak / 2**30}))


def run_setting(name: str, overrides: list[str], ranks: int, args: argparse.Namespace,
                out: Path) -> dict[str, Any]:
    from entry.summary import mean, read_scalars

    run_dir = out / name.replace(", ", "_").replace(" ", "_")
    prompts = args.prompts // ranks
    command = [sys.executable, "train.py", *overrides, "trainer.accelerator=cpu",
               f"data.batch_size={prompts}", f"model.group_size={args.group_size}",
               f"model.max_new_tokens={args.max_new_tokens}", f"sampler={args.sampler}",
               f"sampler.micro_group_size={args.slots}", f"trainer.max_steps={args.steps}",
               "trainer.val_check_interval=1000", "callbacks.value_monitor=null",
               "callbacks.model_checkpoint=null",
               "+callbacks.count._target_=bench.scale_out.CollectiveCounter",
               f"+callbacks.count.dirpath={run_dir}",
               "+callbacks.rss._target_=bench.scale_out.PeakRSS",
               f"+callbacks.rss.dirpath={run_dir}",
               "logger=csv", *args.extra, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-3000:]}")
    scalars = read_scalars(run_dir)
    per_step = {k: mean([v for _, v in scalars.get(k, [])][1:] or  # first step warms up
                         [v for _, v in scalars.get(k, [])])
                for k in ("time/step_s", "time/sampling_s", "time/update_s",
                          "memory/peak_sampling_gb")}
    counts = json.loads((run_dir / "collectives_rank0.json").read_text())
    rss = [json.loads((run_dir / f"rss_rank{r}.json").read_text()) for r in range(ranks)]

    def per_phase(phase: str, names: tuple[str, ...]) -> float:
        runs = counts.get(phase, [])
        return sum(sum(r.get(n, 0) for n in names) for r in runs) / max(1, len(runs))

    return {
        "setting": name, "ranks": ranks, "prompts/rank": prompts,
        "step_s": per_step["time/step_s"], "sampling_s": per_step["time/sampling_s"],
        "update_s": per_step["time/update_s"],
        "peak_sampling_gb": per_step["memory/peak_sampling_gb"],
        "rss_start_gb": max(r["start_gb"] for r in rss),
        "rss_peak_gb": max(r["peak_gb"] for r in rss),
        "sampling_all_gathers": per_phase("sampling", ("all_gather_single",
                                                       "all_gather_into_tensor", "all_gather")),
        "sampling_all_reduces": per_phase("sampling", ("all_reduce",)),
        "update_reduce_scatters": per_phase("update", ("reduce_scatter_single",
                                                       "reduce_scatter_tensor")),
        "update_all_gathers": per_phase("update", ("all_gather_single",
                                                   "all_gather_into_tensor")),
        "update_ddp_buckets": per_phase("update", ("ddp_buckets",)),
        "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="global batch (prompts)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampler", default="continuous")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "scale_out"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for name in args.settings:
        overrides, ranks = SETTINGS[name]
        rows.append(run_setting(name, overrides, ranks, args, out))
        print(f"{name}: {rows[-1]}", flush=True)
    from common.tables import write_table

    write_table(rows, out, f"`python -m bench.scale_out {' '.join(argv or sys.argv[1:])}`")
    print((out.with_suffix(".md")).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
