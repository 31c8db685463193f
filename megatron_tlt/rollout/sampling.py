"""Sampling: the parameters, the exact distribution sampled from, and a sync-free sampler.

Why: speculative decoding is lossless only if it reproduces *the* distribution plain decoding samples
from, so that distribution is one standalone function, `target_logprobs`, used by the plain decode
step, by speculative verification at every drafted position, and for the per-token logprobs a rollout
returns. `sample` draws from any such log-distribution with an exponential race (Gumbel-max), which
needs no cumulative sums, no host sync, and is deterministic for given generators. Each request (one
sample of one prompt) draws from its own generator, `request_generator`, seeded by name, so its draws do
not depend on which other requests share its batch, process or DP rank.

How to use:

    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=512, seed=0).validate()
    logp = target_logprobs(logits, params)            # logits [B, V] -> log-probs [B, V]
    generators = [request_generator(params.seed, prompt_id, j, device) for j in range(B)]  # or one generator
    tokens = sample(logp, generators)                 # [B]
    token_logprobs = logp.gather(-1, tokens[:, None])  # [B, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from megatron_tlt.seeds import derive_seed

Generators = Union[torch.Generator, Sequence[torch.Generator]]


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens holding >= top_p mass; 1 = off
    top_k: int = 0  # keep the k most likely tokens (all tied with the k-th too); 0 = off
    max_new_tokens: int = 256  # response-length limit (the context window may cut it shorter)
    stop_token_ids: tuple[int, ...] = ()  # a response ends at (and includes) the first of these
    n: int = 1  # samples per prompt; they share one prefill
    seed: int = 0  # same seed, prompts and params -> same outputs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first invalid field; return self so calls can chain."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {list(self.stop_token_ids)}")
        return self


def request_generator(seed: int, prompt_id: int, sample_index: int, device) -> torch.Generator:
    """The generator of sample `sample_index` of the prompt named `prompt_id`, seeded with
    `derive_seed(seed, prompt_id, sample_index)` (the same in every process and on every rank)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, prompt_id, sample_index))


def _top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [B, V] -> [B, V] bool, True where the token is below the k-th largest value."""
    kth = torch.topk(x, k, dim=-1).values[:, -1:]  # [B, 1]
    return x < kth


def _top_p_mask(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """x: [B, V] logits -> [B, V] bool, True where the token lies outside the nucleus.

    A token is kept iff the probability mass of the tokens strictly more likely than it (in sorted
    order) is below top_p, so the most likely token is always kept.
    """
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [B, V]
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] exclusive prefix sums
    drop_sorted = mass_before >= top_p
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def target_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [B, V] -> [B, V] fp32 log-probs of the distribution actually sampled from.

    Greedy (temperature 0): 0 at the argmax (first one on ties), -inf elsewhere. Otherwise: divide by
    the temperature, mask to the top-k, then to the top-p nucleus of what is left, renormalise.
    """
    x = logits.float()
    if params.greedy:
        best = x.argmax(dim=-1, keepdim=True)  # [B, 1]
        return torch.full_like(x, float("-inf")).scatter_(-1, best, 0.0)
    x = x / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        x = x.masked_fill(_top_k_mask(x, params.top_k), float("-inf"))
    if params.top_p < 1:
        x = x.masked_fill(_top_p_mask(x, params.top_p), float("-inf"))
    return x.log_softmax(dim=-1)


def exponential_noise(shape: tuple[int, int], generator: Generators, device: torch.device) -> torch.Tensor:
    """[B, V] i.i.d. Exp(1) draws; row b comes from generator[b] when a sequence is given (one small
    kernel per row), else all rows from the one generator. Clamped away from 0 so logs stay finite."""
    if isinstance(generator, torch.Generator):
        noise = torch.empty(shape, device=device).exponential_(generator=generator)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        noise = torch.stack([torch.empty(shape[1], device=device).exponential_(generator=g) for g in generator])
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def sample(logprobs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """logprobs: [B, V] (rows may hold -inf) -> [B] int64 tokens, one draw per row, no host sync.

    Exponential race: argmax_v p_v / E_v with E_v ~ Exp(1) picks v with probability p_v (equivalently
    Gumbel-max: argmax logp_v - log E_v).
    """
    noise = exponential_noise(tuple(logprobs.shape), generator, logprobs.device)  # [B, V]
    return (logprobs.float() - noise.log()).argmax(dim=-1)
