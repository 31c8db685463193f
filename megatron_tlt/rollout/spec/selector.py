"""Draft shapes and the adaptive selector that picks one (or "SD off") for each decode step.

Why: speculative decoding pays off only while the live batch is small (the long tail of a rollout);
at large batches the verify forward's extra tokens cost more than the accepted drafts save, and the
best draft shape depends on the batch size, the drafter's current quality and the hardware. TLT picks
it online with a bandit: per bucket of live batch size (the next power of two: the batch a static call
pads to, see cuda_graphs.py), epsilon-greedy over arms (draft shapes and "off") on the committed tokens
per second of each arm's last `window` steps. The window forgets a drafter that got worse.

The statistic is the window's throughput (its tokens over its seconds), not TLT's median of per-step
rates: at a live batch of one or two a speculative step commits 1 token (all drafts rejected) or
depth + 1 (all accepted) far more often than anything between, so the median of a 16-step window
jumps between modes, and it ranked a tree above a chain about 20% faster. Measured on the rollout
benchmark's model (CPU, batch 1, 4 generations of 8 held-out prompts, epsilon 0.1): 151 tokens/s with
the throughput, 136 with the median (one run each); the chain alone made 170. A slow outlier step (a garbage
collection) weighs in at its share of the window's time, which is what it costs.

How to use:

    selector = DraftSelector([DraftShape.chain(4), DraftShape(depth=5, topk=4, num_verify=16)], seed=0)
    shape = selector.choose(batch_size)            # a DraftShape, or None = plain decoding
    ...                                            # run the step, time it (sync first on GPU)
    selector.update(batch_size, shape, tokens=committed, seconds=step_s)

Deterministic for a given seed and reward sequence: the selector draws from its own random.Random.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_tlt.rollout.cuda_graphs import next_power_of_two

OFF = "off"  # name of the "no speculative decoding" arm


@dataclass(frozen=True)
class DraftShape:
    """What one speculative step drafts: `depth` drafter levels, the `topk` children of each frontier
    node per level (EAGLE-2; the frontier keeps the best `topk` nodes), and the best `num_verify`
    draft tokens by cumulative draft score verified at once. topk = 1 is a chain (num_verify = depth),
    drafted by sampling from the drafter's warped distribution and verified with min(1, p/q)."""

    depth: int
    topk: int
    num_verify: int

    @classmethod
    def chain(cls, depth: int) -> "DraftShape":
        return cls(depth, 1, depth)

    def __post_init__(self):
        if self.depth < 1 or self.topk < 1:
            raise ValueError(f"draft depth ({self.depth}) and topk ({self.topk}) must be >= 1")
        if self.is_chain and self.num_verify != self.depth:
            raise ValueError(f"a chain (topk=1) verifies all its depth={self.depth} tokens, got num_verify={self.num_verify}")
        if not 1 <= self.num_verify <= self.pool_size:
            raise ValueError(f"num_verify must be in [1, {self.pool_size}] (the drafted candidates), got {self.num_verify}")

    @property
    def is_chain(self) -> bool:
        return self.topk == 1

    @property
    def pool_size(self) -> int:
        """Candidates drafted: topk children of the root, then topk children of each of topk frontier nodes."""
        return self.topk + (self.depth - 1) * self.topk**2

    @property
    def name(self) -> str:
        return f"chain{self.depth}" if self.is_chain else f"tree{self.depth}x{self.topk}n{self.num_verify}"

    def shrink(self, max_nodes: int) -> Optional["DraftShape"]:
        """This shape cut to at most `max_nodes` verified tokens (room left in the context); None if 0."""
        if max_nodes >= self.num_verify:
            return self
        if max_nodes < 1:
            return None
        depth = min(self.depth, max_nodes)
        return DraftShape.chain(depth) if self.is_chain else DraftShape(depth, self.topk, max_nodes)


def arm_name(shape: Optional[DraftShape]) -> str:
    return OFF if shape is None else shape.name


class DraftSelector:
    """Bucketed epsilon-greedy bandit over draft shapes and "off" (None)."""

    def __init__(
        self,
        arms: Sequence[DraftShape],
        *,
        epsilon: float = 0.1,  # probability of a uniformly random arm (exploration)
        window: int = 16,  # steps kept per (bucket, arm); their tokens / seconds ranks the arm
        min_samples: int = 3,  # every arm of a bucket is tried this often, round-robin, before the greedy choice
        max_spec_batch: int = 32,  # live batches above this always decode plainly
        seed: int = 0,
    ):
        if not arms:
            raise ValueError("the selector needs at least one draft shape")
        if not 0 <= epsilon <= 1 or not 1 <= min_samples <= window or max_spec_batch < 0:
            raise ValueError(
                f"need 0 <= epsilon <= 1, 1 <= min_samples <= window, max_spec_batch >= 0; "
                f"got {epsilon}, {min_samples} and {window}, {max_spec_batch}"
            )
        self.arms: tuple[Optional[DraftShape], ...] = (None, *dict.fromkeys(arms))  # "off" first: it wins ties
        self.epsilon, self.window, self.min_samples, self.max_spec_batch = epsilon, window, min_samples, max_spec_batch
        self._rng = random.Random(seed)
        self._steps: dict[tuple[int, Optional[DraftShape]], deque] = {}  # (bucket, arm) -> (tokens, seconds) of its last steps
        self.choices: dict[int, Counter] = defaultdict(Counter)  # bucket -> arm name -> times chosen

    def _window(self, bucket: int, arm: Optional[DraftShape]) -> deque:
        return self._steps.setdefault((bucket, arm), deque(maxlen=self.window))

    def choose(self, batch_size: int) -> Optional[DraftShape]:
        """The arm for a step over `batch_size` live rows: while some arm of its bucket has fewer than
        `min_samples` rewards, the least tried (one noisy first step must not rule an arm out); then a
        random arm with probability epsilon, else the best window throughput."""
        bucket = next_power_of_two(batch_size)
        if batch_size > self.max_spec_batch:
            arm = None
        else:
            tried = [len(self._window(bucket, a)) for a in self.arms]
            if min(tried) < self.min_samples:
                arm = self.arms[tried.index(min(tried))]
            elif self._rng.random() < self.epsilon:
                arm = self._rng.choice(self.arms)
            else:
                arm = max(self.arms, key=lambda a: self._throughput(bucket, a))
        self.choices[bucket][arm_name(arm)] += 1
        return arm

    def update(self, batch_size: int, arm: Optional[DraftShape], tokens: int, seconds: float) -> None:
        """Record a step that ran `arm` (what actually ran) and committed `tokens` in `seconds` of wall time."""
        self._window(next_power_of_two(batch_size), arm).append((tokens, seconds))

    def _throughput(self, bucket: int, arm: Optional[DraftShape]) -> float:
        steps = self._window(bucket, arm)
        return sum(t for t, _ in steps) / max(sum(s for _, s in steps), 1e-9)
