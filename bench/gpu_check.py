"""The GPU check: one command, offline, on one CUDA device, one Markdown report.

    make gpu-check                                  # = python -m bench.gpu_check
    python -m bench.gpu_check --parts tables,throughput --out /tmp/check
    python -m bench.gpu_check --dry-run             # the same parts at toy sizes, on the CPU

Each part is a subprocess (a failing part is reported, the next part still runs); every model
is a random-init one at a real shape or the offline SmolLM2, so nothing is downloaded:

    tests       the CUDA-marked tests (pytest -m gpu)
    samplers    train.py, every sampler x every precision (32-true, bf16-mixed, bf16-true,
                16-mixed) on a tiny policy, 3 steps each, on CUDA
    experiment  experiment=gsm8k_qwen3 at the Qwen3-1.7B shape (G=32, 1024 new tokens, bf16-true,
                gradient checkpointing), offline prompts, 2 steps: its logged peak memory
    tables      Table A at the Qwen3-1.7B shape in bf16: B=1, G=32, m=8, 512 new tokens, full,
                micro, continuous, infinite; peak memory from torch.cuda against the floor
    throughput  tokens/s of hf_generate, full, micro, continuous and transformers'
                generate_batch at that shape
    decode      ms per decode step of the engine against a bare transformers forward loop on the
                same 32 rows (the step must cost no more than 2x the bare forward)
    default     the offline default run (python train.py) on the GPU

The report, `<out>/gpu_check.md`, has the device, versions and commit, pass/fail and seconds
per part, each part's table, and the paper's figures beside ours. Random weights never end a
completion, so every sample runs to max_new_tokens: memory and speed at full shape, not
scheduling or learning. Needs no `.venv`: any Python with torch (CUDA) and the project's other
requirements (`make gpu-install`).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
SAMPLERS = ("hf_generate", "full", "micro", "continuous", "infinite")
PARTS = ("tests", "samplers", "experiment", "tables", "throughput", "decode", "default")
PAPER = ("The paper (Qwen3-1.7B, GSM8K, G=32, 1024 new tokens): peak memory 21.55 GB decoding "
         "the full group at once, 10.64 GB in micro groups.")


@dataclass
class Sizes:
    """What each part runs at: the real check, or the CPU dry run of its plumbing."""
    shape: str = "Qwen/Qwen3-1.7B"
    group_size: int = 32
    slots: int = 8
    table_tokens: int = 512
    experiment_tokens: int = 1024
    accelerator: str = "gpu"
    tiny: list[str] = field(default_factory=lambda: [
        "policy=tiny", "data=arithmetic", "data.source.size=64", "data.val_size=4",
        "data.batch_size=2", "data.val_batch_size=2", "model.group_size=8",
        "model.max_new_tokens=32", "trainer.val_check_interval=3", "logger=csv"])
    default_run: list[str] = field(default_factory=list)


DRY_RUN = Sizes(shape="qwen3-tiny", group_size=4, slots=2, table_tokens=8, experiment_tokens=8,
                accelerator="cpu", default_run=["trainer.max_steps=2", "policy=tiny",
                                                "callbacks.value_monitor=null"])


@dataclass
class Part:
    name: str
    command: list[str]
    tables: list[Path]  # Markdown files the part writes, copied into the report as they are
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def python() -> list[str]:
    return [sys.executable]


def bench(table: str, sizes: Sizes, out: Path, *extra: str) -> list[str]:
    return [*python(), "-m", "bench", f"table={table}", "policy=shape",
            f"policy.name_or_path={sizes.shape}", "policy.dtype=bfloat16", "num_prompts=1",
            f"group_size={sizes.group_size}", f"micro_group_size={sizes.slots}",
            f"max_new_tokens={sizes.table_tokens}", f"out_dir={out}", f"name={table}",
            f"hydra.run.dir={out}/hydra/{table}", *extra]


def parts(sizes: Sizes, out: Path) -> list[Part]:
    """Every part's command; the tables each one leaves under `out`."""
    runs = out / "runs"
    train = [*python(), "train.py"]
    return [
        Part("tests", [*python(), "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
             []),
        Part("samplers", [*train, "-m", *sizes.tiny, f"trainer.accelerator={sizes.accelerator}",
                          "trainer.max_steps=3", f"sampler={','.join(SAMPLERS)}",
                          f"trainer.precision={','.join(PRECISIONS)}",
                          f"hydra.sweep.dir={runs}/samplers"],
             []),
        Part("experiment", [*train, "experiment=gsm8k_qwen3", "policy=shape",
                            f"policy.name_or_path={sizes.shape}",
                            "data.source.source=gsm_symbolic",
                            f"trainer.accelerator={sizes.accelerator}", "trainer.max_steps=2",
                            f"model.group_size={sizes.group_size}",
                            f"model.max_new_tokens={sizes.experiment_tokens}",
                            # memory, not a resumable run: no ~10 GB weights + AdamW checkpoint
                            "callbacks.model_checkpoint=null",
                            f"hydra.run.dir={runs}/experiment"],
             []),
        Part("tables", bench("memory", sizes, out, "memory_sweep=[]",
                             "samplers=[full,micro,continuous,infinite]"), []),
        Part("throughput", bench("throughput", sizes, out), [out / "throughput.md"]),
        Part("decode", bench("prompt_kv", sizes, out, "prompt_kv.few_shot=[0]",
                             "prompt_kv.samplers=[]", "prompt_kv.budget_gb=null",
                             "prompt_kv.repeats=3"),
             [out / "prompt_kv.md"]),
        Part("default", [*train, f"trainer.accelerator={sizes.accelerator}",
                         *sizes.default_run, f"hydra.run.dir={runs}/default"],
             []),
    ]


def run_part(part: Part, timeout: int, log: Path) -> None:
    """Run one part, keep its output in `log`, note pass/fail, seconds and the output's end."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        with open(log, "w") as handle:
            handle.write("$ " + shlex.join(part.command) + "\n")
            handle.flush()
            code = subprocess.run(part.command, cwd=ROOT, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        part.status = "pass" if code == 0 else f"fail (exit {code})"
    except subprocess.TimeoutExpired:
        part.status = f"fail (over {timeout} s)"
    part.seconds = time.perf_counter() - start
    lines = [line.split("\r")[-1] for line in log.read_text(errors="replace").splitlines()]
    part.tail = "\n".join(line for line in lines[-15:] if line.strip())


def run_summary(out: Path, name: str) -> None:
    """`bench.report` over a train.py run dir: its row of logged means as `<out>/<name>.md`."""
    subprocess.run([*python(), "-m", "bench.report", str(out / "runs" / name), "--out",
                    str(out / name)], cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    produced = out / name / "summary.md"
    if produced.is_file():
        (out / f"{name}.md").write_text(produced.read_text())


def environment() -> list[str]:
    """Device, versions and commit, one bullet each."""
    import torch

    lines = [f"- python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), {versions()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append("- device: none (CPU dry run)")
    lines.append(f"- commit: {commit()}")
    return lines


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("transformers", "lightning", "hydra-core"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("GRPO_COMMIT", "unknown (no git)")
    if head.returncode != 0:
        return os.environ.get("GRPO_COMMIT", "unknown (no git repository)")
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def number(text: str, digits: int = 3) -> str:
    try:
        return f"{float(text):.{digits}g}"
    except (TypeError, ValueError):
        return text or ""


def override(overrides: str, key: str) -> str:
    found = re.search(rf"(?:^|,){re.escape(key)}=([^,]+)", overrides)
    return found.group(1) if found else "default"


RUN_COLUMNS = ("status", "steps", "step s", "sampling s", "update s", "tokens/s",
               "peak sampling GB", "KV peak GB")


def sampler_matrix(out: Path) -> str:
    """The samplers sweep as precision x sampler rows (from its summary.csv)."""
    rows = read_csv(out / "runs" / "samplers" / "summary.csv")
    body = [[override(r["overrides"], "trainer.precision"), override(r["overrides"], "sampler"),
             *(number(r.get(c, "")) if c != "status" else r["status"] for c in RUN_COLUMNS)]
            for r in rows]
    return markdown(["precision", "sampler", *RUN_COLUMNS], body) if body else ""


def run_table(out: Path, name: str) -> str:
    """A train.py run's logged means (bench.report's row), the columns that matter here."""
    rows = read_csv(out / name / "summary.csv")
    columns = (*RUN_COLUMNS, "reward first 5", "reward last 5", "val accuracy (last)")
    body = [[number(r.get(c, "")) if c != "status" else r["status"] for c in columns]
            for r in rows]
    return markdown(list(columns), body) if body else ""


def table_a(out: Path, tokens: int) -> str:
    """Table A with the whole peak (weights included), as the paper counts it."""
    rows = read_csv(out / "memory.csv")
    if not rows:
        return ""
    body = []
    for r in rows:
        weights = float(r["weights_gb"])
        body.append([r["sampler"], r["G"], r["m"], number(str(float(r["peak_gb"]) + weights)),
                     number(r["peak_gb"]), number(r["floor_gb"]), number(r["kv_gb"]),
                     number(r["weights_gb"]), r.get("total_steps") or r["steps"],
                     number(r["tok_s"])])
    header = ["sampler", "G", "m", "peak GiB with weights", "peak above weights",
              "floor above weights", "KV GiB", "weights GiB", "decoding steps (probe incl.)",
              "tokens/s"]
    return (markdown(header, body) + f"\n\nOurs at {tokens} new tokens per sample, every sample"
            " running to the cap (random weights); the paper's figures are at 1024.")


def decode_ratio(out: Path) -> str:
    """The engine's ms per step over the bare forward loop's on the same rows (table decode)."""
    path = out / "prompt_kv.csv"
    if not path.is_file():
        return ""
    rows = {r["sampler"]: float(r["ms_per_step"]) for r in csv.DictReader(open(path))
            if r.get("ms_per_step")}
    lines = []
    for label, ms in rows.items():
        if label.startswith("engine shared"):
            batch = label.split()[-1]
            bare = rows.get(f"bare forward sampled {batch}")
            if bare:
                verdict = "within" if ms <= 2 * bare else "ABOVE"
                lines.append(f"- {batch}: engine {ms:.2f} ms per step, bare forward {bare:.2f} "
                             f"ms: {ms / bare:.2f}x ({verdict} the 2x limit)")
    return "\n".join(lines)


def report(results: list[Part], out: Path, sizes: Sizes, total: float) -> str:
    lines = ["# GPU check", "", f"`{shlex.join([sys.executable, '-m', 'bench.gpu_check'])}` "
             f"(shape {sizes.shape}, G={sizes.group_size}, m={sizes.slots}, "
             f"{sizes.table_tokens} new tokens in the tables), {total:.0f} s in all", "",
             *environment(), "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} |" for p in results]
    lines += ["", PAPER, ""]
    for part in results:
        lines += [f"## {part.name}", "", "```", "$ " + shlex.join(part.command), "```", ""]
        rendered = {"samplers": lambda: sampler_matrix(out),
                    "experiment": lambda: run_table(out, "experiment"),
                    "default": lambda: run_table(out, "default"),
                    "tables": lambda: table_a(out, sizes.table_tokens),
                    "decode": lambda: decode_ratio(out)}.get(part.name, lambda: "")()
        if part.name == "samplers" and sizes.accelerator == "cpu":
            rendered += "\n\nOn a CPU Lightning runs 16-mixed as bf16-mixed."
        if rendered:
            lines += [rendered, ""]
        for table in part.tables:
            if table.is_file():
                lines += [table.read_text(), ""]
        if part.status != "pass" and part.tail:
            lines += ["The end of its output:", "", "```", part.tail, "```", ""]
    return "\n".join(lines)


def requirements_but_torch() -> list[str]:
    """pyproject's dependencies and test extras without torch, whose CUDA build the GPU machine
    already has (pyproject pins the CPU wheel this project tests with)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    return [r for r in wanted if re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] != "torch"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench_results/gpu_check (a dry run: bench_results/tmp/)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per part")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on the CPU: checks the plumbing, measures nothing")
    parser.add_argument("--requirements", action="store_true",
                        help="print the project's requirements but torch (make gpu-install)")
    args = parser.parse_args(argv)
    if args.requirements:
        print(" ".join(requirements_but_torch()))
        return 0
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in chosen if p not in PARTS]:
        print(f"error: --parts must be among {','.join(PARTS)}, got {','.join(unknown)}")
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False); "
              "`python -m bench.gpu_check --dry-run` runs the parts at toy sizes on the CPU")
        return 2
    sizes = DRY_RUN if args.dry_run else Sizes()
    default = ROOT / "bench_results" / ("tmp/gpu_check_dry_run" if args.dry_run else "gpu_check")
    out = (args.out or default).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for part in parts(sizes, out):
        if part.name not in chosen:
            continue
        print(f"[gpu-check] {part.name}: {shlex.join(part.command)}", flush=True)
        run_part(part, args.timeout, out / "logs" / f"{part.name}.log")
        if part.name in ("experiment", "default"):
            run_summary(out, part.name)
        print(f"[gpu-check] {part.name}: {part.status} in {part.seconds:.0f} s", flush=True)
        results.append(part)
    text = report(results, out, sizes, time.perf_counter() - start)
    (out / "gpu_check.md").write_text(text + "\n")
    print(f"[gpu-check] report: {out / 'gpu_check.md'}")
    return 0 if all(p.status == "pass" for p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
