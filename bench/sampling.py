"""Tables A, B, E and throughput: samplers compared on the same prompts, model and spec.

    python -m bench table=memory                          # Table A
    python -m bench table=sweep 'samplers=[micro,continuous]'   # Table B
    python -m bench table=throughput                      # tokens/s, with generate_batch
    python -m bench table=dynamic num_prompts=4 group_size=8    # Table E

The samplers of A, B and throughput are `samplers=` (names of configs/sampler/ files; the
defaults per table are `table_samplers` in configs/bench.yaml). A sampler with slots
(`micro_group_size` in its config) runs at each m of the table; one without (`full`,
`hf_generate`) decodes all G rows at once and runs once per G.
"""
from __future__ import annotations

import time
from pathlib import Path

from transformers import GenerationConfig

from bench.core import Bench, Row, Table, has_slots, make_sampler
from common.units import GB
from callbacks.memory import PeakMemory


def table_memory(b: Bench) -> Table:
    """Table A: each sampler at (G, m); those with slots also over the `memory_sweep` m."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    weights = b.weight_bytes / GB  # peak_gb is above the weights; + weights_gb = the whole
    rows = []
    for name in b.cfg.samplers:
        if not has_slots(name):
            sampler = make_sampler(name)
            rows.append(b.measure(name, sampler, g, floor_gb=b.floor_gb(g, sampler),
                                  weights_gb=weights))
            continue
        for slots in sorted({m, *b.cfg.memory_sweep}):
            sampler = make_sampler(name, micro_group_size=slots)
            rows.append(b.measure(name, sampler, g, slots, floor_gb=b.floor_gb(slots, sampler),
                                  weights_gb=weights))
    return Table(rows)


def table_sweep(b: Bench) -> Table:
    """Table B: G x m for each sampler; peak memory should be flat in G for those with slots."""
    rows = []
    for name in b.cfg.samplers:
        slotted = has_slots(name)
        for m in b.cfg.sweep.slots:
            if not slotted and m != b.cfg.sweep.slots[0]:
                continue  # no slots: one run per G
            for g in b.cfg.sweep.group_sizes:
                sampler = make_sampler(name, micro_group_size=m) if slotted else make_sampler(name)
                rows.append(b.measure(name, sampler, g, m if slotted else None))
    return Table(rows, plot=plot_sweep)


def plot_sweep(rows: list[Row], stem: Path) -> None:
    """Peak sampling memory against G, one line per (sampler, m): <stem>.png."""
    import matplotlib.pyplot as plt

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


def table_throughput(b: Bench) -> Table:
    """Tokens/s at (G, m): each sampler, then transformers' own continuous batching."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    rows = [b.measure(name, make_sampler(name, micro_group_size=m), g, m) if has_slots(name)
            else b.measure(name, make_sampler(name), g) for name in b.cfg.samplers]
    rows.append(generate_batch_row(b, g))
    return Table(rows)


def generate_batch_row(b: Bench, group_size: int) -> Row:
    """transformers' own continuous batching (`model.generate_batch`) on the same requests."""
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


def table_dynamic(b: Bench) -> Table:
    """Table E: Fixed-Slot vs Dynamic-Slot continuous sampling (the length bias)."""
    g, m = b.cfg.group_size, b.cfg.micro_group_size
    return Table([b.measure(f"continuous {mode}",
                            make_sampler("continuous", micro_group_size=m, mode=mode), g, m)
                  for mode in ("fixed", "dynamic")])
