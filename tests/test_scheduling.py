"""Length-aware planning in samplers/scheduling.py: the subset-sum FPTAS against brute force, the
plan's proved bounds, refill orders on hand-computed instances, and planned orders under list
scheduling. Pure Python, seeded, no models.

Run: PYTHONPATH=. python -m pytest -q tests/test_scheduling.py
"""
from __future__ import annotations

import itertools
import random

import pytest

from samplers.scheduling import (
    REFILLS,
    fptas_plan,
    fptas_subset_sum,
    list_schedule_makespan,
    planned_order,
    refill_order,
    simulate_steps,
    steps_lower_bound,
)

TOL = 1e-9  # float sums taken in a different order than inside the algorithm


def subset_sums(weights: list[float]) -> list[float]:
    sums = [0]
    for w in weights:
        sums += [s + w for s in sums]
    return sums


def opt_makespan(lengths: list[float], slots: int) -> float:
    """Brute force over assignments (item 0 pinned to slot 0: slots are interchangeable)."""
    best = float("inf")
    for rest in itertools.product(range(slots), repeat=max(len(lengths) - 1, 0)):
        loads = [0.0] * slots
        for length, s in zip(lengths, (0, *rest)):
            loads[s] += length
        best = min(best, max(loads))
    return best


def loads(plan: list[list[int]], lengths: list[float]) -> list[float]:
    return [sum(lengths[k] for k in slot) for slot in plan]


# ----------------------------------------------------------------------------- fptas_subset_sum


def test_fptas_subset_sum_meets_its_guarantee_against_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 12)
        if trial % 2:
            weights = [rng.randint(0, 60) for _ in range(n)]
        else:
            weights = [rng.uniform(0, 60) for _ in range(n)]
        capacity = rng.uniform(0, 1.1) * sum(weights)
        epsilon = (0.5, 0.1, 0.01)[trial % 3]
        chosen = fptas_subset_sum(weights, capacity, epsilon)
        opt = max(s for s in subset_sums(weights) if s <= capacity)
        total = sum(weights[k] for k in chosen)
        assert len(set(chosen)) == len(chosen) and all(0 <= k < n for k in chosen)
        assert total <= capacity + TOL
        assert total >= (1 - epsilon) * opt - TOL


def test_fptas_subset_sum_edge_cases():
    assert fptas_subset_sum([], 5, 0.1) == []
    assert fptas_subset_sum([], 0, 0.1) == []
    assert fptas_subset_sum([7, 8, 9], 5, 0.1) == []  # nothing fits
    assert fptas_subset_sum([3, 0, 2], 0, 0.1) == [1]  # only the zero weight fits
    assert fptas_subset_sum([1, 2, 3], 10, 0.1) == [0, 1, 2]  # everything fits
    chosen = fptas_subset_sum([8, 4, 4, 4, 4], 12, 0.1)
    assert sum([8, 4, 4, 4, 4][k] for k in chosen) == 12


@pytest.mark.parametrize("call, match", [
    (lambda: fptas_subset_sum([1, 2], 3, 0), "epsilon"),
    (lambda: fptas_subset_sum([1, 2], 3, 1), "epsilon"),
    (lambda: fptas_subset_sum([1, 2], 3, -0.5), "epsilon"),
    (lambda: fptas_subset_sum([1, -2], 3, 0.1), "weights"),
    (lambda: fptas_subset_sum([1, 2], -1, 0.1), "capacity"),
    (lambda: fptas_plan([1, 2], 0, 0.1), "slots"),
    (lambda: fptas_plan([1, -2], 2, 0.1), "predicted"),
    (lambda: fptas_plan([1, 2], 2, 1.5), "epsilon"),
    (lambda: refill_order([1, 2], "random"), "refill"),
    (lambda: planned_order([[0], [1]], [1, 2], "longest"), "refill"),
    (lambda: refill_order([1, 2], "sjf", samples=[(0, 0)]), "samples"),
])
def test_bad_arguments_raise_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- fptas_plan


