"""Sampler benchmark (no training): Markdown + CSV tables and PNG plots from the same configs.

    python bench.py table=memory                     # Table A: full vs micro (G=32, m=8) + m sweep
    python bench.py table=sweep                      # Table B: G x m for micro and continuous
    python bench.py table=throughput                 # full vs hf_generate, continuous vs micro
                                                     #   vs transformers' generate_batch
    python bench.py table=dynamic data=gsm8k num_prompts=4 group_size=8   # Table E
    python bench.py table=memory data=chat           # any data / policy config group works
    python bench.py table=record|predictor|scheduler # Tables D and C (see bench_lengths.py)

Outputs go to bench_results/<table>_<data>.{md,csv} (+ .png). Memory is measured, not
predicted: CUDA `max_memory_allocated` above the start, CPU peak RSS above the start (sampled
every 2 ms); `kv_gb` is the sampler's own KV tensors; `floor_gb` is the analytical minimum of
the engine samplers (KV of m slots + prompt KV + logits buffers).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from callbacks.memory import GB, PeakMemory  # noqa: E402
from callbacks.plots import gantt_figure  # noqa: E402
from modules.rewards import gsm8k_reward  # noqa: E402
from samplers.base import GenerationSpec  # noqa: E402
from samplers.continuous import ContinuousSampler  # noqa: E402
from samplers.engine import predict_peak_bytes  # noqa: E402
from samplers.full import FullSampler  # noqa: E402
from samplers.hf_generate import HFGenerateSampler  # noqa: E402
from samplers.micro import MicroSampler  # noqa: E402
from samplers.scheduling import steps_lower_bound  # noqa: E402
from bench_lengths import table_predictor, table_record, table_scheduler  # noqa: E402

log = logging.getLogger("bench")


class Bench:
    """Model, prompts and spec shared by every measurement of one bench run."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        policy = hydra.utils.instantiate(cfg.policy)
        self.model, self.tokenizer = policy.model.eval(), policy.tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        data = hydra.utils.instantiate(cfg.data, tokenizer=self.tokenizer,
                                       batch_size=cfg.num_prompts)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        self.prompts, self.answers = batch["prompt_ids"], batch["answer"]
        self.spec = GenerationSpec(cfg.max_new_tokens, temperature=cfg.temperature,
                                   eos_token_ids=policy.eos_token_ids, seed=cfg.seed)
        self.weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.traces: dict[str, Any] = {}
        FullSampler().sample(self.model, self.prompts[:1], 2, GenerationSpec(4))  # warm-up

    def measure(self, name: str, sampler: Any, group_size: int, slots: int | None = None,
                prompts: list[list[int]] | None = None, **extra: Any) -> dict[str, Any]:
        prompts = self.prompts if prompts is None else prompts
        if self.cfg.warmup:  # one round of the same shapes first: no first-call allocations
            sampler.sample(self.model, prompts[:1], min(group_size, slots or group_size),
                           self.spec)
        with PeakMemory(self.device) as meter:
            rollouts = sampler.sample(self.model, prompts, group_size, self.spec)
        stats, lengths = rollouts.stats, rollouts.lengths.tolist()
        m = slots or stats.max_concurrency
        row = dict(sampler=name, G=group_size, m=m, peak_gb=meter.peak_bytes / GB,
                   kv_gb=stats.peak_kv_bytes / GB, avg_len=sum(lengths) / len(lengths),
                   steps=stats.decoding_steps, lb=steps_lower_bound(lengths, m),
                   wall_s=stats.wall_time_s, tok_s=stats.generated_tokens / stats.wall_time_s,
                   truncated=float((~rollouts.finished).float().mean()), **extra)
        if self.answers[0] is not None and prompts is self.prompts:
            texts = self.tokenizer.batch_decode(
                [ids[:n].tolist() for ids, n in zip(rollouts.completion_ids, rollouts.lengths)],
                skip_special_tokens=True)
            owners = rollouts.prompt_index.tolist()
            row["reward"] = sum(gsm8k_reward(texts, [self.answers[p] for p in owners])) / len(texts)
        if stats.steps_lower_bound is not None:  # infinite: the bound of its decode phase
            row.update(probe_steps=stats.probe_steps, lb=stats.steps_lower_bound,
                       total_steps=stats.probe_steps + stats.decoding_steps)
        if stats.slot_trace:
            self.traces[f"{name} m={m}"] = (stats.slot_trace, stats.decoding_steps)
        log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        return row

    def floor_gb(self, slots: int) -> float:
        return (predict_peak_bytes(self.model, self.prompts, self.spec, slots) - self.weights) / GB


