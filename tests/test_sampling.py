"""Position-keyed sampling noise (DESIGN invariant 4): a pure function of (request seed, response position,
token id) that is Gumbel(0, 1) distributed and independent across tokens, positions and seeds, and a
sampler that follows the distribution it is given.

The reference below re-implements the documented construction with Python integers (splitmix64's
finaliser over 64-bit words), so the vectorised int64 version is checked bit for bit, wrap-around
multiplication and logical shifts included. Statistical thresholds hold with probability >= 1 - 1e-4.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tlt.rollout import sampling
from megatron_tlt.rollout.sampling import gumbel_noise, noise_keys, sample

MASK = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & MASK
    z = ((z ^ (z >> 27)) * MIX2) & MASK
    return z ^ (z >> 31)


def _reference_u(seed: int, position: int, token: int) -> float:
    key = _mix(_mix((seed * GOLDEN + GOLDEN) & MASK) ^ position)
    return (_mix((key + (token + 1) * GOLDEN) & MASK) >> 40) / 2**24


def test_noise_equals_the_reference_construction():
    seeds = torch.tensor([0, 1, 2**62 + 12345, 987654321987])
    positions = torch.tensor([[0, 1, 511], [7, 7, 8], [0, 3, 100000], [2, 4, 6]])
    g = gumbel_noise(noise_keys(seeds, positions), 50)  # [4, 3, 50]
    for b, seed in enumerate(seeds.tolist()):
        for t, pos in enumerate(positions[b].tolist()):
            for v in (0, 1, 17, 49):
                e = max(-math.log1p(-_reference_u(seed, pos, v)), 2.0**-25)
                assert g[b, t, v].item() == pytest.approx(-math.log(e), rel=1e-6, abs=1e-6)


def _chi2_threshold(dof: int, z: float = 3.72) -> float:
    """Upper 1e-4 quantile of chi-square(dof), Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_noise_is_gumbel_and_independent_across_tokens_positions_and_seeds():
    seeds = torch.arange(256) * 7919 + 3
    positions = torch.arange(64).expand(256, 64)
    g = gumbel_noise(noise_keys(seeds, positions), 64).double()  # [256 seeds, 64 positions, 64 tokens]
    n = g.numel()
    # Kolmogorov-Smirnov against Gumbel(0, 1): F(x) = exp(-exp(-x))
    x = g.flatten().sort().values
    cdf = torch.exp(-torch.exp(-x))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 2.0 / math.sqrt(n), f"KS distance {ks:.2e}"
    assert abs(g.mean().item() - 0.5772157) < 5 * (math.pi / math.sqrt(6)) / math.sqrt(n)
    # Pairs of neighbours (next token, next position, next seed) are uniform on [0,1)^2 after the CDF transform
    u = torch.exp(-torch.exp(-g))  # [S, T, V] U(0, 1)
    bins = 8
    for name, a, b in [("token", u[..., :-1], u[..., 1:]), ("position", u[:, :-1], u[:, 1:]), ("seed", u[:-1], u[1:])]:
        cells = (a * bins).long().clamp(max=bins - 1) * bins + (b * bins).long().clamp(max=bins - 1)
        counts = torch.bincount(cells.flatten(), minlength=bins * bins).double()
        expected = cells.numel() / bins**2
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < _chi2_threshold(bins**2 - 1), f"neighbouring {name}s: chi2 {chi2:.1f}"


def test_sample_follows_the_given_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    n = 20000
    logp = probs.log().expand(n, 1, 5)  # [B, T=1, V] with a -inf column
    tokens = sample(logp, torch.arange(n), torch.zeros(n, 1, dtype=torch.long))
    freqs = torch.bincount(tokens.flatten(), minlength=5).double() / n
    expected = probs.double() * n
    chi2 = ((freqs[:4] * n - expected[:4]) ** 2 / expected[:4]).sum().item()
    assert chi2 < _chi2_threshold(3) and freqs[4] == 0
    assert torch.equal(sample(logp, torch.arange(n), torch.zeros(n, 1, dtype=torch.long), greedy=True), logp.argmax(-1))


def test_a_row_draws_the_same_token_in_any_batch_and_chunking(monkeypatch):
    logp = torch.randn(6, 3, 40, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    seeds, positions = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([[0, 1, 2], [4, 4, 4], [9, 3, 1]] * 2)
    batch = sample(logp, seeds, positions)
    assert torch.equal(sample(logp[2:3], seeds[2:3], positions[2:3]), batch[2:3])
    assert torch.equal(sample(logp[:, 1:], seeds, positions[:, 1:]), batch[:, 1:])
    monkeypatch.setattr(sampling, "_CHUNK_ELEMENTS", 50)  # one row per chunk
    assert torch.equal(sample(logp, seeds, positions), batch)
    # another seed or position is another draw (60 near-uniform rows: equal by chance with negligible odds)
    flat = torch.zeros(60, 1, 1000)
    base = sample(flat, torch.arange(60), torch.zeros(60, 1, dtype=torch.long))
    assert (sample(flat, torch.arange(60) + 100, torch.zeros(60, 1, dtype=torch.long)) != base).sum() > 50
    assert (sample(flat, torch.arange(60), torch.ones(60, 1, dtype=torch.long)) != base).sum() > 50
