"""Rollout: the generation engine (KV cache, batching, sampling, stop conditions, per-token logprobs).

    from megatron_tlt.rollout import RolloutEngine, SamplingParams
    completions = RolloutEngine(model).generate(prompt_ids, SamplingParams(n=8, max_new_tokens=1024))
"""
from megatron_tlt.rollout.engine import Completion, DecodeRows, RolloutEngine, StepOutput
from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs

__all__ = ["Completion", "DecodeRows", "RolloutEngine", "SamplingParams", "StepOutput", "sample", "target_logprobs"]
