"""Sampling: the parameters, the exact distribution sampled from, and position-keyed noise.

Why: speculative decoding must reproduce plain decoding. The distribution sampled from is one standalone
function, `target_logprobs`, used by the plain decode step, by speculative verification at every drafted
position, and for the per-token logprobs a rollout returns. The random draw is Gumbel-max with noise that
is a pure function of (request seed, response position, token id) (`gumbel_noise`, a counter-based hash:
no generator state, no per-row kernels, no host sync, so it also runs inside CUDA graphs). Whoever
evaluates a request's distribution at response position t (a plain decode step, a verify forward over a
draft tree, any batch, slot or rank) therefore draws the same token: speculative decoding that accepts
a draft iff it equals that token emits exactly the plain sample (coupling by shared noise; Daliri, Musco
& Suresh 2024, "Coupling without Communication and Drafter-Invariant Speculative Decoding").

How to use:

    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=512, seed=0).validate()
    logp = target_logprobs(logits, params)                # logits [B, V] -> log-probs [B, V]
    seeds = torch.tensor([derive_seed(params.seed, prompt_id, j) for j in range(B)])    # [B] one per request
    tokens = sample(logp[:, None], seeds, response_positions[:, None])[:, 0]            # [B]
    token_logprobs = logp.gather(-1, tokens[:, None])     # [B, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def _int64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores (multiplications wrap around modulo 2^64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment and multipliers (Steele, Lea & Flood 2014)
_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words whose every output bit depends on every input bit."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def noise_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds [B] int64, positions [B, T] int64 -> [B, T] int64: one 64-bit key per (request, response position)."""
    return _mix64(_mix64(seeds[:, None] * _GOLDEN + _GOLDEN) ^ positions)


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys [...] int64 (from `noise_keys`) -> [..., V] fp32 Gumbel(0, 1) noise, a pure function of (key, token id).

    Token v's word is splitmix64 of key + (v + 1) * golden; its top 24 bits give u in [0, 1), E = -log(1 - u)
    ~ Exp(1) (kept >= 2^-25, half a step, so its log is finite), and the noise is -log E.
    """
    tokens = torch.arange(1, vocab_size + 1, dtype=torch.long, device=keys.device) * _GOLDEN  # [V]
    u = _shr(_mix64(keys[..., None] + tokens), 40).float() * 2.0**-24  # [..., V] in [0, 1 - 2^-24]
    return torch.log1p(-u).neg_().clamp_min_(2.0**-25).log_().neg_()


# Noise elements per chunk of `sample`: bounds its int64 temporaries (8 bytes each, a few at a time).
_CHUNK_ELEMENTS = 1 << 24


def sample(logprobs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """logprobs [B, T, V] (rows may hold -inf), seeds [B], positions [B, T] -> [B, T] int64 tokens, no host sync.

    Gumbel-max with position-keyed noise: argmax_v logp_v + G_v picks v with probability p_v, and G depends
    only on (seed, position, v), so whoever evaluates row (b, t) (plain decoding, a verify forward, another
    batch, another rank) draws the same token from the same distribution. Greedy targets (one-hot logp) give
    their argmax whatever the noise: `greedy` skips drawing it.
    """
    if greedy:
        return logprobs.argmax(dim=-1)
    B, T, V = logprobs.shape
    keys = noise_keys(seeds, positions).flatten()  # [B*T]
    flat = logprobs.reshape(B * T, V)
    step = max(1, _CHUNK_ELEMENTS // V)
    tokens = [
        (flat[i : i + step].float() + gumbel_noise(keys[i : i + step], V)).argmax(dim=-1) for i in range(0, B * T, step)
    ]
    return torch.cat(tokens).view(B, T)
