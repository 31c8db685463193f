"""The policy's forward modes agree with the plainest one: each sequence alone through the dense causal
forward. Covers DESIGN invariant 1 (packing is exact: logits, logprobs and parameter gradients), the
KV-cache path (padded prefill, decode with a shrinking batch and reused slots, tree-masked verify) and
the packed-attention backend choice. Single process, CPU, fp32.
"""
from __future__ import annotations

import pytest
import torch

from megatron_tlt.config.schema import ModelConfig, RopeScalingConfig
from megatron_tlt.data.packing import pack_sequences, unpack
from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.attention import packed_attention, select_backend
from megatron_tlt.ops.logprob import vocab_parallel_logprobs
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; the same maths summed in a different order
VOCAB = 100  # padded to 128 rows, so the padding columns take part
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4, num_kv_heads=2)
VARIANTS = {
    "base": {},
    "gqa": dict(num_kv_heads=1),
    "qk_norm": dict(qk_norm=True),
    "qkv_bias": dict(qkv_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "all": dict(
        num_kv_heads=1, qk_norm=True, qkv_bias=True, tie_word_embeddings=True,
        rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=16),
    ),
}


@pytest.fixture(scope="module")
def tp_group():
    ps = init_parallel()
    yield ps.tp_group
    destroy_parallel()


def _model(tp_group, **overrides) -> Policy:
    """A tiny policy whose every parameter (norm weights and zero-initialised biases too) is perturbed."""
    set_seed(0)
    model = Policy(ModelConfig(**{**BASE, **overrides}), tp_group=tp_group)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens(lengths, seed) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


# ---- invariant 1: packing is exact ----

LENGTHS = (7, 1, 12, 3, 20, 2)


def _alone(model, seq, mask):
    """One example, dense forward: logits [L, V], logprobs of its next tokens [L-1], masked loss."""
    logits = model(seq[None])[0]  # [L, V]
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, seq[1:, None]).squeeze(1)  # [L-1]
    return logits, logprobs, -(logprobs * mask[1:]).sum()


def _packed(model, pb, tp_group):
    """The training path: packed forward to hidden states, chunked vocab-parallel logprobs, masked loss."""
    hidden = model.hidden_states(
        pb.tokens[None], position_ids=pb.position_ids[None], cu_seqlens=pb.cu_seqlens, max_seqlen=pb.max_seqlen
    )  # [1, T, H]
    logits = model.compute_logits(hidden)  # [1, T, V]
    logprobs, _ = vocab_parallel_logprobs(hidden[0], model.output_weight(), pb.targets, tp_group=tp_group, vocab_size=VOCAB, chunk_size=16)
    return logits[0], logprobs, -(logprobs * pb.loss_mask).sum()


