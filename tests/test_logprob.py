"""Chunked vocab-parallel logprob/entropy equals the naive full-logits reference, values and gradients,
without TP and under TP=2 in real gloo processes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.ops.logprob import vocab_parallel_logprobs


def _naive(hidden, weight, targets, vocab_size, temperature):
    """Full [T, V] logits with padding columns at -inf -> (logprobs [T], entropy [T])."""
    logits = (hidden @ weight.t()) / temperature  # [T, V_padded]
    padding = torch.arange(weight.shape[0]) >= vocab_size  # [V_padded]
    logp = torch.log_softmax(logits.masked_fill(padding, float("-inf")), dim=-1)  # [T, V_padded]
    entropy = -(logp.exp() * logp.masked_fill(padding, 0.0)).sum(dim=-1)  # [T]
    return logp.gather(1, targets[:, None]).squeeze(1), entropy


def _inputs(seed, num_tokens, hidden_size, padded_vocab, vocab_size, dtype):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, dtype=torch.float64).to(dtype)  # [T, H]
    weight = torch.randn(padded_vocab, hidden_size, generator=gen, dtype=torch.float64).to(dtype)  # [V_padded, H]
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=gen)  # [T]
    grad_lp = torch.randn(num_tokens, generator=gen, dtype=torch.float64)  # [T]
    grad_ent = torch.randn(num_tokens, generator=gen, dtype=torch.float64)  # [T]
    return hidden, weight, targets, grad_lp, grad_ent


def _values_and_grads(fn, hidden, weight, targets, grad_lp, grad_ent, use_logprobs=True, use_entropy=True):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight, targets)
    loss = (logprobs * grad_lp.to(logprobs.dtype)).sum() * use_logprobs
    loss = loss + (entropy * grad_ent.to(entropy.dtype)).sum() * use_entropy
    loss.backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_logprobs,use_entropy", [(True, True), (True, False), (False, True)])
def test_matches_naive_reference_fp64(temperature, use_logprobs, use_entropy):
    # T=37 tokens in chunks of 8 (last chunk 5); 50 weight rows of which 45 are real tokens.
    hidden, weight, targets, grad_lp, grad_ent = _inputs(0, 37, 16, 50, 45, torch.float64)
    ours = _values_and_grads(
        lambda h, w, t: vocab_parallel_logprobs(h, w, t, vocab_size=45, chunk_size=8, temperature=temperature),
        hidden, weight, targets, grad_lp, grad_ent, use_logprobs, use_entropy,
    )
    ref = _values_and_grads(
        lambda h, w, t: _naive(h, w, t, 45, temperature), hidden, weight, targets, grad_lp, grad_ent, use_logprobs, use_entropy
    )
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert torch.all(ours[3][45:] == 0), "padding rows of the weight must get zero gradient"


def test_fp32_matches_naive_reference():
    hidden, weight, targets, grad_lp, grad_ent = _inputs(1, 100, 32, 64, 60, torch.float32)
    ours = _values_and_grads(
        lambda h, w, t: vocab_parallel_logprobs(h, w, t, vocab_size=60, chunk_size=33, temperature=0.9),
        hidden, weight, targets, grad_lp, grad_ent,
    )
    ref = _values_and_grads(lambda h, w, t: _naive(h, w, t, 60, 0.9), hidden, weight, targets, grad_lp, grad_ent)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gradcheck_tiny():
    hidden, weight, targets, _, _ = _inputs(2, 5, 3, 7, 6, torch.float64)
    hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda h, w: vocab_parallel_logprobs(h, w, targets, vocab_size=6, chunk_size=2, temperature=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_bf16_grads_keep_input_dtype():
    hidden, weight, targets, grad_lp, grad_ent = _inputs(3, 20, 16, 32, 32, torch.bfloat16)
    logprobs, entropy, grad_hidden, grad_weight = _values_and_grads(
        lambda h, w, t: vocab_parallel_logprobs(h, w, t, chunk_size=6), hidden, weight, targets, grad_lp, grad_ent
    )
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    naive = lambda h, w, t: _naive(h, w, t, 32, 1.0)  # noqa: E731
    ref = _values_and_grads(naive, hidden.double(), weight.double(), targets, grad_lp, grad_ent)
    torch.testing.assert_close(logprobs.double(), ref[0], rtol=0.02, atol=0.1)
    torch.testing.assert_close(grad_hidden.double(), ref[2], rtol=0.05, atol=0.1)


def test_out_of_range_target_raises():
    hidden, weight, targets, _, _ = _inputs(4, 6, 4, 10, 8, torch.float32)
    targets[3] = 8  # vocab_size is 8: ids 8 and 9 are padding columns
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_logprobs(hidden, weight, targets, vocab_size=8)


def _tp_worker(rank: int, world_size: int) -> None:
    torch.manual_seed(0)  # same draws on every rank: tensors below are replicated
    group = dist.group.WORLD
    local_vocab = 24
    # (vocab_size, dtype, tol): padding inside rank 1's shard; rank 1 all padding; no padding in fp32.
    for vocab_size, dtype, tol in [(40, torch.float64, 1e-10), (20, torch.float64, 1e-10), (48, torch.float32, 1e-5)]:
        hidden, weight, targets, grad_lp, grad_ent = _inputs(vocab_size, 29, 12, local_vocab * world_size, vocab_size, dtype)
        shard = slice(rank * local_vocab, (rank + 1) * local_vocab)
        ours = _values_and_grads(
            lambda h, w, t: vocab_parallel_logprobs(
                h, w[shard], t, tp_group=group, vocab_size=vocab_size, chunk_size=7, temperature=0.8
            ),
            hidden, weight, targets, grad_lp, grad_ent,
        )
        ref = _values_and_grads(lambda h, w, t: _naive(h, w, t, vocab_size, 0.8), hidden, weight, targets, grad_lp, grad_ent)
        # Each rank's weight grad is nonzero only on its own shard; summing across ranks assembles the full grad.
        grad_weight = ours[3].clone()
        dist.all_reduce(grad_weight, group=group)
        for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], [*ours[:3], grad_weight], ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"rank {rank} vocab_size {vocab_size} {name}: {m}")


def test_tp2_matches_single_process():
    run_distributed(_tp_worker, world_size=2)
