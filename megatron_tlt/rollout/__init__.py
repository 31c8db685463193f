"""Rollout: the generation engine (KV cache, batching, sampling, stop conditions, per-token logprobs) and
speculative decoding with a drafter, its draft shape chosen per batch by an adaptive selector.

Layout: `engine.py` (the loop), `types.py` (its data), `model_calls.py` (every policy and drafter call,
over the KV caches; CUDA graphs via `cuda_graphs.py`; FP8 weights via `fp8.py`), `sampling.py`, and `spec/` (speculative decoding:
tree maths, drafting and verification, the draft-shape selector).

    from megatron_tlt.rollout import RolloutEngine, SamplingParams
    completions = RolloutEngine(model).generate(prompt_ids, SamplingParams(n=8, max_new_tokens=1024))

Code outside `rollout/` imports from here only.
"""
from megatron_tlt.rollout.engine import DEFAULT_SHAPES, DRAFT_MODES, SPEC_MODES, RolloutEngine
from megatron_tlt.rollout.fp8 import QUANTIZED_LINEARS, Fp8Weights
from megatron_tlt.rollout.model_calls import PRECISIONS
from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs
from megatron_tlt.rollout.spec.selector import DraftSelector, DraftShape
from megatron_tlt.rollout.types import Completion, DecodeRows, StepOutput

__all__ = [
    "DEFAULT_SHAPES", "DRAFT_MODES", "PRECISIONS", "QUANTIZED_LINEARS", "SPEC_MODES", "Completion", "DecodeRows", "DraftSelector",
    "DraftShape", "Fp8Weights", "RolloutEngine",
    "SamplingParams", "StepOutput", "sample", "target_logprobs",
]
