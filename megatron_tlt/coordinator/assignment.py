"""Which DP rank rolls out which prompt, and the names of rollouts.

A step's prompts are drawn identically on every rank (`PromptSampler.take`); prompt k of a draw gets the
global group id `first_group + k`, which also seeds its samples (`RolloutId.seed` and the engine's
per-request seeds), so a prompt draws the same samples on whichever rank runs it, in whatever order: the
scheduler (`RolloutScheduler`, `coordinator.*`) decides both without changing a token. round_robin deals prompt k
of a draw to rank k % dp; balanced places whole groups to minimise the predicted makespan (coordinator/scheduler.py);
longest_first admits a rank's groups longest-predicted first; steal lets a replica whose queue is empty run other
replicas' queued requests (coordinator/stealing.py).

    rid = RolloutId(step, round)                                  # round: dynamic-sampling refill round
    mine = scheduler.assign(dataset_indices, first_group)         # {group id: dataset index} of this rank
    shared = scheduler.shared_queue(str(rid), prompts_of_the_draw, engine.fits)   # None unless steal
    params = sampling_params(..., seed=rid.seed(cfg.run.seed))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_tlt.config.schema import CoordinatorConfig
from megatron_tlt.coordinator.scheduler import LengthPredictor, assign_groups, admission_order, correlation, max_makespan, round_robin
from megatron_tlt.coordinator.stealing import StealingQueue
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.seeds import derive_seed


@dataclass(frozen=True)
class RolloutId:
    """One rollout: RL step `step`, dynamic-sampling round `round` (0 = the step's first draw). Its string
    form names the rollout's keys in the spot trainer's store."""

    step: int
    round: int

    def __str__(self) -> str:
        return f"{self.step}.{self.round}"

    def seed(self, run_seed: int) -> int:
        """The sampling seed of this rollout (the same on every rank)."""
        return derive_seed(run_seed, "rollout", self.step, self.round)


class RolloutScheduler:
    """`coordinator.*`: which rollout-DP rank runs which prompt group, in which order it admits them, the
    length predictions both use (coordinator/scheduler.py), and the work-stealing queue. Every rank holds the
    same predictor (`observe` gathers every group's lengths to every rank), so every rank computes the same
    assignment, and so knows every replica's queue.

        scheduler = RolloutScheduler(cfg.coordinator, ps.rollout, slots=engine.num_slots, n=cfg.rollout.n,
                                     default_length=cfg.rollout.max_new_tokens / 2)
        mine = scheduler.assign(dataset_indices, first_group)   # {group id: dataset index}, in admission order
        shared = scheduler.shared_queue(rid, prompts, engine.fits)   # engine.generate(..., shared=shared)
        metrics = scheduler.observe(samples, mine, engine.stats)   # after the rollout (a collective)
    """

    def __init__(self, cfg: CoordinatorConfig, ps: ParallelState, slots: int, n: int, default_length: float):
        self.cfg, self.ps, self.slots, self.n = cfg, ps, slots, n
        self.predictor = LengthPredictor(cfg.length_decay, default_length)
        self._predicted: dict[int, list[float]] = {}  # group id -> predicted sample lengths, of the last draw
        self._rank_of: dict[int, int] = {}
        self._plan: dict[int, list[int]] = {}  # DP rank -> its group ids of the last draw, in admission order

    def assign(self, dataset_indices: list[int], first_group: int) -> dict[int, int]:
        """{global group id: dataset index} of the drawn prompts this rank rolls out (whole groups), in the order
        its engine admits them. round_robin + in_order is `assign_prompts`."""
        gids = [first_group + k for k in range(len(dataset_indices))]
        self._predicted = {g: self.predictor.predict(i, self.n) for g, i in zip(gids, dataset_indices)}
        dp = self.ps.dp_size
        self._rank_of = round_robin(gids, dp) if self.cfg.assignment == "round_robin" else assign_groups(self._predicted, dp, self.slots)
        self._plan = {r: [g for g in gids if self._rank_of[g] == r] for r in range(dp)}
        if self.cfg.admission == "longest_first":
            self._plan = {r: admission_order({g: self._predicted[g] for g in part}) for r, part in self._plan.items()}
        return {g: dataset_indices[g - first_group] for g in self._plan[self.ps.dp_rank]}

    def shared_queue(self, rid: str, prompts: dict[int, list[int]], fits):
        """The work-stealing queue of the last `assign`'s rollout (`prompts`: every drawn group's prompt ids; `fits`:
        the engine's, which prompts it can run), or None when `coordinator.steal` is off or there is one replica."""
        if not self.cfg.steal or self.ps.dp_size == 1:
            return None
        return StealingQueue(rid, self._plan, prompts, self.n, fits, self.ps, timeout_s=self.cfg.steal_timeout_s)

    def observe(self, samples, mine: dict[int, int], engine_stats) -> dict[str, float]:
        """After the rollout of `assign`'s draw: every group's response lengths to every DP rank (one all_gather of
        small lists), folded into the predictor in group order; returns the draw's scheduling metrics."""
        lengths: dict[int, list[int]] = {g: [] for g in mine}
        for s in samples:
            lengths[s.group].append(len(s.response_ids))
        local = [(g, mine[g], lengths[g]) for g in mine]
        mine_stats = (local, engine_stats.wall_s, float(len(engine_stats.decode_batch_sizes)), engine_stats.stolen)
        if self.ps.dp_size > 1:
            everyone: list = [None] * self.ps.dp_size
            dist.all_gather_object(everyone, mine_stats, group=self.ps.dp_group)
        else:
            everyone = [mine_stats]
        groups = sorted(g for part, *_ in everyone for g in part)
        predicted = [sum(self._predicted[g]) / len(self._predicted[g]) for g, _, _ in groups]
        actual = [sum(x) / len(x) for _, _, x in groups]
        for _, index, x in groups:
            self.predictor.update(index, x)
        times = [t for _, t, _, _ in everyone]
        predicted_groups = {g: self._predicted[g] for g, _, _ in groups}
        return {
            "sched_predicted_makespan": max_makespan(predicted_groups, self._rank_of, self.ps.dp_size, self.slots),
            "sched_actual_makespan": max(steps for _, _, steps, _ in everyone),  # decode steps
            "sched_length_corr": correlation(predicted, actual),
            "rollout_imbalance": max(times) / max(sum(times) / len(times), 1e-9),
            "rollout_idle_rank_s": sum(max(times) - t for t in times),
            "sched_stolen": float(sum(stolen for *_, stolen in everyone)),  # requests run by another replica than assigned
        }

    def state_dict(self) -> dict:
        return self.predictor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state)