def test_fptas_plan_partitions_and_meets_its_proved_bounds():
    rng = random.Random(1)
    for trial in range(60):
        slots = 2 + trial % 2
        n = rng.randint(1, 9 if slots == 2 else 8)
        lengths = [rng.randint(1, 40) if trial % 4 < 2 else rng.uniform(0, 40) for _ in range(n)]
        epsilon = (0.5, 0.1)[trial // 4 % 2]
        plan = fptas_plan(lengths, slots, epsilon)
        assert len(plan) == slots
        assert sorted(k for slot in plan for k in slot) == list(range(n))
        opt, got = opt_makespan(lengths, slots), max(loads(plan, lengths))
        assert got >= opt - TOL
        assert got <= 2 * opt / (1 - epsilon) + TOL  # any slots
        if slots == 2:
            assert got <= (1 + epsilon) * opt + TOL


@pytest.mark.parametrize("lengths, slots, expected", [
    ([8, 4, 4, 4, 4], 2, 12),  # sum / m, reached by {8, 4} | {4, 4, 4}
    ([3, 3, 2, 2, 2], 2, 6),   # where LPT needs 7
    ([10, 3, 3, 2, 2], 2, 10),  # max L = sum / m
    ([9, 2, 2, 1], 3, 9),      # max L > sum / m: 9 gets a slot alone
    ([5, 1], 4, 5),            # fewer items than slots
    ([0, 0, 0], 2, 0),
])
def test_fptas_plan_reaches_the_lower_bound_on_hand_made_instances(lengths, slots, expected):
    plan = fptas_plan(lengths, slots, 0.1)
    assert len(plan) == slots and sorted(k for s in plan for k in s) == list(range(len(lengths)))
    assert max(loads(plan, lengths)) == expected == steps_lower_bound(lengths, slots)


def test_fptas_plan_gives_a_longer_than_average_item_its_own_slot():
    assert [0] in fptas_plan([9, 2, 2, 1], 3, 0.1)
    assert fptas_plan([], 2, 0.1) == [[], []]


# ----------------------------------------------------------------------------- refill orders


def test_refill_orders_are_stable_on_ties():
    predicted = [2.0, 1.0, 2.0, 0.5, 1.0]
    assert refill_order(predicted, "fifo") == [0, 1, 2, 3, 4]
    assert refill_order(predicted, "sjf") == [3, 1, 4, 0, 2]
    assert refill_order(predicted, "lpt") == [0, 2, 1, 4, 3]
    assert set(REFILLS) == {"fifo", "sjf", "lpt"}


def test_refill_orders_use_sample_ids_as_fifo():
    predicted = [2.0, 1.0, 2.0, 0.5, 1.0]
    samples = [(1, 0), (0, 1), (0, 0), (1, 1), (0, 2)]
    assert refill_order(predicted, "fifo", samples) == [2, 1, 4, 0, 3]
    assert refill_order(predicted, "sjf", samples) == [3, 1, 4, 2, 0]
    assert refill_order(predicted, "lpt", samples) == [2, 0, 1, 4, 3]


@pytest.mark.parametrize("lengths, refill, steps", [
    # [3, 3, 2, 2, 2] on 2 slots, optimum 6 ({3, 3} | {2, 2, 2}):
    ([3, 3, 2, 2, 2], "lpt", 7),   # 3 | 3, then 2 + 2 on both, last 2 at 5
    ([3, 3, 2, 2, 2], "sjf", 7),   # 2 | 2, 2 at 2 -> 4, 3 at 2 -> 5, 3 at 4 -> 7
    ([3, 3, 2, 2, 2], "fifo", 7),  # same order as lpt
    # [1, 1, 1, 1, 4] on 2 slots, optimum 4 ({4} | {1, 1, 1, 1}):
    ([1, 1, 1, 1, 4], "sjf", 6),   # the ones end at 2, then 4 runs alone from 2
    ([1, 1, 1, 1, 4], "fifo", 6),
    ([1, 1, 1, 1, 4], "lpt", 4),
])
def test_list_scheduling_of_refill_orders_on_classic_instances(lengths, refill, steps):
    assert simulate_steps(lengths, refill_order(lengths, refill), 2) == steps


def test_simulate_steps_is_list_scheduling_of_the_order():
    assert simulate_steps([5, 1, 1], [1, 2, 0], 2) == 6  # 1 | 1, then 5 from step 1
    assert simulate_steps([5, 1, 1], [0, 1, 2], 2) == list_schedule_makespan([5, 1, 1], 2) == 5


# ----------------------------------------------------------------------------- planned orders


@pytest.mark.parametrize("refill, order", [("fifo", [0, 2, 1]), ("sjf", [1, 2, 0]),
                                           ("lpt", [0, 2, 1])])
def test_planned_order_sorts_by_planned_start_then_slot(refill, order):
    assert planned_order([[0, 1], [2]], [3, 1, 2], refill) == order


def test_planned_order_of_the_classic_instance_reaches_the_optimum():
    lengths = [3, 3, 2, 2, 2]
    plan = fptas_plan(lengths, 2, 0.1)
    for refill in REFILLS:
        assert simulate_steps(lengths, planned_order(plan, lengths, refill), 2) == 6


def test_list_scheduling_of_a_planned_order_never_exceeds_the_plan():
    """Proved in `planned_order` for ANY plan, so random plans are checked too (and so it is
    equal whenever the plan is at the lower bound)."""
    rng = random.Random(2)
    for trial in range(200):
        slots, n = rng.randint(2, 4), rng.randint(0, 20)
        lengths = [rng.randint(0, 30) for _ in range(n)]
        if trial % 2:
            plan = fptas_plan(lengths, slots, 0.1)
        else:
            plan = [[] for _ in range(slots)]
            for k in range(n):
                plan[rng.randrange(slots)].append(k)
        planned, bound = max(loads(plan, lengths)), steps_lower_bound(lengths, slots)
        for refill in REFILLS:
            steps = simulate_steps(lengths, planned_order(plan, lengths, refill), slots)
            assert bound <= steps <= planned
