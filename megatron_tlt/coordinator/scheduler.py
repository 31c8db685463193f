"""Long-tail-aware prompt assignment: predict each group's response lengths, then place whole groups on
rollout-DP ranks so that the slowest rank finishes as early as possible.

A rank's rollout time is its number of decode steps: its engine decodes up to `slots` requests at once
and refills a finished request's slot from its queue at once, and a step costs about the same however
many rows are live. So a rank's cost is the makespan of list scheduling its requests on `slots` machines
(`simulate_makespan`), with the rank admitting them longest-first (`admission_order`). Pure Python, no
collectives: every rank computes the same assignment from the same inputs.

    predictor = LengthPredictor(default_length=cfg.rollout.max_new_tokens / 2)
    groups = {gid: predictor.predict(dataset_index, cfg.rollout.n) for gid, dataset_index in drawn.items()}
    rank_of = assign_groups(groups, num_ranks=dp_size, slots=slots)          # {group id: rank}
    ...                                                                      # after the rollout:
    predictor.update(dataset_index, [len(s.response) for s in group_samples])

Lengths are in tokens (= decode steps of that request); makespans are in decode steps.
"""
from __future__ import annotations

import bisect
import heapq
import math
import operator

_REL_SLACK = 1e-9  # lower bounds are shrunk by this much so that float rounding never prunes a tie


