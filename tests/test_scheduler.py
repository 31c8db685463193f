"""The long-tail-aware scheduler (megatron_tlt/coordinator/scheduler.py): the length predictor's EMAs,
fallbacks and checkpoint round trips, Pearson correlation, the list-scheduling makespan against a step by
step simulation, and the group assignment against brute force, round-robin and LPT on tokens. Pure Python."""
from __future__ import annotations

import io
import itertools
import json
import math
import random

import pytest
import torch

from megatron_tlt.coordinator.scheduler import (LengthPredictor, admission_order, assign_groups, correlation,
                                                 lpt_by_tokens, max_makespan, round_robin, simulate_makespan)


def long_tailed_groups(rng: random.Random, num_groups: int, n: int, cap: int = 4096) -> dict[int, list[float]]:
    """{group id: [n] integer lengths}: a lognormal mean per prompt, Pareto-tailed samples around it, capped."""
    groups = {}
    for g in range(num_groups):
        mean = rng.lognormvariate(4.0, 1.0)
        groups[g] = [float(min(cap, max(1, int(mean * rng.paretovariate(1.5))))) for _ in range(n)]
    return groups


def lognormal_groups(rng: random.Random, num_groups: int, n: int) -> dict[int, list[float]]:
    """{group id: [n] integer lengths}: a long-tailed (lognormal) mean per prompt, lognormal samples around
    it; no single request dominates a rank's makespan."""
    return {g: (lambda mean: [float(max(1, int(mean * rng.lognormvariate(0.0, 0.5)))) for _ in range(n)])(
        rng.lognormvariate(5.0, 0.8)) for g in range(num_groups)}


def stepwise_makespan(lengths: list[int], slots: int) -> int:
    """Decode steps, simulated one step at a time: free slots refilled in queue order, then every live
    request advances one token."""
    queue, live, steps = list(lengths), [], 0
    while queue or live:
        while queue and len(live) < slots:
            live.append(queue.pop(0))
        live = [x - 1 for x in live if x > 1]
        steps += 1
    return steps


# ------------------------------------------------------------------ predictor


def test_ema_by_hand():
    p = LengthPredictor(decay=0.5, default_length=100.0)
    p.update(7, [2, 4, 6])  # first observation: mean 4, max 6
    assert p.stats(7) == (4.0, 6.0)
    p.update(7, [10, 2])  # mean 6, max 10
    assert p.stats(7) == (0.5 * 4 + 0.5 * 6, 0.5 * 6 + 0.5 * 10) == (5.0, 8.0)
    assert p.predict(7, 4) == [8.0, 4.0, 4.0, 4.0]  # max, then (4 * 5 - 8) / 3: the total stays 4 * mean
    assert p.predict(7, 1) == [5.0]

    q = LengthPredictor(decay=0.75)
    q.update(0, [8])
    q.update(0, [4])
    assert q.stats(0) == (0.75 * 8 + 0.25 * 4, 0.75 * 8 + 0.25 * 4) == (7.0, 7.0)


def test_predict_clamps_when_the_observed_group_was_larger():
    p = LengthPredictor()
    p.update(1, [0, 0, 0, 90])  # mean 22.5, max 90: 2 * 22.5 - 90 < 0
    assert p.predict(1, 2) == [90.0, 0.0]


def test_unseen_prompt_fallback():
    p = LengthPredictor(default_length=64.0)
    assert p.predict(3, 3) == [64.0, 64.0, 64.0]  # nothing seen yet
    p.update(1, [2, 8])  # mean 5, max 8
    p.update(2, [3, 3])  # mean 3, max 3
    assert 1 in p and 3 not in p
    assert p.stats(3) == (4.0, 5.5)  # the mean over seen prompts of their EMAs
    assert p.predict(3, 2) == [5.5, 2.5]
    p.update(2, [5, 7])  # EMA mean 4.5, max 5: the fallback follows
    assert p.stats(3) == (4.75, 6.5)


def test_bad_inputs():
    with pytest.raises(ValueError):
        LengthPredictor(decay=1.0)
    p = LengthPredictor()
    with pytest.raises(ValueError):
        p.update(0, [])
    with pytest.raises(ValueError):
        p.update(0, [3, -1])
    with pytest.raises(ValueError):
        p.predict(0, 0)


def test_state_dict_round_trips_exactly():
    rng = random.Random(0)
    p = LengthPredictor(decay=0.3, default_length=50.0)
    for _ in range(200):
        p.update(rng.randrange(40), [rng.randrange(1, 3000) for _ in range(rng.randint(1, 8))])
    state = p.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    for restored_state in (state, json.loads(json.dumps(state)), torch.load(buf, weights_only=True)):
        q = LengthPredictor(decay=0.3, default_length=50.0)
        q.load_state_dict(restored_state)
        for i in range(50):  # seen and unseen prompts
            assert q.predict(i, 8) == p.predict(i, 8)
            assert (i in q) == (i in p)
        q.update(5, [11, 13])  # and they keep evolving alike
        p2 = LengthPredictor(decay=0.3, default_length=50.0)
        p2.load_state_dict(state)
        p2.update(5, [11, 13])
        assert q.predict(5, 4) == p2.predict(5, 4) and q.predict(99, 4) == p2.predict(99, 4)


