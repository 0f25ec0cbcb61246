"""Decode engine over a transformers causal LM: prefill once, slot KV cache, step, refill.

The engine owns m slot rows of KV memory (samplers/kv.py). Each prompt is prefilled once (with
`logits_to_keep=1`) and its KV kept in a store. Where a prompt's KV lives is the layout's
business (samplers/layout.py, `prompt_kv`): `shared` keeps it once in the store and merges it
into the decode attention; `copied` copies it into the first columns of each of its rows.
Positions and the float 0/-inf masks are per row (sliding-window layers get their own), so rows
of different prompts and ages decode side by side. A finished slot is refilled at the next
step with whatever the queue hands out, without any new prompt prefill.

One step = one batched forward + one token for every running row:

    queue.admit(free slots)  ->  sample a token per running row  ->  retire finished rows
    -> forward the surviving rows' tokens (running rows are kept dense in rows [0, n))

Invariant: a running row r holding sample (i, j) with t tokens has exactly t valid completion
KV columns (after its P_i prompt columns when copied) and its next token is drawn with
`uniforms(seed, i, j, t)`, so a sample's tokens do not depend on its slot, its neighbours or
when it started (schedule invariance).

Queues decide *which* sample runs *when* (samplers/full.py, micro.py, continuous.py):
`admit(free, running) -> [(i, j), ...]`, `on_finished(i, j) -> [(i, j) to cancel]`, and
`remaining(i) -> samples of prompt i still to admit`.

Parking (samplers/infinite.py): a queue with a `quantum` q (`StreamQueue`) is shown, after
each step's forward, the rows whose KV has just reached a multiple of q completion tokens
(`boundary(rows)`), and names the ones to park. A parked row leaves the slot with its
completion KV, its tokens, its next-token logits and its hidden state (a `Suspended` state
kept by the run). When the queue admits that sample again it is placed with all of that and
draws its next token at once, so it goes on exactly as if it had never left (same tokens, same
streams) and parking costs no step.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from common.compat import cache_keyword
from samplers.base import (GenerationSpec, Rollouts, SamplingStats, decoding_mode, pack_rollouts,
                           sample_tokens, uniforms)
from samplers.kv import PromptKV, SlotCache, Suspended, kv_geometry, prefill
from samplers.layout import KVLayout
from samplers.prefix_attention import layer_windows
from samplers.scheduling import BoundaryRow

SampleId = tuple[int, int]  # (prompt index, sample index)

# CPU BLAS runs an [n, H] x [H, V] product as 4-row blocks plus one matrix-vector product per
# left-over row, each reading the whole weight: SmolLM2's output head (V = 49152) costs 11 ms at
# 1 row, 36 ms at 3 and 7 rows, 19 ms at 4 and 17 ms at 8 (2 cores). Rows retire one by one, so
# the engine pads the head's input to a multiple of HEAD_ROWS rows on CPU (padded_head).
HEAD_ROWS = 4


class Queue(Protocol):
    def admit(self, free: int, running: int) -> list[SampleId]: ...
    def on_finished(self, sample: SampleId) -> list[SampleId]: ...
    def remaining(self, prompt: int) -> int: ...


@dataclass
class EngineResult:
    """The samples of one engine run and its statistics (written as it runs)."""
    completions: dict[SampleId, list[int]] = field(default_factory=dict)  # tokens incl. EOS
    finished: dict[SampleId, bool] = field(default_factory=dict)  # True = ended with EOS
    finish_order: list[SampleId] = field(default_factory=list)
    cancelled: list[SampleId] = field(default_factory=list)
    stats: SamplingStats = field(default_factory=SamplingStats)


class DecodeEngine:
    """Decodes the samples a queue hands out on `slots` rows; see the module docstring.

    `store` shares prefilled prompts between runs (the caller owns it: prompts are then never
    dropped by the engine); `capture_hidden` keeps each row's last hidden state (shown to a
    parking queue at a sample's first boundary).
    """

    def __init__(self, model: Any, prompts: list[list[int]], spec: GenerationSpec,
                 slots: int, layout: KVLayout, store: dict[int, PromptKV] | None = None,
                 capture_hidden: bool = False) -> None:
        self.model, self.prompts, self.spec, self.slots = model, prompts, spec, slots
        self.layout = layout
        self.cache_keyword = cache_keyword(model)
        self.device = next(model.parameters()).device
        self.capacity = layout.capacity(max(map(len, prompts)), spec.max_new_tokens)
        self.eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=self.device)
        self.reach = max(map(len, prompts)) + spec.max_new_tokens  # positions are < reach
        # windowed masks are needed only where a window is shorter than the sequence
        self.windowed = any(w is not None and w < self.reach
                            for w in layer_windows(model.config))
        self.shared_store = store
        self.capture_hidden = capture_hidden

    def run(self, queue: Queue) -> EngineResult:
        start = time.perf_counter()
        rows = HEAD_ROWS if self.device.type == "cpu" else 1
        with decoding_mode(self.model), padded_head(self.model, rows):
            return _Run(self, queue).loop(start)


class Rows:
    """The per-row state of a run: every table's dim 0 is a slot row. `move(src, dst)` copies
    row src into row dst in all of them at once, so a new per-row table added to `tables`
    moves (and frees) with the others."""

    def __init__(self, slots: int, max_new_tokens: int, device: torch.device) -> None:
        long = dict(dtype=torch.long, device=device)
        self.sample: list[SampleId | None] = [None] * slots
        self.started = [0] * slots  # the step each row's sample was placed
        self.prompt_len = torch.zeros(slots, **long)
        self.generated = torch.zeros(slots, **long)  # tokens so far
        self.prompt_id = torch.zeros(slots, **long)
        self.sample_id = torch.zeros(slots, **long)
        self.tokens = torch.zeros(slots, max_new_tokens, **long)
        self.tables: list[Any] = [self.sample, self.started, self.prompt_len, self.generated,
                                  self.prompt_id, self.sample_id, self.tokens]

    def add(self, *tables: Any) -> None:
        """More per-row tables (the logits, hidden states, the cache's K and V per layer)."""
        self.tables.extend(tables)

    def move(self, src: int, dst: int, *extra: torch.Tensor) -> None:
        for table in (*self.tables, *extra):
            table[dst] = table[src]


class _Run:
    """State of one engine run: the rows, prompt KV store, the result being written.

    Invariant: the running samples occupy rows [0, n) exactly; a retired row is filled by
    moving the last running row into it (one row copy per retirement), so every forward runs
    on a prefix view of the cache and finished samples cost nothing.
    """

    def __init__(self, engine: DecodeEngine, queue: Queue) -> None:
        self.e, self.queue = engine, queue
        m, dev = engine.slots, engine.device
        self.n = 0  # running rows
        self.rows = Rows(m, engine.spec.max_new_tokens, dev)
        self.slot = list(range(m))  # logical slot id of each row (what the Gantt chart shows)
        self.row_of: dict[SampleId, int] = {}
        self.keep_store = engine.shared_store is not None
        self.store: dict[int, PromptKV] = engine.shared_store if self.keep_store else {}
        self.cache: SlotCache | None = None
        self.logits: torch.Tensor | None = None  # [m, V]: next-token logits of each row
        self.hidden: torch.Tensor | None = None  # [m, H] with capture_hidden
        self.result = EngineResult(stats=SamplingStats(slots=engine.slots))
        self.parked: dict[SampleId, Suspended] = {}  # parked by the queue, until re-admitted
        self.quantum = getattr(queue, "quantum", None)
        self.stats = self.result.stats
        if self.store:
            self.allocate(next(iter(self.store.values())))

    # -------------------------------------------------------------- admission

    def prompt_kv(self, i: int) -> PromptKV:
        if i not in self.store:
            start = time.perf_counter()
            self.store[i] = prefill(self.e.model, self.e.prompts[i], self.e.device,
                                    self.e.capture_hidden)
            self.stats.prefill_time_s += time.perf_counter() - start
            self.stats.prefill_passes += 1
            self.stats.prefill_tokens += len(self.e.prompts[i])
            if self.cache is None:
                self.allocate(self.store[i])
        return self.store[i]

    def allocate(self, first: PromptKV) -> None:
        layers, heads, dim, dtype = kv_geometry(first)
        shape = (self.e.slots, heads, self.e.capacity, dim)
        make = lambda: [torch.zeros(shape, dtype=dtype, device=self.e.device)  # noqa: E731
                        for _ in range(layers)]
        self.cache = SlotCache(make(), make())
        self.logits = torch.zeros(self.e.slots, first.logits.shape[-1], device=self.e.device,
                                  dtype=first.logits.dtype)
        self.rows.add(self.logits, *self.cache.keys, *self.cache.values)
        if self.e.capture_hidden:
            self.hidden = torch.zeros(self.e.slots, first.hidden.shape[-1],
                                      device=self.e.device, dtype=first.hidden.dtype)
            self.rows.add(self.hidden)

    def place(self, sample: SampleId, step: int) -> None:
        i, j = sample
        kv = self.prompt_kv(i)
        row, length, rows = self.n, len(self.e.prompts[i]), self.rows
        start = self.e.layout.first_column(length)  # the row's first completion column
        if self.e.layout.holds_prompt():
            for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
                self.cache.keys[layer][row, :, :length] = k
                self.cache.values[layer][row, :, :length] = v
        self.logits[row] = kv.logits
        if self.hidden is not None:
            self.hidden[row] = kv.hidden
        rows.sample[row], rows.started[row], self.row_of[sample] = sample, step, row
        rows.prompt_len[row], rows.generated[row] = length, 0
        rows.prompt_id[row], rows.sample_id[row] = i, j
        state = self.parked.pop(sample, None)
        if state is not None:  # a parked sample: its KV, tokens, logits and hidden state
            k = len(state.tokens)
            for layer, (key, value) in enumerate(zip(state.keys, state.values)):
                self.cache.keys[layer][row, :, start: start + k] = key
                self.cache.values[layer][row, :, start: start + k] = value
            rows.tokens[row, :k] = torch.tensor(state.tokens, device=self.e.device)
            rows.generated[row] = k
            self.logits[row] = state.logits
            if self.hidden is not None and state.hidden is not None:
                self.hidden[row] = state.hidden
        self.n += 1

    # -------------------------------------------------------------- the loop

    def loop(self, start: float) -> EngineResult:
        step = 0
        while True:
            m = self.e.slots
            admitted = self.queue.admit(m - self.n, self.n)
            for sample in admitted:
                self.place(sample, step)
            self.track_memory()
            if admitted:  # copied: the prompts whose samples were all placed
                self.release_prompts()
            if self.n == 0:
                break
            self.stats.max_concurrency = max(self.stats.max_concurrency, self.n)
            self.decode(step)
            step += 1
        self.stats.decoding_steps = step
        self.stats.generated_tokens = sum(map(len, self.result.completions.values()))
        self.stats.wall_time_s = time.perf_counter() - start
        return self.result

    def track_memory(self) -> None:
        if self.cache is not None:
            live = self.cache.nbytes + sum(kv.nbytes for kv in self.store.values())
            live += sum(s.nbytes for s in self.parked.values())
            self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, live)

    def decode(self, step: int) -> None:
        """Sample one token for every running row, retire the finished, forward the rest."""
        spec, n, r = self.e.spec, self.n, self.rows
        t = r.generated[:n].clone()  # [n]; generated is updated in place below
        u = uniforms(spec.seed, r.prompt_id[:n], r.sample_id[:n], t)
        rows = torch.arange(n, device=self.e.device)
        next_tokens = sample_tokens(self.logits[:n], u, spec)  # [n]
        r.tokens[rows, t] = next_tokens
        r.generated[:n] = t + 1
        ended = torch.isin(next_tokens, self.e.eos) | (t + 1 >= spec.max_new_tokens)  # [n]
        feed = next_tokens.clone()
        for sample in [r.sample[k] for k in ended.nonzero().flatten().tolist()]:
            if sample in self.row_of:  # not cancelled by an earlier retirement this step
                self.retire(sample, step, feed)
        if self.n > 0:
            self.forward(feed[: self.n])
            if self.quantum:
                self.boundary(step)

    def retire(self, sample: SampleId, step: int, feed: torch.Tensor) -> None:
        row = self.row_of[sample]
        tokens = self.rows.tokens[row, : int(self.rows.generated[row])].tolist()
        self.result.completions[sample] = tokens
        self.result.finished[sample] = tokens[-1] in self.e.spec.eos_token_ids
        self.result.finish_order.append(sample)
        self.free(row, step, feed)
        for other in self.queue.on_finished(sample):
            self.result.cancelled.append(other)
            self.free(self.row_of[other], step, feed)
        self.release_prompts()

    def release_prompts(self) -> None:
        """Drop the prompt KV nobody needs any more, as the layout says (copied: every sample
        of the prompt was placed; shared: none is pending or running). A caller-owned store
        keeps its prompts (the caller runs them again, e.g. `infinite`'s decode phase)."""
        if self.keep_store:
            return
        running = {s[0] for s in self.rows.sample[: self.n]}
        for i in [i for i in self.store if self.e.layout.releasable(self.queue.remaining(i),
                                                                     i in running)]:
            self.store.pop(i)

    def boundary(self, step: int) -> None:
        """After the forward: show the queue the rows whose KV holds a multiple of q
        completion tokens (all their tokens, fed) and park the ones it names."""
        q, r = self.quantum, self.rows
        shown = []
        for row, a in enumerate(r.generated[: self.n].tolist()):  # one device sync
            if a % q == 0:
                probe = a == q  # the sample's first boundary: its probe tokens and state
                shown.append(BoundaryRow(
                    r.sample[row], a, r.tokens[row, :a].tolist() if probe else None,
                    self.hidden[row].clone() if probe and self.hidden is not None else None))
        if shown:
            for sample in self.queue.boundary(shown):
                self.suspend(sample, step)

    def suspend(self, sample: SampleId, step: int) -> None:
        row = self.row_of[sample]
        start = self.e.layout.first_column(int(self.rows.prompt_len[row]))
        k = int(self.rows.generated[row])
        self.parked[sample] = Suspended(
            [keys[row, :, start: start + k].clone() for keys in self.cache.keys],
            [values[row, :, start: start + k].clone() for values in self.cache.values],
            self.rows.tokens[row, :k].tolist(), self.logits[row].clone(),
            None if self.hidden is None else self.hidden[row].clone())
        self.free(row, step)
        self.track_memory()

    def free(self, row: int, step: int, feed: torch.Tensor | None = None) -> None:
        """Release `row`, then move the last running row into it to keep rows [0, n) dense."""
        rows = self.rows
        sample = rows.sample[row]
        self.stats.slot_trace.append((self.slot[row], sample, rows.started[row], step))
        del self.row_of[sample]
        last = self.n - 1
        if row != last:
            rows.move(last, row, *(() if feed is None else (feed,)))
            self.slot[row], self.slot[last] = self.slot[last], self.slot[row]
            self.row_of[rows.sample[row]] = row
        rows.sample[last] = None
        self.n = last

    def forward(self, feed: torch.Tensor) -> None:
        """One batched forward over the running rows [0, n) (a prefix view of the cache)."""
        n, rows = self.n, self.rows
        fed = rows.generated[:n] - 1  # completion column of the token fed
        positions = rows.prompt_len[:n] + fed
        columns = self.e.layout.first_column(rows.prompt_len[:n]) + fed  # its KV's slot column
        width = int(columns.max()) + 1
        valid = torch.arange(width, device=self.e.device)[None, :] <= columns[:, None]
        mask = torch.zeros(valid.shape, dtype=self.cache.keys[0].dtype, device=self.e.device)
        mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]  # [n, 1, 1, W]
        self.cache.rows, self.cache.write_cols, self.cache.width = n, columns, width
        mask, extra, context = self.e.layout.decode_inputs(
            self.e.model, self.store, rows.prompt_id[:n], rows.prompt_len[:n], fed, mask,
            self.e.windowed, self.e.reach)
        observe = self.e.spec.on_decode  # an activation recorder's rows -> prompts
        if observe is not None:
            observe(rows.prompt_id[:n])
        try:
            with context:
                out = self.e.model(input_ids=feed[:, None], position_ids=positions[:, None],
                                   attention_mask=mask, use_cache=True,
                                   output_hidden_states=self.hidden is not None,
                                   **{self.e.cache_keyword: self.cache}, **extra)
        finally:
            if observe is not None:
                observe(None)
        self.logits[:n] = out.logits[:, -1].to(self.logits.dtype)
        if self.hidden is not None:
            self.hidden[:n] = out.hidden_states[-1][:, -1].to(self.hidden.dtype)


