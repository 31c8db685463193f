"""Which DP rank rolls out which prompt, and the names of rollouts.

A step's prompts are drawn identically on every rank (`PromptSampler.take`); prompt k of a draw gets the
global group id `first_group + k`, which also seeds its samples (`RolloutId.seed` and the engine's
per-request seeds), so a prompt draws the same samples on whichever rank runs it. Today prompts are dealt
round-robin; the long-tail-aware scheduler replaces `assign_prompts` (DESIGN: coordinator/).

    rid = RolloutId(step, round)                                  # round: dynamic-sampling refill round
    mine = assign_prompts(dataset_indices, first_group, ps)       # {group id: dataset index} of this rank
    params = sampling_params(..., seed=rid.seed(cfg.run.seed))
"""
from __future__ import annotations

from dataclasses import dataclass

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


def assign_prompts(dataset_indices: list[int], first_group: int, ps: ParallelState) -> dict[int, int]:
    """{global group id: dataset index} of the drawn prompts this DP rank rolls out (whole groups, round-robin)."""
    return {first_group + k: i for k, i in enumerate(dataset_indices) if k % ps.dp_size == ps.dp_rank}