def test_correlation():
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # dx = dy-permuted [-1.5, -.5, .5, 1.5]: sum dx dy = 3, sum dx^2 = sum dy^2 = 5
    assert correlation([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert correlation([], []) == 0.0
    assert correlation([5], [7]) == 0.0
    assert correlation([1, 1, 1], [1, 2, 3]) == 0.0
    assert correlation([1, 2, 3], [4, 4, 4]) == 0.0
    with pytest.raises(ValueError):
        correlation([1, 2], [1])


# ------------------------------------------------------------------ makespan


def test_makespan_by_hand():
    # 2 slots: 5 | 3; the first 2 at 3 -> 5; the second 2 at 5 -> 7
    assert simulate_makespan([5, 3, 2, 2], 2) == 7.0
    assert simulate_makespan([4, 1, 1, 1, 1], 2) == 4.0
    assert simulate_makespan([1, 1, 1, 1, 4], 2) == 6.0  # the order matters
    assert simulate_makespan([3, 9, 2], 8) == 9.0
    assert simulate_makespan([], 4) == 0.0
    with pytest.raises(ValueError):
        simulate_makespan([1], 0)


@pytest.mark.parametrize("seed", range(5))
def test_makespan_matches_stepwise_simulation(seed):
    rng = random.Random(seed)
    for _ in range(40):
        slots = rng.randint(1, 6)
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(0, 20))]
        assert simulate_makespan(lengths, slots) == stepwise_makespan(lengths, slots)


def test_adding_a_request_to_a_longest_first_list_never_shortens_it():
    """The assignment's pruning relies on this."""
    rng = random.Random(1)
    for _ in range(3000):
        slots = rng.randint(1, 5)
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(0, 12))]
        extra = rng.randint(1, 20)
        before = simulate_makespan(sorted(lengths, reverse=True), slots)
        assert simulate_makespan(sorted(lengths + [extra], reverse=True), slots) >= before


# ------------------------------------------------------------------ assignment


def test_admission_order_and_round_robin():
    assert admission_order({4: [3.0, 9.0], 2: [9.0], 7: [20.0, 1.0], 1: [0.5]}) == [7, 2, 4, 1]
    assert round_robin([10, 11, 12, 13, 14], 2) == {10: 0, 11: 1, 12: 0, 13: 1, 14: 0}  # k-th id to rank k % 2
    assert round_robin([5, 3, 9], 4) == {5: 0, 3: 1, 9: 2}


def naive_construction(groups, num_ranks, slots):
    """The documented start of assign_groups, without any pruning: LPT on tokens if it reaches the lower
    bound, else LPT by simulated makespan, or LPT on tokens where that is better."""
    baseline = lpt_by_tokens(groups, num_ranks)
    floor = max(max(max(x) for x in groups.values()), math.fsum(x for v in groups.values() for x in v) / (num_ranks * slots))
    if max_makespan(groups, baseline, num_ranks, slots) <= floor:
        return baseline
    own = {g: simulate_makespan(sorted(x, reverse=True), slots) for g, x in groups.items()}
    ranks: list[list[float]] = [[] for _ in range(num_ranks)]
    rank_of = {}
    for g in sorted(groups, key=lambda g: (-own[g], -math.fsum(groups[g]), g)):
        costs = [simulate_makespan(sorted(ranks[r] + groups[g], reverse=True), slots) for r in range(num_ranks)]
        best = min(range(num_ranks), key=lambda r: (costs[r], r))
        ranks[best] += groups[g]
        rank_of[g] = best
    if max_makespan(groups, baseline, num_ranks, slots) < max_makespan(groups, rank_of, num_ranks, slots):
        return baseline
    return rank_of


@pytest.mark.parametrize("seed", range(6))
def test_construction_is_exact_despite_pruning(seed):
    rng = random.Random(100 + seed)
    for num_ranks, slots, n in ((3, 2, 4), (8, 4, 8), (5, 16, 3)):
        groups = long_tailed_groups(rng, 40, n)
        assert assign_groups(groups, num_ranks, slots, max_iters=0) == naive_construction(groups, num_ranks, slots)


@pytest.mark.parametrize("seed", range(8))
def test_close_to_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    for num_ranks, num_groups in ((2, 8), (3, 6)):
        slots, n = rng.randint(1, 4), rng.randint(1, 4)
        groups = long_tailed_groups(rng, num_groups, n, cap=200)
        ids = sorted(groups)
        best = min(max_makespan(groups, dict(zip(ids, ranks)), num_ranks, slots)
                   for ranks in itertools.product(range(num_ranks), repeat=num_groups))
        rank_of = assign_groups(groups, num_ranks, slots)
        assert sorted(rank_of) == ids and set(rank_of.values()) <= set(range(num_ranks))
        assert max_makespan(groups, rank_of, num_ranks, slots) <= 1.10 * best


@pytest.mark.parametrize("seed", range(3))
def test_beats_round_robin_and_lpt_on_tokens(seed):
    rng = random.Random(10 + seed)
    num_ranks, slots = 8, 4
    groups = lognormal_groups(rng, 96, 4)
    ours = max_makespan(groups, assign_groups(groups, num_ranks, slots), num_ranks, slots)
    assert ours < max_makespan(groups, round_robin(sorted(groups), num_ranks), num_ranks, slots)
    assert ours <= max_makespan(groups, lpt_by_tokens(groups, num_ranks), num_ranks, slots)


def test_deterministic():
    rng = random.Random(3)
    groups = long_tailed_groups(rng, 200, 8)
    first = assign_groups(groups, 16, 8)
    assert assign_groups(groups, 16, 8) == first
    shuffled = list(groups.items())
    rng.shuffle(shuffled)
    again = assign_groups({g: list(reversed(x)) for g, x in shuffled}, 16, 8)
    assert again == first and list(again.items()) == list(first.items())
