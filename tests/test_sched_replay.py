"""tools/bench/sched_replay.py, the replay of rollout schedules on a run's true lengths: its engine model agrees with
coordinator/scheduler.py's list-scheduling makespan, stealing takes the tail of the fullest other queue, and every
schedule's sum lies between the floor and what it would be alone on one slot."""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))

from sched_replay import ROWS, replay, run_schedule, steps_of  # noqa: E402

from megatron_tlt.coordinator.scheduler import simulate_makespan  # noqa: E402


def test_without_stealing_a_rank_takes_the_list_schedules_makespan():
    rng = random.Random(0)
    for _ in range(20):
        slots = rng.randint(1, 4)
        queues = {r: [(r, j) for j in range(rng.randint(0, 9))] for r in range(3)}
        lengths = {k: rng.randint(1, 50) for q in queues.values() for k in q}
        expected = max(simulate_makespan([lengths[k] for k in q], slots) for q in queues.values())
        assert run_schedule(queues, lengths, slots, steal=False) == expected


def test_an_idle_rank_steals_the_tail_of_the_fullest_queue():
    queues = {0: [(0, 0), (0, 1), (0, 2)], 1: [], 2: [(2, 0)]}
    lengths = {(0, 0): 5, (0, 1): 5, (0, 2): 9, (2, 0): 3}
    # one slot each: at step 0 rank 1 takes (0, 2) (rank 0's tail: its queue is the fullest), done at 9; rank 2 runs
    # its own (2, 0) and at step 3 takes (0, 1), done at 8; rank 0 runs (0, 0) alone, done at 5
    assert run_schedule(queues, lengths, 1, steal=True) == 9
    assert run_schedule(queues, lengths, 1, steal=False) == 19


def test_every_schedule_lies_between_the_floor_and_the_baseline_alone():
    rng = random.Random(1)
    responses = {}
    for step in range(4):
        for group, index in enumerate(rng.sample(range(6), 4)):
            for sample in range(3):
                responses[(step, 10 * step + group, index, sample)] = [7] * rng.randint(1, 40)
    steps = steps_of(responses)
    assert sorted(steps) == [0, 1, 2, 3] and all(len(groups) == 4 for groups, _ in steps.values())
    total = replay(steps, ranks=2, slots=2, skip=1, decay=0.5, default_length=20.0)
    assert list(total) == list(ROWS)
    floor = total[ROWS[-1]]
    one_slot = sum(len(t) for (s, *_), t in responses.items() if s >= 1)  # every token on one slot, one at a time
    assert all(floor <= end <= one_slot for end in total.values())
    assert total[ROWS[-2]] <= total[ROWS[0]]  # knowing every length never loses to round-robin here
