"""Who decodes when: refill queues for the engine, and the closed forms they are checked against.

Queues (the engine's `Queue` protocol, samplers/engine.py):
- `SampleQueue(order, rounds=True)`: micro groups. A round of m samples starts only when every
  slot is idle, so each round waits for its longest member (`full` is the case m = G).
- `SampleQueue(order, rounds=False)`: continuous Fixed-Slot. A freed slot takes the next pending
  sample at the very next step.
- `DynamicQueue`: continuous Dynamic-Slot. Keeps launching fresh samples of the earliest
  unfinished prompt and stops that prompt once G of its samples have finished, cancelling the
  rest. Fewer steps, but the kept samples are biased toward short completions.

Closed forms: `rounds_steps` (micro), `list_schedule_makespan` (continuous in its refill order)
and `steps_lower_bound` = max(max L, ceil(sum L / m)) for any schedule on m slots.

Length-aware admission orders, built from PREDICTED remaining lengths (floats >= 0):
- `refill_order`: `fifo` (as given), `sjf` (shortest first) or `lpt` (longest first).
- `fptas_plan` + `planned_order`: balance predicted work over the m slots with successive
  `fptas_subset_sum`, order each slot by refill, then admit by planned start time. With exact
  predictions list scheduling of that order never takes longer than the plan's max slot load.
- `best_order`: of several candidate orders, the one whose list schedule of the predicted
  lengths ends first (ties: the first candidate). The `infinite` sampler weighs its FPTAS plan
  against plain refill orders this way, so its plan is never predicted worse than plain LPT.
`simulate_steps` gives the exact decoding steps of an order for known lengths.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SampleId = tuple[int, int]


def fifo_order(num_prompts: int, group_size: int) -> list[SampleId]:
    """(prompt, sample) order: prompt 0's group, then prompt 1's, ..."""
    return [(i, j) for i in range(num_prompts) for j in range(group_size)]


class SampleQueue:
    """Pending samples in a fixed order; `rounds=True` admits only into an all-idle engine."""

    def __init__(self, order: Sequence[SampleId], rounds: bool = False) -> None:
        self.pending: deque[SampleId] = deque(order)
        self.rounds = rounds
        self.left = Counter(i for i, _ in order)  # samples of each prompt not yet admitted

    def admit(self, free: int, running: int) -> list[SampleId]:
        if self.rounds and running > 0:
            return []
        admitted = [self.pending.popleft() for _ in range(min(free, len(self.pending)))]
        for i, _ in admitted:
            self.left[i] -= 1
        return admitted

    def on_finished(self, sample: SampleId) -> list[SampleId]:
        return []

    def remaining(self, prompt: int) -> int:
        return self.left[prompt]


class DynamicQueue:
    """Dynamic-Slot: launch samples j = 0, 1, 2, ... until G of a prompt have finished."""

    def __init__(self, num_prompts: int, group_size: int) -> None:
        self.group_size = group_size
        self.launched = [0] * num_prompts
        self.done = [0] * num_prompts
        self.running: list[set[int]] = [set() for _ in range(num_prompts)]

    def current(self) -> int | None:
        for i, done in enumerate(self.done):
            if done < self.group_size:
                return i
        return None

    def admit(self, free: int, running: int) -> list[SampleId]:
        i = self.current()
        if i is None:
            return []
        admitted = [(i, self.launched[i] + k) for k in range(free)]
        self.launched[i] += free
        self.running[i].update(j for _, j in admitted)
        return admitted

    def on_finished(self, sample: SampleId) -> list[SampleId]:
        i, j = sample
        self.running[i].discard(j)
        self.done[i] += 1
        if self.done[i] < self.group_size:
            return []
        cancelled = [(i, k) for k in sorted(self.running[i])]
        self.running[i].clear()
        return cancelled

    def remaining(self, prompt: int) -> int:
        return 0 if self.done[prompt] >= self.group_size else 1


# ----------------------------------------------------------------------------- closed forms


def rounds_steps(lengths: Sequence[int], slots: int) -> int:
    """Micro groups: consecutive rounds of `slots` samples, each as long as its longest."""
    return sum(max(lengths[k: k + slots]) for k in range(0, len(lengths), slots))


def list_schedule_makespan(lengths: Sequence[int], slots: int) -> int:
    """Continuous refill: each sample, in order, starts on the slot that frees first."""
    free_at = [0] * min(slots, len(lengths))
    heapq.heapify(free_at)
    end = 0
    for length in lengths:
        start = heapq.heappop(free_at)
        end = max(end, start + length)
        heapq.heappush(free_at, start + length)
    return end


def steps_lower_bound(lengths: Sequence[int], slots: int) -> int:
    """No schedule on `slots` rows beats max(max L, ceil(sum L / m))."""
    if not lengths:
        return 0
    return max(max(lengths), math.ceil(sum(lengths) / slots))


def simulate_steps(lengths: Sequence[int], order: Sequence[int], slots: int) -> int:
    """Decoding steps when samples with true `lengths` are admitted in `order` on `slots` rows."""
    return list_schedule_makespan([lengths[k] for k in order], slots)


# ----------------------------------------------------------------------------- length-aware plans

# Sort keys on the predicted length; Python's stable sort keeps the fifo order among ties.
_REFILL_KEYS: dict[str, Callable[[float], float]] = {
    "sjf": lambda length: length, "lpt": lambda length: -length, "fifo": lambda length: 0.0,
}
REFILLS = tuple(_REFILL_KEYS)  # ("sjf", "lpt", "fifo")


def refill_order(predicted: Sequence[float], refill: str,
                 samples: Sequence[SampleId] | None = None) -> list[int]:
    """Indices into `predicted` in admission order.

    fifo is the given order, or the (prompt, sample) order of `samples` (ids aligned with
    `predicted`) when they are given; `sjf`/`lpt` sort by predicted length and keep fifo on ties.
    """
    if refill not in _REFILL_KEYS:
        raise ValueError(f"refill must be one of {REFILLS}, got {refill!r}")
    fifo = list(range(len(predicted)))
    if samples is not None:
        if len(samples) != len(predicted):
            raise ValueError(f"samples has {len(samples)} ids for {len(predicted)} predictions")
        fifo.sort(key=lambda k: samples[k])
    key = _REFILL_KEYS[refill]
    return sorted(fifo, key=lambda k: key(predicted[k]))


def planned_order(plan: list[list[int]], predicted: Sequence[float], refill: str) -> list[int]:
    """Global admission order of a plan: each slot ordered by `refill` (fifo = the plan's order),
    then all samples by planned start (predicted work ahead of them in their slot), ties by slot.

    Why it is safe: with exact lengths, list scheduling of this order never ends later than the
    plan's max slot load. By induction every sample of positive length starts no later than
    planned: if all m rows were busy past its planned start t, the m samples running there
    (admitted earlier, so planned to start <= t, and ending no later than planned) would all be
    in progress at t in the plan, one per slot, so one would overlap it in its own slot. It can
    end earlier (list scheduling may repair a poor plan): the plan's max load is an upper bound,
    reached whenever the plan is at the lower bound, not an identity.
    """
    starts = []  # (planned start, slot, position in slot, index)
    for s, slot in enumerate(plan):
        start: float = 0
        local = refill_order([predicted[k] for k in slot], refill)
        for pos, k in enumerate(slot[t] for t in local):
            starts.append((start, s, pos, k))
            start += predicted[k]
    return [k for *_, k in sorted(starts)]


def best_order(candidates: dict[str, list[int]], predicted: Sequence[float],
               slots: int) -> tuple[str, list[int], float]:
    """(name, order, predicted makespan) of the candidate order that list-schedules the
    predicted lengths on `slots` rows in the fewest steps; the first one wins ties.

    With exact predictions the predicted makespan is the real one (`simulate_steps`), so the
    choice is never worse than any candidate, e.g. plain LPT.
    """
    if not candidates:
        raise ValueError("best_order needs at least one candidate order")
    best = None
    for name, order in candidates.items():
        span = list_schedule_makespan([predicted[k] for k in order], slots)
        if best is None or span < best[2]:
            best = (name, order, span)
    return best


def _check_epsilon(epsilon: float) -> None:
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")


class _LargeSums:
    """Subset sums <= capacity of `items` (each > epsilon * capacity), only the smallest in each
    bucket [b h, (b + 1) h) of a fixed grid, h = epsilon * capacity / (2 (u + 1)), where u is the
    most of these items that fit together (< 1 / epsilon).

    Buckets are never emptied and their minimum only decreases, so the grid costs < h only when
    an item is added: for every exact sum y of u' <= u items some kept z has y - (u' + 1) h < z
    <= y, i.e. z > y - epsilon * capacity / 2. There are 2 (u + 1) / epsilon + 1 buckets, so
    O(len(items) / epsilon^2) time and memory, whatever the magnitudes of the weights.
    """

    def __init__(self, weights: Sequence[float], items: Sequence[int], capacity: float,
                 epsilon: float) -> None:
        sizes = itertools.accumulate(sorted(weights[k] for k in items))
        most = sum(1 for _ in itertools.takewhile(lambda total: total <= capacity, sizes))
        width = epsilon * capacity / (2 * (most + 1))
        self.best = np.full(int(capacity / width) + 1, np.inf)  # [B] smallest sum per bucket
        self.best[0] = 0.0  # the empty subset; every other sum is > width
        self.items = list(items)
        self.history = []  # per item: (buckets it set, sorted; the bucket each came from)
        for k in self.items:
            src = np.flatnonzero(self.best + weights[k] <= capacity)
            cand = self.best[src] + weights[k]  # increasing, as kept sums increase with b
            dst = (cand / width).astype(np.int64)
            first = np.r_[True, dst[1:] != dst[:-1]] & (cand < self.best[dst])
            self.best[dst[first]] = cand[first]
            self.history.append((dst[first], src[first]))

    def subset(self, bucket: int) -> list[int]:
        """Items of the kept sum in `bucket`, read back through the history."""
        chosen = []
        for k, (dst, src) in zip(reversed(self.items), reversed(self.history)):
            t = int(np.searchsorted(dst, bucket))
            if t < len(dst) and dst[t] == bucket:
                chosen.append(k)
                bucket = int(src[t])
        return chosen


def fptas_subset_sum(weights: Sequence[float], capacity: float, epsilon: float) -> list[int]:
    """Sorted indices of a subset with capacity >= sum >= (1 - epsilon) * OPT, where OPT is the
    largest subset sum <= capacity. Time polynomial in n and 1/epsilon (not in the weights).

    If everything that fits fits together, that is the answer. Otherwise OPT >= capacity / 2
    (add items until one does not fit: it or the sum before it is >= capacity / 2). Items above
    epsilon * capacity ("large") go through `_LargeSums`, which keeps a z > y - epsilon * OPT
    for the large part y of the optimum; the small items then go on top in decreasing order,
    first as the longest prefix that fits (binary search per z) and, for the best z, every
    further one that still fits. Either all small items fit, and the sum is > (1 - epsilon) OPT,
    or a small item (<= epsilon * capacity) did not, and the sum is > (1 - epsilon) capacity.
    Zero weights are always taken.
    """
    _check_epsilon(epsilon)
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    fits = [k for k, w in enumerate(weights) if w <= capacity]
    if sum(weights[k] for k in fits) <= capacity:  # also n = 0 and capacity = 0
        return fits
    large = _LargeSums(weights, [k for k in fits if weights[k] > epsilon * capacity],
                       capacity, epsilon)
    small = sorted((k for k in fits if weights[k] <= epsilon * capacity), key=lambda k: -weights[k])
    prefix = np.array([0, *itertools.accumulate(weights[k] for k in small)], dtype=float)
    buckets = np.flatnonzero(np.isfinite(large.best))
    z = large.best[buckets]
    j = np.searchsorted(prefix, capacity - z, side="right") - 1  # longest prefix on top of z
    while np.any(over := z + prefix[j] > capacity):  # rounding in capacity - z
        j[over] -= 1
    b = int(np.argmax(z + prefix[j]))
    total, j = z[b] + prefix[j[b]], int(j[b])
    chosen = small[:j]
    for k in small[j:]:  # first fit: only helps, and closes most of the gap in practice
        if total + weights[k] <= capacity:
            chosen.append(k)
            total += weights[k]
    return sorted(chosen + large.subset(int(buckets[b])))


def _max_load(plan: list[list[int]], predicted: Sequence[float]) -> float:
    return max((sum(predicted[k] for k in slot) for slot in plan), default=0)


def _fill(predicted: Sequence[float], rest: list[int], slots: int, target: float,
          epsilon: float) -> list[list[int]]:
    """Every slot but the last takes `fptas_subset_sum` of what remains under capacity
    max(target, average of what remains); the last slot takes the rest."""
    plan = []
    for r in range(slots, 1, -1):
        weights = [predicted[k] for k in rest]
        taken = set(fptas_subset_sum(weights, max(target, sum(weights) / r), epsilon))
        plan.append([k for t, k in enumerate(rest) if t in taken])
        rest = [k for t, k in enumerate(rest) if t not in taken]
    return plan + [rest]


_BISECTIONS = 8  # target resolution (hi - lo) / 256; guarantees do not depend on it


def fptas_plan(predicted: Sequence[float], slots: int, epsilon: float) -> list[list[int]]:
    """Assign every index to one of `slots` slot lists, balancing predicted work per slot.

    Objective: minimise the max slot load (sum of predicted lengths), i.e. the predicted makespan.
    That is P||Cmax, strongly NP-hard, so it has no FPTAS unless P = NP; epsilon is the guarantee
    of each subset-sum subproblem, and the plan gets the weaker global bounds below.

    Scheme: while the longest item exceeds the average load of the remaining slots it gets a slot
    alone (it sets the lower bound max L by itself; this only lowers the remaining average). With
    r slots, average A and longest item p left, `_fill` fills the slots one by one with subset
    sums under capacity max(T, running average). The running average alone (T = A) is the plain
    scheme, but each slot's shortfall lands on the last one; when slots hold few items a target
    T > A lets them absorb it. T is bisected between A and T_hi = (A + p) / (1 - eps), going down
    when the last slot stays <= T, and the plan with the smallest max load is returned.

    Guarantees (OPT = optimal max load >= max(p, A), as isolating only lowers the average):
    - T_hi is tried (unless a plan at the lower bound came first), and there every slot but the
      last takes >= (1 - eps)(T_hi - p) >= A (or all that is left; greedy reaches capacity - p),
      so the last gets <= A: max load <= max(longest, (A + p) / (1 - eps)) <= 2 OPT / (1 - eps).
    - slots = 2: T = A is tried first and gives max load = total - load_0 <= total - (1 - eps) S* =
      OPT + eps S* <= (1 + eps) OPT (S* = best subset <= total / 2, OPT = total - S*).
    Time: (_BISECTIONS + 2) * slots calls of `fptas_subset_sum`, polynomial in n and 1/eps.
    """
    _check_epsilon(epsilon)
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if any(length < 0 for length in predicted):
        raise ValueError("predicted lengths must be >= 0")
    rest = sorted(range(len(predicted)), key=lambda k: -predicted[k])
    alone: list[list[int]] = []
    while len(alone) < slots - 1 and rest:
        if predicted[rest[0]] <= sum(predicted[k] for k in rest) / (slots - len(alone)):
            break
        alone.append([rest.pop(0)])
    rest.sort()
    r = slots - len(alone)
    average = sum(predicted[k] for k in rest) / r
    lo, hi = average, (average + max((predicted[k] for k in rest), default=0)) / (1 - epsilon)
    load = functools.partial(_max_load, predicted=predicted)
    floor = max([average] + [predicted[slot[0]] for slot in alone])  # no plan goes below
    best, target = _fill(predicted, rest, r, lo, epsilon), hi
    for _ in range(_BISECTIONS + 1):  # first T_hi, then bisection
        if load(best) <= floor:
            break
        plan = _fill(predicted, rest, r, target, epsilon)
        best = min(best, plan, key=load)
        lo, hi = (lo, target) if sum(predicted[k] for k in plan[-1]) <= target else (target, hi)
        target = (lo + hi) / 2
    return alone + best


# ----------------------------------------------------------------------------- stream scheduling

SCHEDULES = ("auto", "attained", "predicted", "continuous")


@dataclass
class BoundaryRow:
    """A running sample at a multiple of k tokens, as the engine shows it to a `StreamQueue`
    after a forward: its `attained` tokens are all in its KV. At the probe point (attained ==
    k) `tokens` holds them and `hidden` the policy's last hidden state (when captured)."""
    sample: SampleId
    attained: int
    tokens: list[int] | None = None
    hidden: Any = None


