"""Greedy held-out accuracy, split across DP ranks, scored through the run's reward pool.

    accuracy = evaluate(engine, eval_ds, pool, tokenizer, max_new_tokens, ps)   # reward >= 1 is correct

The rewards go through the same `rl.rewards.RewardPool` as the training rollouts, so they get the same
per-call timeout (`reward.timeout_s`) and accounting: a call that hangs, raises, kills its worker or returns
a non-finite number scores 0 (not correct), is counted in `pool.stats` and logged; it never hangs or ends
the run.
"""
from __future__ import annotations

from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.parallel.collectives import sum_over
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rollout import SamplingParams
from megatron_tlt.step.stages import reward_row


def evaluate(engine, dataset: PromptDataset, pool, tokenizer, max_new_tokens: int, ps: ParallelState) -> float:
    """The fraction of held-out prompts whose greedy answer scores >= 1 (every DP rank takes a share)."""
    mine = dataset.examples[ps.dp_rank :: ps.dp_size]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    correct = 0
    if mine:
        completions = engine.generate([p.prompt_ids for p in mine], params)
        texts = [tokenizer.decode(cs[0].token_ids, skip_special_tokens=True) for cs in completions]
        rewards, _ = pool.compute(texts, [reward_row(p, tokenizer) for p in mine])
        correct = sum(int(r >= 1.0) for r in rewards)  # the pool scores failures (and non-finite values) 0
    total_correct, total = sum_over(ps.dp_group, [correct, len(mine)], ps.device)
    return total_correct / total