# ----------------------------------------------------------------------------- helpers


@contextmanager
def padded_head(model: Any, multiple: int) -> Iterator[None]:
    """Inside the block, the model's output embedding sees its input rows (dim 0) padded with
    zeros to a multiple of `multiple` (from 2 rows up; 1 row stays a matrix-vector product),
    and its output is cut back to the real rows: same logits, the cheaper BLAS kernel."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if multiple <= 1 or head is None:
        yield
        return
    rows: list[int] = []

    def pad(module: Any, args: tuple) -> tuple | None:
        x, n = args[0], args[0].shape[0]
        rows.append(n)
        if n < 2 or n % multiple == 0:
            return None
        zeros = x.new_zeros((multiple - n % multiple, *x.shape[1:]))
        return (torch.cat([x, zeros]), *args[1:])

    def cut(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[: rows.pop()]

    with ExitStack() as stack:
        stack.callback(head.register_forward_pre_hook(pad).remove)
        stack.callback(head.register_forward_hook(cut).remove)
        yield


def to_rollouts(result: EngineResult, num_prompts: int, group_size: int,
                spec: GenerationSpec, order: dict[SampleId, int] | None = None) -> Rollouts:
    """Pack an engine run into Rollouts ordered by (prompt, sample), with its stats.

    `order` maps each kept sample to its row index within its group (default: its own j).
    """
    keep = order or {(i, j): j for i in range(num_prompts) for j in range(group_size)}
    rows = sorted(keep, key=lambda s: (s[0], keep[s]))
    pad = spec.eos_token_ids[0] if spec.eos_token_ids else 0
    return pack_rollouts([result.completions[s] for s in rows],
                         [result.finished[s] for s in rows], num_prompts, group_size,
                         result.stats, pad)