def _assert_per_example(packed_values, alone_values, cu_seqlens, what):
    for i, (p, a) in enumerate(zip(unpack(packed_values, cu_seqlens), alone_values)):
        torch.testing.assert_close(p[: a.shape[0]], a, **TOL, msg=lambda m: f"{what} of example {i}: {m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_each_example_alone(tp_group, variant):
    model = _model(tp_group, **VARIANTS[variant])
    seqs = _tokens(LENGTHS, seed=1)
    masks = [torch.arange(n) >= n // 3 for n in LENGTHS]  # the first third (the "prompt") is not trained on
    pb = pack_sequences(seqs, train_masks=masks)

    logits, logprobs, loss = _packed(model, pb, tp_group)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone = [_alone(model, s, m) for s, m in zip(seqs, masks)]
    sum(example_loss for *_, example_loss in alone).backward()

    _assert_per_example(logits.detach(), [a[0].detach() for a in alone], pb.cu_seqlens, "logits")
    _assert_per_example(logprobs.detach(), [a[1].detach() for a in alone], pb.cu_seqlens, "logprobs")
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(packed_grads[name], p.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")


def test_naive_concatenation_is_caught(tp_group):
    """Negative control: without cu_seqlens attention crosses examples, and the check above fails."""
    model = _model(tp_group)
    seqs = _tokens(LENGTHS, seed=1)
    pb = pack_sequences(seqs)
    with torch.no_grad():
        alone = [model(s[None])[0] for s in seqs]  # [L_i, V]
        naive = model(pb.tokens[None], position_ids=pb.position_ids[None])[0]  # [T, V], one causal stream
    _assert_per_example(naive[: LENGTHS[0]], alone[:1], pb.cu_seqlens[:2], "first example's logits")
    with pytest.raises(AssertionError, match="logits of example 1"):
        _assert_per_example(naive, alone, pb.cu_seqlens, "logits")


# ---- KV cache ----


def _prefill(model, cache, seqs, prompt_lens, slots):
    """Prompts of different lengths in one right-padded call from an empty slot: list of logits [P_i, V]."""
    num_new = max(prompt_lens)
    tokens = torch.zeros(len(seqs), num_new, dtype=torch.int64)  # [B, S]
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        tokens[b, :n] = s[:n]
    start = torch.zeros(len(seqs), dtype=torch.int64)  # [B]
    logits = model(tokens, cache=CacheBatch(cache, torch.tensor(slots), start, kv_len=num_new))  # [B, S, V]
    return [logits[b, :n] for b, n in enumerate(prompt_lens)]


@torch.no_grad()
def test_kv_cache_decode_with_shrinking_batch_and_reused_slots(tp_group):
    model = _model(tp_group)
    prompt_lens, total_lens = [5, 1, 9, 3, 4], [12, 6, 11, 10, 7]
    seqs = _tokens(total_lens, seed=2)
    ref = [model(s[None])[0] for s in seqs]  # [L_i, V] each sequence alone, dense
    cache = KVCache.for_model(model.cfg, tp_size=1, num_slots=3, max_seq_len=16, dtype=torch.float32, device="cpu")

    def admit(requests, slots):
        logits = _prefill(model, cache, [seqs[r] for r in requests], [prompt_lens[r] for r in requests], slots)
        for r, slot, lg in zip(requests, slots, logits):
            torch.testing.assert_close(lg, ref[r][: prompt_lens[r]], **TOL, msg=lambda m: f"prefill of request {r}: {m}")
            active[r], committed[r] = slot, prompt_lens[r]

    active, committed, waiting, finished = {}, {}, [3, 4], []  # request -> slot; request -> tokens in its slot
    admit([0, 1, 2], [0, 1, 2])
    while active:
        requests = list(active)
        tokens = torch.stack([seqs[r][committed[r]] for r in requests])[:, None]  # [B, 1]
        start = torch.tensor([committed[r] for r in requests])  # [B]
        slots = torch.tensor([active[r] for r in requests])  # [B]
        logits = model(tokens, cache=CacheBatch(cache, slots, start, kv_len=int(start.max()) + 1))  # [B, 1, V]
        for b, r in enumerate(requests):
            torch.testing.assert_close(logits[b, 0], ref[r][committed[r]], **TOL, msg=lambda m: f"request {r} at {committed[r]}: {m}")
            committed[r] += 1
            if committed[r] == total_lens[r]:  # done: leaves the batch, a waiting request takes its slot
                finished.append(r)
                slot = active.pop(r)
                if waiting:
                    admit([waiting.pop(0)], [slot])
    assert finished == [2, 1, 0, 4, 3], "requests finish out of order; 3 and 4 reuse the slots of 2 and 1"


def _tree_mask(parents: list[int]) -> torch.Tensor:
    """[S, S] bool: node i sees node j iff j is i or one of its ancestors (parents[0] = -1 is the root)."""
    mask = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def _root_to_leaf_paths(parents: list[int]) -> list[list[int]]:
    leaves = [i for i in range(len(parents)) if i not in parents]
    paths = []
    for leaf in leaves:
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


@torch.no_grad()
def test_tree_verify_equals_each_branch_alone(tp_group):
    model = _model(tp_group)
    parents = [[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, 3, 4]]  # row 0: a tree with leaves 3, 4, 5; row 1: a chain
    prefix_lens = [7, 3]
    prefixes = _tokens(prefix_lens, seed=3)
    drafts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))  # [B, S]
    new_mask = torch.stack([_tree_mask(p) for p in parents])  # [B, S, S]
    depth = new_mask.sum(-1) - 1  # [B, S]

    cache = KVCache.for_model(model.cfg, tp_size=1, num_slots=2, max_seq_len=16, dtype=torch.float32, device="cpu")
    slots = [1, 0]
    _prefill(model, cache, prefixes, prefix_lens, slots)
    start = torch.tensor(prefix_lens)  # [B]
    logits = model(
        drafts, position_ids=start[:, None] + depth,
        cache=CacheBatch(cache, torch.tensor(slots), start, kv_len=max(prefix_lens) + 6, new_mask=new_mask),
    )  # [B, S, V]
    for b in range(2):
        for path in _root_to_leaf_paths(parents[b]):
            branch = torch.cat([prefixes[b], drafts[b, path]])  # [P + len(path)]
            ref = model(branch[None])[0, prefix_lens[b]:]  # [len(path), V]
            torch.testing.assert_close(logits[b, path], ref, **TOL, msg=lambda m: f"row {b}, branch {path}: {m}")


# ---- packed-attention backends ----


def test_cpu_backend_is_sdpa_segments():
    select_backend.cache_clear()
    try:
        assert select_backend("cpu") == "sdpa_segments"
    finally:
        select_backend.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backends_match_sdpa_segments(backend):
    pytest.importorskip("flash_attn" if backend == "flash_attn" else "torch.nn.attention.varlen")
    lengths = [1, 17, 64, 5, 130]
    cu_seqlens = torch.tensor([0] + lengths, device="cuda").cumsum(0)  # [N+1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(sum(lengths), heads, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for heads in (8, 2, 2, 8)
    )  # q/grad_out: [T, 8, 64], k/v: [T, 2, 64]

    def run(backend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = packed_attention(*inputs, cu_seqlens, max(lengths), 64**-0.5, backend=backend)  # [T, 8, 64]
        out.backward(grad_out.to(dtype))
        return [out.float()] + [t.grad.float() for t in inputs]

    want, baseline = run("sdpa_segments", torch.float32), run("sdpa_segments", torch.bfloat16)
    for name, got, w, base in zip(["out", "dq", "dk", "dv"], run(backend, torch.bfloat16), want, baseline):
        # flash-attn's own criterion: at most twice the error of the reference algorithm at the same precision
        err, base_err = float((got - w).abs().max()), float((base - w).abs().max())
        assert err <= 2 * base_err + 1e-3, f"{backend} {name}: max error {err:.3g}, sdpa_segments in bf16: {base_err:.3g}"
