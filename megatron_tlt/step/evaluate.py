"""Greedy held-out accuracy, split across DP ranks.

    accuracy = evaluate(engine, eval_ds, reward_fn, tokenizer, max_new_tokens, ps)   # reward >= 1 is correct
"""
from __future__ import annotations

from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.parallel.collectives import sum_over
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rollout import SamplingParams
from megatron_tlt.step.stages import reward_row


def evaluate(engine, dataset: PromptDataset, reward_fn, tokenizer, max_new_tokens: int, ps: ParallelState) -> float:
    """The fraction of held-out prompts whose greedy answer scores >= 1 (every DP rank takes a share)."""
    mine = dataset.examples[ps.dp_rank :: ps.dp_size]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    correct = 0
    if mine:
        for p, cs in zip(mine, engine.generate([p.prompt_ids for p in mine], params)):
            text = tokenizer.decode(cs[0].token_ids, skip_special_tokens=True)
            correct += int(reward_fn(text, reward_row(p, tokenizer)) >= 1.0)
    total_correct, total = sum_over(ps.dp_group, [correct, len(mine)])
    return total_correct / total
