"""The stages of one RL step on one DP rank: rollout -> rewards -> advantages, and the step's tally.

Every stage takes and returns `rl.sample.Sample`s (new ones: Samples are frozen). A prompt's group stays on
the DP rank that rolled it out: rewards and group-relative advantages are computed there (REINFORCE++'s
batch-wide std with one [3] all-reduce), and `coordinator.exchange` moves only what the packed update needs.

    samples = rollout(engine, prompts, params, policy_version)       # prompts: {group id: PromptExample}
    samples, reward_stats = score(samples, prompts, pool, tokenizer)
    samples, metrics = assign_advantages(samples, cfg.algo, max_new_tokens, ps)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from megatron_tlt.config.schema import AlgoConfig
from megatron_tlt.data.datasets import PromptExample
from megatron_tlt.metrics import length_stats
from megatron_tlt.parallel.collectives import max_over, sum_over
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.algorithms import compute_advantages, filter_groups, overlong_mask, overlong_penalty
from megatron_tlt.rl.sample import Sample
from megatron_tlt.rollout import SamplingParams


def rollout(engine, prompts: dict[int, PromptExample], params: SamplingParams, policy_version: int, shared=None) -> list[Sample]:
    """n samples for each prompt in one engine call; `prompts` maps a global group id to its prompt, which
    also seeds its samples (the same rollouts at any DP size). `shared`: the work-stealing queue, or None."""
    groups = list(prompts)
    completions = engine.generate([prompts[g].prompt_ids for g in groups], params, seed_ids=groups, shared=shared)
    return [
        Sample(prompts[g].prompt_ids, c.token_ids, c.logprobs, group=g, finish_reason=c.finish_reason,
               policy_version=policy_version)
        for g, cs in zip(groups, completions)
        for c in cs
    ]


def reward_row(p: PromptExample, tokenizer) -> dict:
    """The dataset row a reward function receives."""
    return {"prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=True), "answer": p.answer, **p.meta}


def score(samples: list[Sample], prompts: dict[int, PromptExample], pool, tokenizer):
    """The samples with their rewards from the reward pool (`prompts` by group id), and the batch's RewardStats."""
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    rows = [reward_row(prompts[s.group], tokenizer) for s in samples]
    rewards, stats = pool.compute(texts, rows)
    return [replace(s, reward=float(r)) for s, r in zip(samples, rewards)], stats


def assign_advantages(
    samples: list[Sample], algo: AlgoConfig, max_new_tokens: int, ps: ParallelState
) -> tuple[list[Sample], dict[str, float]]:
    """Overlong handling, then per-sample advantages of this rank's groups. Returns (the new samples, metrics
    summed over DP). Every DP rank calls it (REINFORCE++ reduces its batch-wide moments over DP)."""
    masked = 0
    if algo.overlong == "mask":
        keep = overlong_mask([s.finish_reason for s in samples])
        samples = [replace(s, trained=bool(k)) for s, k in zip(samples, keep.tolist())]
        masked = len(samples) - int(keep.sum())
    elif algo.overlong == "penalty":
        pen = overlong_penalty([len(s.response_ids) for s in samples], max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
        samples = [replace(s, reward=s.reward + p) for s, p in zip(samples, pen.tolist())]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples], dtype=torch.long)

    def batch_sum(t: torch.Tensor) -> torch.Tensor:
        return sum_over(ps.dp_group, t, ps.device).to(t.dtype)

    advantages = compute_advantages(algo.advantage, rewards, groups, batch_sum=batch_sum).tolist()
    metrics = {"overlong_masked": sum_over(ps.dp_group, [masked], ps.device)[0]} if algo.overlong == "mask" else {}
    return [replace(s, advantage=a) for s, a in zip(samples, advantages)], metrics


def drop_equal_reward_groups(samples: list[Sample]) -> list[Sample]:
    """Dynamic sampling: the samples of groups whose rewards are not all equal."""
    keep, _ = filter_groups(torch.tensor([s.reward for s in samples]), torch.tensor([s.group for s in samples], dtype=torch.long))
    return [s for s, k in zip(samples, keep.tolist()) if k]


def num_groups(samples: list[Sample], ps: ParallelState) -> int:
    """Distinct groups over all DP ranks (a group lives on one rank)."""
    return int(sum_over(ps.dp_group, [len({s.group for s in samples})], ps.device)[0])


@dataclass
class StepTally:
    """Counters and timings of one RL step on this rank, summed over its rollout rounds."""

    drawn: int = 0  # prompts drawn (more than prompts_per_step when dynamic sampling refills)
    metrics: dict[str, float] = field(default_factory=dict)
    _accepted: int = 0
    _spec_row_steps: int = 0

    def _add(self, key: str, value: float) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value

    def timed(self, key: str, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        self._add(key, time.perf_counter() - t)
        return out

    def add_engine(self, stats) -> None:
        self._accepted += stats.accepted_drafts
        self._spec_row_steps += stats.spec_row_steps

    def add_rewards(self, stats) -> None:
        self._add("reward_errors", stats.num_errors)
        self._add("reward_timeouts", stats.num_timeouts)

    def summary(self, spec_on: bool) -> dict[str, float]:
        out = {"rollout_time_s": 0.0, "reward_time_s": 0.0, "train_time_s": 0.0, **self.metrics, "prompts_drawn": self.drawn}
        if spec_on:  # accept_len only when some step speculated (the adaptive selector may keep SD off)
            out.update(accepted_drafts=self._accepted, spec_row_steps=self._spec_row_steps)
            if self._spec_row_steps:
                out["accept_len"] = self._accepted / self._spec_row_steps
        return out


def step_metrics(batch, tally: StepTally, step_s: float, spec_on: bool, ps: ParallelState) -> dict[str, float]:
    """The step's logged metrics: rewards and lengths of the whole batch (`coordinator.exchange.UpdateBatch`),
    this rank's tally, and the rollout's critical path (the slowest DP rank's rollout time)."""
    lengths = batch.response_lengths
    metrics = {
        "reward_mean": batch.reward_mean, **length_stats(lengths), "step_time_s": step_s,
        "tokens_per_s": sum(lengths) / step_s, "num_samples": len(lengths), "dp_exchange_bytes": batch.bytes_received,
        **tally.summary(spec_on),
    }
    metrics["rollout_time_max_s"] = max_over(ps.dp_group, [metrics["rollout_time_s"]], ps.device)[0]
    return metrics