def table_memory(b: Bench) -> list[dict]:
    """Table A: full vs micro at (G, m), then micro over the m sweep."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    rows = [b.measure("full", FullSampler(), g, g, floor_gb=b.floor_gb(g))]
    for slots in sorted({m, *b.cfg.memory_sweep}):
        rows.append(b.measure("micro", MicroSampler(slots), g, slots, floor_gb=b.floor_gb(slots)))
    return rows


def table_sweep(b: Bench) -> list[dict]:
    """Table B: G x m for the engine samplers; peak memory should be flat in G."""
    make = {"micro": MicroSampler, "continuous": ContinuousSampler,
            "full": lambda m: FullSampler()}
    rows = []
    for name in b.cfg.samplers:
        for m in b.cfg.sweep.slots:
            for g in b.cfg.sweep.group_sizes:
                if name == "full" and m != b.cfg.sweep.slots[0]:
                    continue
                rows.append(b.measure(name, make[name](m), g, g if name == "full" else m))
    return rows


def table_throughput(b: Bench) -> list[dict]:
    """Tokens/s at (G, m): ours vs the peers a user would otherwise run."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    rows = [b.measure("hf_generate", HFGenerateSampler(), g, g),
            b.measure("full", FullSampler(), g, g),
            b.measure("micro", MicroSampler(m), g, m),
            b.measure("continuous", ContinuousSampler(m), g, m)]
    rows.append(generate_batch_row(b, g))
    return rows


def generate_batch_row(b: Bench, group_size: int) -> dict[str, Any]:
    """transformers' own continuous batching (`model.generate_batch`) on the same requests."""
    import time

    from transformers import GenerationConfig

    inputs = [p for p in b.prompts for _ in range(group_size)]
    eos = list(b.spec.eos_token_ids)
    config = GenerationConfig(max_new_tokens=b.spec.max_new_tokens, do_sample=True,
                              temperature=b.spec.temperature, top_k=None, top_p=None,
                              eos_token_id=eos, pad_token_id=eos[0])
    start = time.perf_counter()
    with PeakMemory(b.device) as meter:
        out = b.model.generate_batch(inputs=inputs, generation_config=config)
    wall = time.perf_counter() - start
    lengths = [len(o.generated_tokens) for o in out.values()]
    return dict(sampler="hf_generate_batch", G=group_size, m=None, peak_gb=meter.peak_bytes / GB,
                kv_gb=None, avg_len=sum(lengths) / len(lengths), steps=None, lb=None,
                wall_s=wall, tok_s=sum(lengths) / wall, truncated=None)


def table_dynamic(b: Bench) -> list[dict]:
    """Table E: Fixed-Slot vs Dynamic-Slot continuous sampling (the length bias)."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    return [b.measure("continuous fixed", ContinuousSampler(m, mode="fixed"), g, m),
            b.measure("continuous dynamic", ContinuousSampler(m, mode="dynamic"), g, m)]


TABLES: dict[str, Callable[[Bench], list[dict]]] = {
    "memory": table_memory, "sweep": table_sweep, "throughput": table_throughput,
    "dynamic": table_dynamic, "record": table_record, "predictor": table_predictor,
    "scheduler": table_scheduler}


def write(rows: list[dict], stem: Path, header: str) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(b: Bench, rows: list[dict], stem: Path) -> None:
    import matplotlib.pyplot as plt

    if b.traces:
        for label, (trace, steps) in b.traces.items():
            fig = gantt_figure(trace, f"{label}: {steps} decoding steps")
            fig.savefig(f"{stem}_gantt_{label.replace(' ', '_').replace('=', '')}.png", dpi=90)
            plt.close(fig)
    if b.cfg.table == "sweep":
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted({(r["sampler"], r["m"]) for r in rows}):
            points = [(r["G"], r["peak_gb"]) for r in rows if (r["sampler"], r["m"]) == key]
            ax.plot(*zip(*points), marker="o", label=f"{key[0]} m={key[1]}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="group size G", ylabel="peak sampling memory above weights (GiB)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}.png", dpi=90)
        plt.close(fig)


@hydra.main(version_base="1.3", config_path="configs", config_name="bench.yaml")
def main(cfg: DictConfig) -> None:
    if cfg.table not in TABLES:
        raise SystemExit(f"error: table must be one of {sorted(TABLES)}, got {cfg.table!r}")
    bench = Bench(cfg)
    rows = TABLES[cfg.table](bench)
    stem = Path(cfg.out_dir) / cfg.name
    overrides = " ".join(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    header = (f"`python bench.py {overrides}`"
              f" on {bench.device} ({torch.get_num_threads()} threads): B={len(bench.prompts)}, "
              f"prompt tokens={[len(p) for p in bench.prompts]}, max_new_tokens="
              f"{cfg.max_new_tokens}, seed={cfg.seed}")
    write(rows, stem, header)
    if getattr(bench, "extra_csv", None):  # per-group rows behind a summary table
        write(bench.extra_csv, stem.with_name(stem.name + "_groups"), header)
    plot(bench, rows, stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
