"""Replay a run's saved rollouts through rollout schedules: how much of the rollout makespan any lossless schedule
could save on that workload, and how much of it a schedule that predicts lengths from history could.

A rollout's samples do not depend on where or when a request runs (rollout/sampling.py), so a run with
`run.save_rollouts` (tools/bench/tlt.py saves every mode's) holds the true length of every request of every step,
and each schedule can be replayed on them exactly. The model is the engine's: per rollout-DP rank `slots` KV slots,
a freed slot refilled at once from the rank's queue, one token per live request per decode step, and, with work
stealing, a rank with free slots and an empty queue taking the tail of the fullest other queue
(coordinator/stealing.py). The makespan of a step is the slowest rank's decode steps; the table sums them over the
steps from --skip on. Per schedule, in the order printed:
- round-robin in order, no stealing: `coordinator.*` defaults, the baseline;
- work stealing only;
- the scheduler as the run configures it (coordinator.length_decay): balanced placement, longest-first admission
  and stealing on the predictions it would have had at each step (the history of the steps before);
- the scheduler with each prompt's mean and max over every other step of the run (leave-one-out): more history,
  from the past and the future, than any run has, i.e. what better history-based prediction could reach;
- the scheduler given each group's true mean and max of that step: what perfect group-level prediction reaches;
- the scheduler given every sample's length (each rank's requests admitted longest first);
- the floor max(longest request, tokens / all slots), which no schedule beats.
A decode step here costs the same however many requests are live, so these are counts of work, not seconds: on a
small model on CPU a step's time also grows with its live rows, which balancing tokens across ranks shortens too.

    python tools/bench/sched_replay.py runs/bench_tlt/nosd              # slots from the run's rollout.max_batch
    python tools/bench/sched_replay.py RUN_DIR --slots 64 --skip 2
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from megatron_tlt.config import load_config
from megatron_tlt.coordinator.scheduler import LengthPredictor, admission_order, assign_groups, group_model, round_robin
from megatron_tlt.metrics import ROLLOUTS_DIR, read_jsonl

Key = tuple[int, int]  # (group id, sample index)
Step = tuple[dict[int, list[int]], dict[int, int]]  # ({group id: sample lengths}, {group id: dataset index})


def read_responses(run_dir: Path) -> dict[tuple[int, int, int, int], list[int]]:
    """{(step, group id, dataset index, sample): response token ids} of every rollout-DP rank of a run."""
    return {
        (r["step"], r["group"], r["prompt"], r["sample"]): r["response_ids"]
        for path in sorted((Path(run_dir) / ROLLOUTS_DIR).glob("rank*.jsonl")) for r in read_jsonl(path)
    }


def steps_of(responses: dict) -> dict[int, Step]:
    """{step: ({group: sample lengths, in sample order}, {group: dataset index})} of `read_responses` output."""
    out: dict[int, Step] = {}
    for (step, group, index, _), tokens in sorted(responses.items()):
        lengths, indices = out.setdefault(step, ({}, {}))
        lengths.setdefault(group, []).append(len(tokens))
        indices[group] = index
    return out


def run_schedule(queues: dict[int, list[Key]], lengths: dict[Key, int], slots: int, steal: bool) -> int:
    """Decode steps until every rank's queue and slots are empty, the ranks in lockstep (see the module docstring)."""
    queues = {r: list(q) for r, q in queues.items()}
    live: dict[int, list[int]] = {r: [] for r in queues}  # tokens left per live request
    steps = 0
    while True:
        for r in sorted(queues):
            while len(live[r]) < slots and queues[r]:
                live[r].append(lengths[queues[r].pop(0)])
            while steal and len(live[r]) < slots:
                victims = sorted((v for v in queues if v != r and queues[v]), key=lambda v: (-len(queues[v]), v))
                if not victims:
                    break
                live[r].append(lengths[queues[victims[0]].pop()])
        if not any(live.values()):
            return steps
        steps += 1
        live = {r: [x - 1 for x in left if x > 1] for r, left in live.items()}


def _model(groups: list[list[int]], n: int) -> list[float]:
    """The predictor's group model (coordinator.scheduler.group_model) from these groups' mean length and mean max."""
    mean = math.fsum(map(math.fsum, groups)) / sum(map(len, groups))
    return group_model(mean, math.fsum(map(max, groups)) / len(groups), n)


