"""Decode engine over a transformers causal LM: prefill once, slot KV cache, step, refill.

The engine owns m slot rows of KV memory (samplers/kv.py). Each prompt is prefilled once (with
`logits_to_keep=1`) and its KV kept in a store. Two layouts (`prompt_kv`):
- shared (default): a row holds its sample's completion KV only (max_new_tokens columns); the
  store keeps each live prompt's KV once, until its last sample ends, and the decode attention
  is prompt part + completion part merged by log-sum-exp (samplers/prefix_attention.py), one
  prefix product per prompt for all its rows;
- copied: a row holds its prompt's KV in its first P columns, then its own tokens (longest
  prompt + max_new_tokens columns), decoded by the model's own attention.
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

Probe and resume (samplers/infinite.py): with `suspend_after=k` a row that has just sampled its
token k (and did not end) is suspended instead of forwarded: its k completion columns of KV, its
k + 1 tokens and its hidden state leave the slot as a `Suspended` state. A later run given
`resume=states` places such a sample with that KV and feeds its pending token k at its first
step without sampling, so the sample goes on exactly as if it had never left (same tokens,
same streams) and takes L - k row-steps in the second run.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from samplers.base import (GenerationSpec, Rollouts, SamplingStats, cache_keyword, decoding_mode,
                           pack_rollouts, sample_tokens, uniforms)
from samplers.kv import PromptKV, SlotCache, Suspended, check_prompt_kv, kv_geometry, prefill
from samplers.prefix_attention import (SharedPrefix, layer_windows, prompt_groups,
                                       shared_prefix_implementation, windowed_masks)

SampleId = tuple[int, int]  # (prompt index, sample index)

# CPU BLAS runs an [n, H] x [H, V] product as 4-row blocks plus one matrix-vector product per
# left-over row, each reading the whole weight: SmolLM2's output head (V = 49152) costs 11 ms at
# 1 row, 36 ms at 3 and 7 rows, 19 ms at 4 and 17 ms at 8 (2 cores). Rows retire one by one, so
# the engine pads the head's input to a multiple of HEAD_ROWS rows on CPU (padded_head).
HEAD_ROWS = 4

# The prompt index of each row of the decode forward in progress ([n] long), None outside one:
# what lets an activation recorder count generated tokens per prompt while they are decoded
# (values/statistics.py: record_decoding), with no second forward over the responses.
DECODING_PROMPTS: ContextVar[torch.Tensor | None] = ContextVar("decoding_prompts", default=None)


class Queue(Protocol):
    def admit(self, free: int, running: int) -> list[SampleId]: ...
    def on_finished(self, sample: SampleId) -> list[SampleId]: ...
    def remaining(self, prompt: int) -> int: ...


@dataclass
class EngineResult:
    completions: dict[SampleId, list[int]]  # finished samples, tokens incl. EOS
    finished: dict[SampleId, bool]  # True = ended with EOS
    finish_order: list[SampleId]
    cancelled: list[SampleId]
    decoding_steps: int
    prefill_passes: int
    prefill_tokens: int
    peak_kv_bytes: int
    max_concurrency: int
    slot_trace: list[tuple[int, SampleId, int, int]]  # (slot, sample, start step, end step)
    wall_time_s: float
    prefill_time_s: float = 0.0  # the part of wall_time_s spent in prompt forwards
    slots: int | None = None
    predicted_peak_bytes: int | None = None  # set by the samplers that plan memory
    predicted_sampling_bytes: int | None = None
    suspended: dict[SampleId, Suspended] = field(default_factory=dict)


class DecodeEngine:
    """Decodes the samples a queue hands out on `slots` rows; see the module docstring.

    `store` shares prefilled prompts between runs (the caller owns it: prompts are then never
    dropped by the engine); `capture_hidden` keeps each row's last hidden state;
    `suspend_after` / `resume` are the probe hooks of the module docstring.
    """

    def __init__(self, model: Any, prompts: list[list[int]], spec: GenerationSpec,
                 slots: int, store: dict[int, PromptKV] | None = None,
                 capture_hidden: bool = False, suspend_after: int | None = None,
                 resume: dict[SampleId, Suspended] | None = None,
                 prompt_kv: str = "shared") -> None:
        check_prompt_kv(prompt_kv)
        self.model, self.prompts, self.spec, self.slots = model, prompts, spec, slots
        self.cache_keyword = cache_keyword(model)
        self.device = next(model.parameters()).device
        self.shared = prompt_kv == "shared"
        # shared: slot rows hold completion KV only; copied: prompt + completion
        self.capacity = spec.max_new_tokens + (0 if self.shared else max(map(len, prompts)))
        self.eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=self.device)
        self.reach = max(map(len, prompts)) + spec.max_new_tokens  # positions are < reach
        # windowed masks are needed only where a window is shorter than the sequence
        self.windowed = any(w is not None and w < self.reach
                            for w in layer_windows(model.config))
        self.shared_store = store
        self.capture_hidden, self.suspend_after = capture_hidden, suspend_after
        self.resume = dict(resume or {})  # popped as the samples are placed

    def run(self, queue: Queue) -> EngineResult:
        start = time.perf_counter()
        rows = HEAD_ROWS if self.device.type == "cpu" else 1
        with decoding_mode(self.model), padded_head(self.model, rows):
            return _Run(self, queue).loop(start)


class _Run:
    """State of one engine run: per-row tables, prompt KV store, outputs.

    Invariant: the running samples occupy rows [0, n) exactly; a retired row is filled by
    moving the last running row into it (one row copy per retirement), so every forward runs
    on a prefix view of the cache and finished samples cost nothing.
    """

    def __init__(self, engine: DecodeEngine, queue: Queue) -> None:
        self.e, self.queue = engine, queue
        m, dev = engine.slots, engine.device
        self.n = 0  # running rows
        self.sample: list[SampleId | None] = [None] * m
        self.slot = list(range(m))  # logical slot id of each row (what the Gantt chart shows)
        self.started = [0] * m
        self.row_of: dict[SampleId, int] = {}
        self.prompt_len = torch.zeros(m, dtype=torch.long, device=dev)
        self.generated = torch.zeros(m, dtype=torch.long, device=dev)  # tokens so far
        self.prompt_id = torch.zeros(m, dtype=torch.long, device=dev)
        self.sample_id = torch.zeros(m, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(m, engine.spec.max_new_tokens, dtype=torch.long, device=dev)
        self.pending = torch.zeros(m, dtype=torch.bool, device=dev)  # resumed, token not fed
        self.any_pending = False
        self.keep_store = engine.shared_store is not None
        self.store: dict[int, PromptKV] = engine.shared_store if self.keep_store else {}
        self.cache: SlotCache | None = None
        self.logits: torch.Tensor | None = None  # [m, V]: next-token logits of each row
        self.hidden: torch.Tensor | None = None  # [m, H] with capture_hidden
        self.result = EngineResult({}, {}, [], [], 0, 0, 0, 0, 0, [], 0.0, slots=engine.slots)
        if self.store:
            self.allocate(next(iter(self.store.values())))

    # -------------------------------------------------------------- admission

    def prompt_kv(self, i: int) -> PromptKV:
        if i not in self.store:
            start = time.perf_counter()
            self.store[i] = prefill(self.e.model, self.e.prompts[i], self.e.device,
                                    self.e.capture_hidden)
            self.result.prefill_time_s += time.perf_counter() - start
            self.result.prefill_passes += 1
            self.result.prefill_tokens += len(self.e.prompts[i])
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
        if self.e.capture_hidden:
            self.hidden = torch.zeros(self.e.slots, first.hidden.shape[-1],
                                      device=self.e.device, dtype=first.hidden.dtype)

    def place(self, sample: SampleId, step: int) -> None:
        i, j = sample
        kv = self.prompt_kv(i)
        row, length = self.n, len(self.e.prompts[i])
        start = 0 if self.e.shared else length  # the row's first completion column
        if not self.e.shared:
            for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
                self.cache.keys[layer][row, :, :length] = k
                self.cache.values[layer][row, :, :length] = v
        self.logits[row] = kv.logits
        if self.hidden is not None:
            self.hidden[row] = kv.hidden
        self.sample[row], self.started[row], self.row_of[sample] = sample, step, row
        self.prompt_len[row], self.generated[row] = length, 0
        self.prompt_id[row], self.sample_id[row] = i, j
        state = self.e.resume.pop(sample, None)
        if state is not None:  # a probed sample: its KV, tokens, and the pending last token
            k = len(state.tokens) - 1
            for layer, (key, value) in enumerate(zip(state.keys, state.values)):
                self.cache.keys[layer][row, :, start: start + k] = key
                self.cache.values[layer][row, :, start: start + k] = value
            self.tokens[row, : k + 1] = torch.tensor(state.tokens, device=self.e.device)
            self.generated[row], self.pending[row], self.any_pending = k, True, True
            if self.hidden is not None and state.hidden is not None:
                self.hidden[row] = state.hidden
        self.n += 1

    # -------------------------------------------------------------- the loop

    def loop(self, start: float) -> EngineResult:
        step = 0
        while True:
            m = self.e.slots
            for sample in self.queue.admit(m - self.n, self.n):
                self.place(sample, step)
            self.track_memory()
            if not self.keep_store and not self.e.shared:
                for i in [i for i in self.store if self.queue.remaining(i) == 0]:
                    self.store.pop(i)  # every sample of prompt i was placed and holds a copy
            if self.n == 0:
                break
            self.result.max_concurrency = max(self.result.max_concurrency, self.n)
            self.decode(step)
            step += 1
        self.result.decoding_steps = step
        self.result.wall_time_s = time.perf_counter() - start
        return self.result

    def track_memory(self) -> None:
        if self.cache is not None:
            live = self.cache.nbytes + sum(kv.nbytes for kv in self.store.values())
            live += sum(s.nbytes for s in (*self.e.resume.values(),
                                           *self.result.suspended.values()))
            self.result.peak_kv_bytes = max(self.result.peak_kv_bytes, live)

    def decode(self, step: int) -> None:
        """Sample one token for every running row, retire the finished, forward the rest."""
        spec, n = self.e.spec, self.n
        t = self.generated[:n].clone()  # [n]; generated is updated in place below
        u = uniforms(spec.seed, self.prompt_id[:n], self.sample_id[:n], t)
        rows = torch.arange(n, device=self.e.device)
        next_tokens = sample_tokens(self.logits[:n], u, spec)  # [n]
        if self.any_pending:  # rows resumed at this step: their token k is already known
            next_tokens = torch.where(self.pending[:n], self.tokens[rows, t], next_tokens)
            self.pending[:n], self.any_pending = False, False
        self.tokens[rows, t] = next_tokens
        self.generated[:n] = t + 1
        ended = torch.isin(next_tokens, self.e.eos) | (t + 1 >= spec.max_new_tokens)  # [n]
        feed = next_tokens.clone()
        for sample in [self.sample[r] for r in ended.nonzero().flatten().tolist()]:
            if sample in self.row_of:  # not cancelled by an earlier retirement this step
                self.retire(sample, step, feed)
        if self.e.suspend_after is not None:  # probe: park rows that sampled token k
            rows = (self.generated[: self.n] == self.e.suspend_after + 1).nonzero().flatten()
            for sample in [self.sample[r] for r in rows.tolist()]:  # one device sync
                self.suspend(sample, step, feed)
        if self.n > 0:
            self.forward(feed[: self.n])

    def retire(self, sample: SampleId, step: int, feed: torch.Tensor) -> None:
        row = self.row_of[sample]
        tokens = self.tokens[row, : int(self.generated[row])].tolist()
        self.result.completions[sample] = tokens
        self.result.finished[sample] = tokens[-1] in self.e.spec.eos_token_ids
        self.result.finish_order.append(sample)
        self.free(row, step, feed)
        for other in self.queue.on_finished(sample):
            self.result.cancelled.append(other)
            self.free(self.row_of[other], step, feed)
        self.release_prompts()

    def release_prompts(self) -> None:
        """Drop the prompt KV nobody needs any more: copied, once every sample of the prompt was
        placed (each holds a copy); shared, once none is pending or running. A caller-owned store
        keeps its prompts (the caller runs them again, e.g. `infinite`'s decode phase)."""
        if self.keep_store:
            return
        running = {s[0] for s in self.sample[: self.n]} if self.e.shared else set()
        for i in [i for i in self.store if self.queue.remaining(i) == 0 and i not in running]:
            self.store.pop(i)

    def suspend(self, sample: SampleId, step: int, feed: torch.Tensor) -> None:
        row = self.row_of[sample]
        start = 0 if self.e.shared else int(self.prompt_len[row])
        k = int(self.generated[row]) - 1
        self.result.suspended[sample] = Suspended(
            [keys[row, :, start: start + k].clone() for keys in self.cache.keys],
            [values[row, :, start: start + k].clone() for values in self.cache.values],
            self.tokens[row, : k + 1].tolist(),
            None if self.hidden is None else self.hidden[row].clone())
        self.free(row, step, feed)
        self.track_memory()

    def free(self, row: int, step: int, feed: torch.Tensor) -> None:
        """Release `row`, then move the last running row into it to keep rows [0, n) dense."""
        sample = self.sample[row]
        self.result.slot_trace.append((self.slot[row], sample, self.started[row], step))
        del self.row_of[sample]
        last = self.n - 1
        if row != last:
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[row] = keys[last]
                values[row] = values[last]
            for table in (self.prompt_len, self.generated, self.prompt_id, self.sample_id,
                          self.tokens, self.logits, self.pending, feed,
                          *([] if self.hidden is None else [self.hidden])):
                table[row] = table[last]
            self.sample[row], self.started[row] = self.sample[last], self.started[last]
            self.slot[row], self.slot[last] = self.slot[last], self.slot[row]
            self.row_of[self.sample[row]] = row
        self.sample[last] = None
        self.n = last

    def forward(self, feed: torch.Tensor) -> None:
        """One batched forward over the running rows [0, n) (a prefix view of the cache)."""
        n = self.n
        fed = self.generated[:n] - 1  # completion column of the token fed
        positions = self.prompt_len[:n] + fed
        columns = fed if self.e.shared else positions  # where its KV goes in the slot row
        width = int(columns.max()) + 1
        valid = torch.arange(width, device=self.e.device)[None, :] <= columns[:, None]
        mask = torch.zeros(valid.shape, dtype=self.cache.keys[0].dtype, device=self.e.device)
        mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]  # [n, 1, 1, W]
        self.cache.rows, self.cache.write_cols, self.cache.width = n, columns, width
        extra, context = {}, nullcontext()
        if not self.e.shared and self.e.windowed:
            mask = windowed_masks(self.e.model.config, mask, positions)
        if self.e.shared:
            extra["shared_prefix"] = SharedPrefix(
                {i: kv.keys for i, kv in self.store.items()},
                {i: kv.values for i, kv in self.store.items()},
                prompt_groups(self.prompt_id[:n]), self.prompt_len[:n], fed, mask,
                reach=self.e.reach)
            context = shared_prefix_implementation(self.e.model)
        rows = DECODING_PROMPTS.set(self.prompt_id[:n])
        try:
            with context:
                out = self.e.model(input_ids=feed[:, None], position_ids=positions[:, None],
                                   attention_mask=mask, use_cache=True,
                                   output_hidden_states=self.hidden is not None,
                                   **{self.e.cache_keyword: self.cache}, **extra)
        finally:
            DECODING_PROMPTS.reset(rows)
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
                spec: GenerationSpec, order: dict[SampleId, int] | None = None,
                **fields: Any) -> Rollouts:
    """Pack an engine run into Rollouts ordered by (prompt, sample).

    `order` maps each kept sample to its row index within its group (default: its own j);
    `fields` are further `SamplingStats` fields the sampler states (probe_steps, plan, ...).
    """
    keep = order or {(i, j): j for i in range(num_prompts) for j in range(group_size)}
    rows = sorted(keep, key=lambda s: (s[0], keep[s]))
    stats = SamplingStats(
        decoding_steps=result.decoding_steps,
        prefill_passes=result.prefill_passes,
        prefill_tokens=result.prefill_tokens,
        generated_tokens=sum(len(t) for t in result.completions.values()),
        peak_kv_bytes=result.peak_kv_bytes,
        max_concurrency=result.max_concurrency,
        wall_time_s=result.wall_time_s,
        prefill_time_s=result.prefill_time_s,
        slots=result.slots,
        slot_trace=result.slot_trace,
        predicted_peak_bytes=result.predicted_peak_bytes,
        predicted_sampling_bytes=result.predicted_sampling_bytes,
        **fields,
    )
    pad = spec.eos_token_ids[0] if spec.eos_token_ids else 0
    return pack_rollouts([result.completions[s] for s in rows],
                         [result.finished[s] for s in rows], num_prompts, group_size, stats, pad)