class LengthPredictor:
    """Per prompt (keyed by dataset index) exponential moving averages of its group's mean and max response
    length over the steps it was seen: `ema <- decay * ema + (1 - decay) * observed`, the first
    observation taken as is.

    Model of a group of n samples (`predict`): one sample at the EMA max and the other n - 1 at
    `(n * mean - max) / (n - 1)`, so the predicted group keeps both the observed total (n * mean) and the
    observed tail (max). These are the two quantities a rank's makespan depends on (it is at least
    total / slots and at least the longest request), and the two the EMAs estimate well from a handful
    of past groups; a finer shape would need more samples per prompt than RL gives.

    A prompt never seen is predicted from the mean over all seen prompts of their EMA mean and EMA max
    (the population's length distribution, exact and independent of update order), and before any
    observation as n samples of `default_length`.
    """

    def __init__(self, decay: float = 0.5, default_length: float = 64.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not (math.isfinite(default_length) and default_length >= 0.0):
            raise ValueError(f"default_length must be finite and >= 0, got {default_length}")
        self.decay = float(decay)
        self.default_length = float(default_length)
        self._stats: dict[int, tuple[float, float]] = {}  # dataset index -> (EMA mean, EMA max), tokens
        self._population: tuple[float, float] | None = None  # cache of the unseen-prompt fallback

    def __contains__(self, dataset_index: int) -> bool:
        return dataset_index in self._stats

    def update(self, dataset_index: int, lengths: list[int]) -> None:
        """Fold one group's observed response lengths (tokens, one per sample, >= 1 sample) into its EMAs."""
        if not lengths or any(not (math.isfinite(x) and x >= 0) for x in lengths):
            raise ValueError(f"lengths must be a non-empty list of finite values >= 0, got {lengths}")
        mean, top = math.fsum(lengths) / len(lengths), float(max(lengths))
        old = self._stats.get(dataset_index)
        if old is not None:
            d = self.decay
            mean, top = d * old[0] + (1.0 - d) * mean, d * old[1] + (1.0 - d) * top
        self._stats[dataset_index] = (mean, top)
        self._population = None

    def stats(self, dataset_index: int) -> tuple[float, float]:
        """(mean, max) length in tokens expected of this prompt's next group: its EMAs, or the fallback."""
        if dataset_index in self._stats:
            return self._stats[dataset_index]
        if not self._stats:
            return self.default_length, self.default_length
        if self._population is None:
            keys = sorted(self._stats)
            self._population = (math.fsum(self._stats[k][0] for k in keys) / len(keys),
                                math.fsum(self._stats[k][1] for k in keys) / len(keys))
        return self._population

    def predict(self, dataset_index: int, n: int) -> list[float]:
        """Predicted lengths (tokens), [n], of a group of n samples: the EMA max first, then n - 1 copies of
        the rest of the EMA total (clamped at 0 if a larger group was observed than n)."""
        return group_model(*self.stats(dataset_index), n)

    def state_dict(self) -> dict:
        """Plain Python state (JSON- and torch.save-safe): {"prompts": [[dataset index, EMA mean, EMA max], ...]}."""
        return {"prompts": [[k, m, x] for k, (m, x) in sorted(self._stats.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output (also after a JSON round trip); predictions come back identical."""
        self._stats = {int(k): (float(m), float(x)) for k, m, x in state["prompts"]}
        self._population = None


def group_model(mean: float, top: float, n: int) -> list[float]:
    """The lengths (tokens), [n], `LengthPredictor` models a group of n samples by from its mean and max: the max
    first, then n - 1 copies of the rest of the total (clamped at 0 if the max exceeds it); [mean] when n = 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return [mean]
    return [top] + [max(0.0, (n * mean - top) / (n - 1))] * (n - 1)


def correlation(predicted: list[float], actual: list[float]) -> float:
    """Pearson correlation of two equally long lists; 0.0 (not nan: it is logged as a metric and averaged)
    with fewer than 2 points or when either list has zero variance."""
    if len(predicted) != len(actual):
        raise ValueError(f"lists differ in length: {len(predicted)} vs {len(actual)}")
    if len(predicted) < 2:
        return 0.0
    mp, ma = math.fsum(predicted) / len(predicted), math.fsum(actual) / len(actual)
    dp, da = [p - mp for p in predicted], [a - ma for a in actual]
    vp, va = math.fsum(d * d for d in dp), math.fsum(d * d for d in da)
    if vp == 0.0 or va == 0.0:
        return 0.0
    return max(-1.0, min(1.0, math.fsum(p * a for p, a in zip(dp, da)) / math.sqrt(vp * va)))


def simulate_makespan(lengths: list[float], slots: int) -> float:
    """Decode steps a rank with `slots` KV slots needs for requests of these lengths (tokens) admitted in
    this order: each request takes the earliest free slot; the makespan is the last finish. O(n log slots)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    return _resume([], list(lengths), slots)


def _resume(busy: list[float], lengths: list[float], slots: int) -> float:
    """The makespan of a list schedule continued from `busy` (a heap of the finish times of the requests
    holding slots, <= slots of them; the other slots free at 0). A slot's finish time only grows, so the
    makespan is the latest finish left in the heap. `busy` is consumed."""
    fill = slots - len(busy)
    if fill > 0:
        busy.extend(lengths[:fill])
        heapq.heapify(busy)
    for length in lengths[max(fill, 0):]:
        heapq.heapreplace(busy, busy[0] + length)
    return max(busy, default=0.0)


def admission_order(groups: dict[int, list[float]]) -> list[int]:
    """Group ids of one rank in the order it should admit them: longest predicted sample first (ties by id)."""
    return sorted(groups, key=lambda g: (-max(groups[g], default=0.0), g))


def round_robin(group_ids: list[int], num_ranks: int) -> dict[int, int]:
    """{group id: rank}: the k-th id to rank k % num_ranks (today's `assign_prompts`), the baseline."""
    return {g: k % num_ranks for k, g in enumerate(group_ids)}


def lpt_by_tokens(groups: dict[int, list[float]], num_ranks: int) -> dict[int, int]:
    """{group id: rank}: groups by total predicted tokens, largest first (ties by id), each to the rank with
    the least total so far (ties to the lowest rank). The token-balancing baseline."""
    totals = {g: math.fsum(lengths) for g, lengths in groups.items()}
    load = [(0.0, r) for r in range(num_ranks)]  # a heap of (total tokens, rank)
    rank_of = {}
    for g in sorted(groups, key=lambda g: (-totals[g], g)):
        total, r = heapq.heappop(load)
        rank_of[g] = r
        heapq.heappush(load, (total + totals[g], r))
    return rank_of


def max_makespan(groups: dict[int, list[float]], rank_of: dict[int, int], num_ranks: int, slots: int) -> float:
    """The predicted rollout time (decode steps) of an assignment: the max over ranks of the makespan of the
    rank's requests admitted longest-first."""
    per_rank: list[list[float]] = [[] for _ in range(num_ranks)]
    for g, lengths in groups.items():
        per_rank[rank_of[g]].extend(lengths)
    return max(simulate_makespan(sorted(x, reverse=True), slots) for x in per_rank)


class _Ranks:
    """An assignment under search. Per rank: its groups, its lengths longest first, their total, and its
    schedule request by request (`done[r][k]`: the makespan of its first k lengths; `heaps[r][k]`: the
    slot finish times after them). Taking a group out or putting one in leaves the schedule of the
    lengths longer than all of the group's as it is, so only the rest is simulated again."""

    def __init__(self, groups: dict[int, list[float]], num_ranks: int, slots: int):
        self.groups = {g: sorted(lengths, reverse=True) for g, lengths in groups.items()}
        self.head = {g: lengths[0] if lengths else 0.0 for g, lengths in self.groups.items()}
        self.total = {g: math.fsum(lengths) for g, lengths in groups.items()}
        self.slots = slots
        self.members: list[list[int]] = [[] for _ in range(num_ranks)]  # group ids, sorted
        self.lengths: list[list[float]] = [[] for _ in range(num_ranks)]  # tokens, longest first
        self.totals = [0.0] * num_ranks  # tokens
        self.done = [[0.0] for _ in range(num_ranks)]  # [len(lengths[r]) + 1] decode steps
        self.heaps: list[list[tuple[float, ...]]] = [[()] for _ in range(num_ranks)]  # [len(lengths[r]) + 1]

    def cost(self, r: int) -> float:
        return self.done[r][-1]

    def _rest(self, r: int, out: int | None, add: int | None) -> tuple[int, list[float]]:
        """(kept, rest): how many of rank r's lengths are longer than all of `out`'s and `add`'s (their
        schedule stays), and the lengths after them, longest first, with `out` taken out and `add` put in."""
        head = max(self.head[out] if out is not None else 0.0, self.head[add] if add is not None else 0.0)
        kept = bisect.bisect_left(self.lengths[r], -head, key=operator.neg)
        rest = self.lengths[r][kept:]
        if out is not None:
            for x in self.groups[out]:
                rest.remove(x)
        if add is not None:
            rest.extend(self.groups[add])
            rest.sort(reverse=True)
        return kept, rest

    def bound(self, r: int, out: int | None = None, add: int | None = None) -> float:
        """A lower bound of rank r's makespan with group `out` taken out and `add` put in, without simulating:
        the unchanged start of the schedule; `add`'s longest request started no earlier than the first slot
        to free after that start; all tokens over all slots (shrunk by the slack); with nothing taken out,
        the makespan now. (Putting a request into a longest-first list never shortens its schedule: each
        admission adds to the least-loaded slot, which keeps the sorted slot loads elementwise at least as
        high, rounding included, so the last ones stay so too.)"""
        head = max(self.head[out] if out is not None else 0.0, self.head[add] if add is not None else 0.0)
        kept = bisect.bisect_left(self.lengths[r], -head, key=operator.neg)
        lb = self.cost(r) if out is None else self.done[r][kept]
        if add is not None:
            busy = self.heaps[r][kept]
            lb = max(lb, (busy[0] if len(busy) == self.slots else 0.0) + self.head[add])
        total = self.totals[r] - (self.total[out] if out is not None else 0.0) + (self.total[add] if add is not None else 0.0)
        return max(lb, total / self.slots * (1.0 - _REL_SLACK))

    def evaluate(self, r: int, out: int | None = None, add: int | None = None) -> float:
        """Rank r's exact makespan with group `out` taken out and `add` put in."""
        kept, rest = self._rest(r, out, add)
        return _resume(list(self.heaps[r][kept]), rest, self.slots)

    def change(self, r: int, out: int | None = None, add: int | None = None) -> None:
        """Take group `out` off rank r and put group `add` on it."""
        kept, rest = self._rest(r, out, add)
        self.members[r] = sorted([g for g in self.members[r] if g != out] + ([add] if add is not None else []))
        self.lengths[r] = self.lengths[r][:kept] + rest
        self.totals[r] = math.fsum(self.lengths[r])
        busy = list(self.heaps[r][kept])
        del self.done[r][kept + 1:], self.heaps[r][kept + 1:]
        for length in rest:
            finish = length if len(busy) < self.slots else busy[0] + length
            if len(busy) < self.slots:
                heapq.heappush(busy, finish)
            else:
                heapq.heapreplace(busy, finish)
            self.done[r].append(max(self.done[r][-1], finish))
            self.heaps[r].append(tuple(busy))

    def assignment(self) -> dict[int, int]:
        return {g: r for r, members in enumerate(self.members) for g in members}


def assign_groups(groups: dict[int, list[float]], num_ranks: int, slots: int, max_iters: int = 64) -> dict[int, int]:
    """{group id: rank} placing whole groups (predicted lengths in tokens, [n] each) on `num_ranks` ranks of
    `slots` slots, minimising the max over ranks of the rank's makespan with its requests admitted
    longest-first.

    Start: the LPT-by-tokens baseline if it already reaches the optimum's lower bound (the longest
    request, or all tokens over all slots), else LPT by simulated makespan (groups by their own makespan on one rank, largest first, ties by
    id; each to the rank whose makespan after adding it is smallest, ties to the lowest rank), or the
    LPT-by-tokens baseline where that is better, so the result is never worse than the baseline. Then up
    to `max_iters` local-search steps: move one group off the worst rank, or swap one of its groups with
    a smaller one of another rank, accepted when both ranks end below the worst rank's makespan (so
    (max makespan, ranks at it) falls strictly); it stops early at that lower bound. Deterministic: sorted iteration, id and rank tie-breaks.
    """
    if num_ranks < 1 or slots < 1:
        raise ValueError(f"num_ranks and slots must be >= 1, got {num_ranks}, {slots}")
    st = _Ranks(groups, num_ranks, slots)
    floor = max(max(st.head.values(), default=0.0), math.fsum(st.total.values()) / (num_ranks * slots))
    baseline = lpt_by_tokens(groups, num_ranks)
    baseline_cost = max_makespan(groups, baseline, num_ranks, slots)
    if baseline_cost <= floor:
        return baseline  # already optimal: the longest request, or all tokens over all slots
    own = {g: simulate_makespan(lengths, slots) for g, lengths in st.groups.items()}
    for g in sorted(groups, key=lambda g: (-own[g], -st.total[g], g)):
        best, best_r = math.inf, -1
        for lb, r in sorted((st.bound(r, add=g), r) for r in range(num_ranks)):
            if (lb, r) > (best, best_r):
                break  # this rank and all after it can neither beat the best nor tie it at a lower rank
            c = st.evaluate(r, add=g)
            if (c, r) < (best, best_r):
                best, best_r = c, r
        st.change(best_r, add=g)

    if baseline_cost < max(map(st.cost, range(num_ranks))):
        st = _Ranks(groups, num_ranks, slots)
        for g in sorted(groups):
            st.change(baseline[g], add=g)

    for _ in range(max_iters):
        if not _improve(st, own, floor):
            break
    return st.assignment()


def _improve(st: _Ranks, own: dict[int, float], floor: float) -> bool:
    """One local-search step on the worst rank (the first improving move, else the first improving swap);
    False if there is none or the worst rank is at the optimum's lower bound `floor`."""
    num_ranks = len(st.members)
    worst = max(range(num_ranks), key=lambda r: (st.cost(r), -r))
    target = st.cost(worst)
    if target * (1.0 - _REL_SLACK) <= floor:
        return False
    mine = sorted(st.members[worst], key=lambda g: (-own[g], g))
    others = sorted((r for r in range(num_ranks) if r != worst), key=lambda r: (st.cost(r), r))
    for g in mine:
        if st.bound(worst, out=g) >= target or st.evaluate(worst, out=g) >= target:
            continue
        for r in others:
            if st.bound(r, add=g) < target and st.evaluate(r, add=g) < target:
                st.change(worst, out=g)
                st.change(r, add=g)
                return True
    for g in mine:
        for r in others:
            for h in st.members[r]:
                if (st.total[h] >= st.total[g] and st.head[h] >= st.head[g]) or st.bound(worst, g, h) >= target \
                        or st.bound(r, h, g) >= target:
                    continue  # h is no smaller than g, or one of the two ranks cannot end below the target
                if st.evaluate(r, h, g) < target and st.evaluate(worst, g, h) < target:
                    st.change(worst, out=g, add=h)
                    st.change(r, out=h, add=g)
                    return True
    return False