def _scheduled(predicted: dict[int, list[float]], n: int, ranks: int, slots: int) -> dict[int, list[Key]]:
    """Each rank's queue under the scheduler: balanced placement of the predicted groups, longest-first admission."""
    rank_of = assign_groups(predicted, ranks, slots)
    return {r: [(g, j) for g in admission_order({g: p for g, p in predicted.items() if rank_of[g] == r}) for j in range(n)]
            for r in range(ranks)}


ROWS = ("round-robin in order", "work stealing only", "the scheduler (its history at each step)",
        "the scheduler, history = every other step", "the scheduler, each group's true mean and max",
        "the scheduler, every sample's length", "floor max(longest, tokens / slots)")


def replay(steps: dict[int, Step], ranks: int, slots: int, skip: int, decay: float, default_length: float) -> dict[str, int]:
    """{row of ROWS: decode steps of the slowest rank, summed over the steps >= skip}."""
    predictor = LengthPredictor(decay, default_length)
    history: dict[int, list[list[int]]] = {}  # dataset index -> its groups' lengths, every step
    for groups, indices in steps.values():
        for g, x in groups.items():
            history.setdefault(indices[g], []).append(x)
    total = dict.fromkeys(ROWS, 0)
    for step, (groups, indices) in sorted(steps.items()):
        gids = sorted(groups)
        n = max(len(x) for x in groups.values())
        lengths = {(g, j): x for g in gids for j, x in enumerate(groups[g])}
        keys = {g: [(g, j) for j in range(len(groups[g]))] for g in gids}
        if step >= skip:
            rr = round_robin(gids, ranks)
            in_order = {r: [k for g in gids if rr[g] == r for k in keys[g]] for r in range(ranks)}
            leave_one_out = {}
            for g in gids:
                others = list(history[indices[g]])
                others.remove(groups[g])
                leave_one_out[g] = _model(others, n) if others else predictor.predict(indices[g], n)
            oracle = {g: _model([groups[g]], n) for g in gids}
            per_sample = assign_groups({g: sorted(groups[g], reverse=True) for g in gids}, ranks, slots)
            ends = [
                run_schedule(in_order, lengths, slots, steal=False),
                run_schedule(in_order, lengths, slots, steal=True),
                run_schedule(_scheduled({g: predictor.predict(indices[g], n) for g in gids}, n, ranks, slots), lengths, slots, True),
                run_schedule(_scheduled(leave_one_out, n, ranks, slots), lengths, slots, True),
                run_schedule(_scheduled(oracle, n, ranks, slots), lengths, slots, True),
                run_schedule({r: sorted((k for g in gids if per_sample[g] == r for k in keys[g]), key=lambda k: (-lengths[k], k))
                              for r in range(ranks)}, lengths, slots, True),
                max(max(lengths.values()), math.ceil(sum(lengths.values()) / (ranks * slots))),
            ]
            for row, end in zip(ROWS, ends):
                total[row] += end
        for g in gids:
            predictor.update(indices[g], groups[g])
    return total


def report(responses: dict, ranks: int, slots: int, skip: int, decay: float, default_length: float) -> list[str]:
    """The printed table of `replay` over `read_responses` output."""
    steps = steps_of(responses)
    total = replay(steps, ranks, slots, skip, decay, default_length)
    base = total[ROWS[0]]
    measured = sum(1 for s in steps if s >= skip)
    lines = [f"schedules replayed on the run's true lengths ({ranks} rollout-DP ranks x {slots} slots; the slowest rank's "
             f"decode steps summed over {measured} steps):"]
    lines += [f"  {row:<48} {end:>8}  {100 * (1 - end / max(base, 1)):5.1f}% shorter" for row, end in total.items()]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory with rollouts/ (run.save_rollouts=true)")
    p.add_argument("--slots", type=int, default=0, help="KV slots per rank (default: the run's rollout.max_batch)")
    p.add_argument("--skip", type=int, default=1, help="first steps left out of the sums (as tools/bench/tlt.py)")
    a = p.parse_args(argv)
    cfg = load_config(a.run_dir / "config.yaml")
    slots = a.slots or cfg.rollout.max_batch
    if not slots:
        p.error("the run has no rollout.max_batch: pass --slots (the engine's KV slots per rank)")
    responses = read_responses(a.run_dir)
    if not responses:
        p.error(f"{a.run_dir / ROLLOUTS_DIR} holds no rollouts: run with run.save_rollouts=true")
    ranks = len(list((a.run_dir / ROLLOUTS_DIR).glob("rank*.jsonl")))
    for line in report(responses, ranks, slots, a.skip, cfg.coordinator.length_decay, cfg.rollout.max_new_tokens / 2):
        print(line)


if __name__ == "__main__":
    main()