Predict = Callable[[list[BoundaryRow]], list[float]]


class StreamQueue:
    """Continuous refill on m slots with parking every k tokens, within a budget of parked KV:
    the `infinite` sampler's queue (docs/ARCHITECTURE.md section 6).

    Every sample starts in the stream; its first k tokens are its probe. When a running sample
    has decoded a multiple of k tokens (a *boundary*), the queue may park it (its KV leaves the
    slot; nothing is recomputed) so that a waiting sample with a better key runs, as long as
    the parked KV stays within `park_tokens` tokens. A freed slot takes the waiting sample with
    the best key. Keys, per `schedule`:

    - `attained` (least attained service first): (attained // k, longest predicted remaining,
      fifo). Every sample gets its first k tokens before any gets 2k, and so on as far as the
      budget lets: the long samples progress together and the tail stays short whatever the
      predictions are worth. A row is parked only for a lower level.
    - `predicted` (the paper's plan, in the stream): (predicted?, the `refill` key of the
      predicted remaining, fifo). Samples without a prediction start first (their probe);
      then `lpt` runs the longest predicted remaining first (parking a row for one predicted
      more than k tokens longer: preemptive LPT), `sjf` the shortest first, `fifo` in order.

    `predict(rows)` is asked once per sample, at its probe point, for its remaining length
    after k tokens; `predicted` gives remaining lengths up front instead, before anything
    runs (k = 0, the oracle, simulations). The estimate at attained a is the prediction minus
    the tokens decoded since it was made, at least 0. With k = 0 nothing is parked.
    A waiting sample's key does not change while it waits, so the waiting set is a heap.
    """

    def __init__(self, samples: Sequence[SampleId], probe_tokens: int, park_tokens: int,
                 schedule: str, refill: str, predict: Predict | None = None,
                 predicted: dict[SampleId, float] | None = None) -> None:
        if schedule not in ("predicted", "attained"):
            raise ValueError(f"schedule must be 'predicted' or 'attained', got {schedule!r}")
        self.k, self.budget, self.schedule = probe_tokens, park_tokens, schedule
        self.quantum = probe_tokens or None  # the engine shows its rows every k tokens
        self.predict = predict
        self.order_key = _REFILL_KEYS[refill]
        # sample -> (predicted remaining, attained when predicted)
        self.predicted = {s: (float(p), 0) for s, p in (predicted or {}).items()}
        self.rank = {s: x for x, s in enumerate(samples)}  # fifo position
        self.waiting: dict[SampleId, int] = {}  # sample -> attained tokens (its parked KV)
        self.heap: list[tuple[tuple[int, float, int], SampleId]] = []
        self.left: Counter[int] = Counter()  # waiting samples per prompt
        self.parked_tokens = 0  # the waiting samples' attained tokens
        self.parks = 0
        for sample in samples:
            self.push(sample, 0)

    def level(self, attained: int) -> int:
        return attained // self.k if self.k else 0

    def estimate(self, sample: SampleId, attained: int) -> float:
        """Predicted remaining tokens at `attained` (the prediction, run down)."""
        value, at = self.predicted.get(sample, (0.0, 0))
        return max(value - max(attained - at, 0), 0.0)

    def key(self, sample: SampleId, attained: int) -> tuple[int, float, int]:
        estimate = self.estimate(sample, attained)
        if self.schedule == "predicted":
            level = int(sample in self.predicted or not self.k)
            return level, self.order_key(estimate), self.rank[sample]
        return self.level(attained), -estimate, self.rank[sample]

    def push(self, sample: SampleId, attained: int) -> None:
        self.waiting[sample] = attained
        self.left[sample[0]] += 1
        self.parked_tokens += attained
        heapq.heappush(self.heap, (self.key(sample, attained), sample))

    def pop(self) -> SampleId:
        _, sample = heapq.heappop(self.heap)
        self.parked_tokens -= self.waiting.pop(sample)
        self.left[sample[0]] -= 1
        return sample

    def admit(self, free: int, running: int) -> list[SampleId]:
        return [self.pop() for _ in range(min(free, len(self.heap)))]

    def boundary(self, rows: list[BoundaryRow]) -> list[SampleId]:
        """Predict the rows at their probe point; return the rows to park. Rows are taken
        worst key first, each against the best waiting sample not yet matched."""
        fresh = [r for r in rows if r.attained == self.k and r.sample not in self.predicted]
        if fresh and self.predict is not None:
            for row, value in zip(fresh, self.predict(fresh)):
                self.predicted[row.sample] = (float(value), row.attained)
        parked: list[BoundaryRow] = []
        matched: list[tuple[tuple[int, float, int], SampleId]] = []
        tokens = self.parked_tokens
        for row in sorted(rows, key=lambda r: self.key(r.sample, r.attained), reverse=True):
            if len(matched) == len(self.heap):
                break
            best = heapq.nsmallest(len(matched) + 1, self.heap)[-1]
            if not self.better(best[1], row):
                break  # the rows left have better keys still
            if tokens + row.attained > self.budget:
                continue  # a row with fewer tokens may still fit
            parked.append(row)
            matched.append(best)
            tokens += row.attained
        for row in parked:
            self.push(row.sample, row.attained)
        self.parks += len(parked)
        return [row.sample for row in parked]

    def better(self, waiting: SampleId, row: BoundaryRow) -> bool:
        """Is it worth parking `row` for `waiting`? A lower level always; in `predicted`, at
        the same level, a refill key better by more than k tokens."""
        attained = self.waiting[waiting]
        mine = self.key(waiting, attained)[0]
        theirs = self.key(row.sample, row.attained)[0]
        if mine != theirs or self.schedule == "attained":
            return mine < theirs
        gain = self.order_key(self.estimate(row.sample, row.attained)) - self.order_key(
            self.estimate(waiting, attained))
        return gain > self.k

    def on_finished(self, sample: SampleId) -> list[SampleId]:
        return []

    def remaining(self, prompt: int) -> int:
        return self.left[prompt]


def simulate_stream(lengths: Sequence[int], predicted: Sequence[float], slots: int,
                    probe_tokens: int, park_tokens: int, schedule: str, refill: str,
                    upfront: bool = False) -> int:
    """Decoding steps of a `StreamQueue` for samples of known `lengths` (tokens incl. EOS, in
    fifo order) and predicted remaining lengths after k tokens (`upfront`: after 0 tokens,
    known before anything runs, as the oracle's), stepping as the engine does: a
    running sample draws one token per step; one that has not ended is shown to the queue
    when its count reaches a multiple of k, and may leave at the end of that step. Steps
    between such events are skipped at once; once nothing waits, the running samples just
    finish."""
    samples = [(0, x) for x in range(len(lengths))]
    known = {s: float(p) for s, p in zip(samples, predicted)}
    queue = StreamQueue(samples, probe_tokens, park_tokens, schedule, refill,
                        predict=lambda rows: [known[r.sample] for r in rows],
                        predicted=known if upfront or not probe_tokens else None)
    k = probe_tokens
    drawn = {s: 0 for s in samples}  # tokens drawn (and fed) so far
    running: list[SampleId] = []
    step = 0
    while True:
        running += queue.admit(slots - len(running), len(running))
        if not running:
            return step
        left = {s: lengths[s[1]] - drawn[s] for s in running}
        if not queue.waiting:
            return step + max(left.values())
        # to the next finish or multiple of k
        dt = min(min(left[s], k - drawn[s] % k) if k else left[s] for s in running)
        step += dt
        ended, rows = [], []
        for sample in running:
            drawn[sample] += dt
            if drawn[sample] >= lengths[sample[1]]:
                ended.append(sample)
            elif k and drawn[sample] % k == 0:
                rows.append(BoundaryRow(sample, drawn[sample]))
        for sample in ended:
            running.remove(sample)
        for sample in queue.boundary(rows) if rows else []:
            running.remove(sample)
