"""Speculative-decoding maths (DESIGN invariant 4: speculative decoding is lossless).

A mock target and a mock drafter are fixed random tables of next-token logits conditioned on the two
previous tokens (so a wrong tree row or a wrong parent shows up as a wrong distribution). Rounds of
draft -> verify run vectorised over tens of thousands of rows, and the empirical distribution of the
first three emitted tokens is compared with the exactly enumerated target distribution. A deliberately
biased acceptance rule must fail the same bound. Greedy targets must reproduce the argmax chain, and
the returned logprobs must be the original target's. Pure tensor code on CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tlt.models.kv_cache import KVCache
from megatron_tlt.rollout.spec import tree as spec_tree
from megatron_tlt.rollout.spec.tree import DraftTree, TreeBuilder, VerifyResult, kv_keep_index, verify

V = 4  # vocabulary: V**3 = 64 three-token sequences
CONTEXT = (1, 2)  # the two committed tokens every row starts from
NUM_TOKENS = 3
MODES = {  # name: (topk, frontier_size, depth, num_nodes, sampled drafts)
    "chain_sampled": (1, 1, 3, 3, True),
    "chain_top1": (1, 1, 3, 3, False),
    "tree_k2": (2, 2, 3, 6, False),
    "tree_k3": (3, 3, 3, 10, False),
}
WARPS = {"t1": (1.0, 0), "t0.7_top3": (0.7, 3)}  # (temperature, top_k); top-k puts zeros into p


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny ([40k, 4]): intra-op threads only add contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _warp(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """[..., V] logits -> [..., V] log-probs after temperature (0 = greedy one-hot) and top-k."""
    if temperature == 0:
        best = logits.argmax(-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)
    x = logits / temperature
    if top_k:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return x.log_softmax(-1)


def _tables(seed: int, vocab: int = V, draft_noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [V, V, V] (index: two previous tokens) and drafter logits, a noisy copy of them."""
    gen = torch.Generator().manual_seed(seed)
    target = 1.5 * torch.randn(vocab, vocab, vocab, generator=gen)
    drafter = target + draft_noise * torch.randn(vocab, vocab, vocab, generator=gen)
    return target, drafter


def _draft(context: torch.Tensor, draft_logp: torch.Tensor, mode: str, gen) -> DraftTree:
    """Grow the draft tree after context [B, 2] (the root is context[:, 1]) with the mock drafter."""
    topk, frontier_size, depth, num_nodes, sampled = MODES[mode]
    builder = TreeBuilder(topk, frontier_size, generator=gen if sampled else None)
    fed_prev, fed_tok = context[:, :1], context[:, 1:]  # [B, M] tokens fed to the drafter and their predecessors
    frontier = builder.expand(draft_logp[fed_prev, fed_tok])  # [B, 1, V] after the root
    for _ in range(depth - 1):
        fed_prev, fed_tok = fed_tok.gather(1, frontier.parent_slot), frontier.tokens
        frontier = builder.expand(draft_logp[fed_prev, fed_tok])  # [B, K, V]
    return builder.finalize(num_nodes)


def _round(context: torch.Tensor, target_logp: torch.Tensor, draft_logp: torch.Tensor, mode: str, gen) -> VerifyResult:
    """One draft + verify round after context [B, 2]."""
    tree = _draft(context, draft_logp, mode, gen)
    before = torch.where(tree.parents >= 0, tree.tokens.gather(1, tree.parents.clamp(min=0)), context[:, 1:])  # [B, N]
    logp = torch.cat([target_logp[context[:, 0], context[:, 1]].unsqueeze(1), target_logp[before, tree.tokens]], dim=1)
    return verify(tree, logp, gen)  # logp: [B, 1+N, V]


def _generate(num_rows: int, target_logp, draft_logp, mode: str, seed: int, check_logprobs: bool = False) -> torch.Tensor:
    """[B, NUM_TOKENS] first tokens of speculative generation from CONTEXT."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.tensor(CONTEXT).repeat(num_rows, 1)  # [B, 2]
    seq = torch.cat([seq, torch.full((num_rows, NUM_TOKENS * (MODES[mode][2] + 1)), -1)], dim=1)  # room for every round
    length = torch.full((num_rows,), 2)  # [B]
    for _ in range(NUM_TOKENS):  # every round emits >= 1 token
        context = seq.gather(1, torch.stack([length - 2, length - 1], dim=1))  # [B, 2]
        result = _round(context, target_logp, draft_logp, mode, gen)
        positions = length.unsqueeze(1) + torch.arange(result.tokens.shape[1])  # [B, D+1]
        seq.scatter_(1, positions, result.tokens)  # slots after the emitted ones are overwritten next round
        if check_logprobs:
            _assert_logprobs_are_targets(seq, positions, result, target_logp)
        length = length + result.accept_lens + 1
    return seq[:, 2 : 2 + NUM_TOKENS]


def _assert_logprobs_are_targets(seq, positions, result, target_logp):
    emitted = torch.arange(result.tokens.shape[1]) <= result.accept_lens.unsqueeze(1)  # [B, D+1]
    prev2, prev1 = seq.gather(1, positions - 2), seq.gather(1, positions - 1)  # [B, D+1]
    expected = target_logp[prev2.clamp(min=0), prev1.clamp(min=0), result.tokens.clamp(min=0)]  # [B, D+1]
    torch.testing.assert_close(result.logprobs[emitted], expected[emitted])
    assert torch.all(result.logprobs[~emitted] == 0) and torch.all(result.tokens[~emitted] == -1)
    assert torch.isfinite(result.logprobs).all(), "an emitted token had target probability 0"


def _exact_distribution(target_logp: torch.Tensor) -> torch.Tensor:
    """[V**3] probability of each three-token continuation of CONTEXT under the target."""
    a, b = CONTEXT
    p = target_logp.exp()
    joint = p[a, b][:, None, None] * p[b][:, :, None] * p  # [V, V, V]: p(x1|a,b) p(x2|b,x1) p(x3|x1,x2)
    return joint.flatten()


def _tv(samples: torch.Tensor, exact: torch.Tensor) -> float:
    codes = (samples * torch.tensor([V * V, V, 1])).sum(1)
    empirical = torch.bincount(codes, minlength=V**3).double() / samples.shape[0]
    return 0.5 * (empirical - exact.double()).abs().sum().item()


def _tv_bound(exact: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A TV that n exact samples exceed with probability < delta.

    E[TV] = 1/2 sum_x E|phat_x - p_x| <= 1/2 sum_x sqrt(p_x (1 - p_x) / n) (Jensen), and TV moves by at
    most 1/n when one sample changes, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2): with
    t = sqrt(ln(1/delta) / (2n)). For 64 cells at n = 40k this is <= 0.02 + 0.013.
    """
    p = exact.double()
    return 0.5 * torch.sqrt(p * (1 - p) / n).sum().item() + math.sqrt(math.log(1 / delta) / (2 * n))


NUM_ROWS = 40_000


@pytest.mark.parametrize("warp", list(WARPS))
@pytest.mark.parametrize("mode", list(MODES))
def test_sampling_is_lossless_and_a_biased_rule_is_caught(mode, warp, monkeypatch):
    target, drafter = _tables(seed=0)
    target_logp, draft_logp = _warp(target, *WARPS[warp]), drafter.log_softmax(-1)
    exact = _exact_distribution(target_logp)
    bound = _tv_bound(exact, NUM_ROWS)
    assert bound < 0.035

    tv = _tv(_generate(NUM_ROWS, target_logp, draft_logp, mode, seed=1), exact)
    assert tv < bound, f"{mode}/{warp}: TV {tv:.4f} >= bound {bound:.4f}"

    # The classic mistake for each rule: resample from p instead of the residual (sampled chain:
    # skip max(p - q, 0); point drafts: keep rejected candidates in the residual).
    monkeypatch.setattr(spec_tree, "_rejection_residual", lambda p, q: p)
    monkeypatch.setattr(spec_tree, "_remove_candidate", lambda residual, token, rejected: residual)
    biased_tv = _tv(_generate(NUM_ROWS, target_logp, draft_logp, mode, seed=1), exact)
    assert biased_tv > bound, f"{mode}/{warp}: the biased rule passed (TV {biased_tv:.4f} <= {bound:.4f})"


@pytest.mark.parametrize("mode", list(MODES))
def test_logprobs_are_those_of_the_original_target(mode):
    target, drafter = _tables(seed=2)
    target_logp, draft_logp = _warp(target, 0.7, 3), drafter.log_softmax(-1)
    _generate(2000, target_logp, draft_logp, mode, seed=3, check_logprobs=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_emits_the_argmax_chain_and_accepts_the_longest_matching_path(mode):
    vocab, num_rows = 8, 512
    target, drafter = _tables(seed=4, vocab=vocab, draft_noise=1.0)
    target_logp, draft_logp = _warp(target, 0.0, 0), drafter.log_softmax(-1)
    gen = torch.Generator().manual_seed(5)
    context = torch.randint(0, vocab, (num_rows, 2), generator=gen)
    result = _round(context, target_logp, draft_logp, mode, gen)

    greedy_next = target.argmax(-1)  # [V, V]
    depth = result.tokens.shape[1] - 1
    chain = [context[:, 0], context[:, 1]]
    for _ in range(depth + 1):
        chain.append(greedy_next[chain[-2], chain[-1]])
    chain = torch.stack(chain[2:], dim=1)  # [B, D+1] the argmax continuation
    emitted = torch.arange(depth + 1) <= result.accept_lens.unsqueeze(1)
    assert torch.equal(result.tokens[emitted], chain[emitted])
    assert result.accept_lens.float().mean() > 0.5, "the drafter should agree with the target often"

    if not MODES[mode][4]:  # deterministic drafts: the same tree again, and its longest path spelling the chain
        tree = _draft(context, draft_logp, mode, gen)
        longest = torch.zeros(num_rows, dtype=torch.long)
        matches = torch.zeros_like(tree.tokens, dtype=torch.bool)  # [B, N]
        for i in range(tree.tokens.shape[1]):  # parents come first
            parent = tree.parents[:, i]
            parent_ok = (parent < 0) | matches.gather(1, parent.clamp(min=0).unsqueeze(1)).squeeze(1)
            on_chain = tree.tokens[:, i] == chain.gather(1, (tree.depth[:, i] - 1).unsqueeze(1)).squeeze(1)
            matches[:, i] = parent_ok & on_chain
            longest = torch.where(matches[:, i], torch.maximum(longest, tree.depth[:, i]), longest)
        assert torch.equal(result.accept_lens, longest)


# ---- tree construction ----


def _reference_eagle2(level_logprobs_fn, topk, frontier_size, depth, num_nodes):
    """Plain-Python EAGLE-2 for one row: a list of (path tuple, score), best num_nodes by score."""
    pool, frontier = [], [((), 0.0)]
    for _ in range(depth):
        candidates = []
        for path, score in frontier:
            logq = level_logprobs_fn(path)  # [V]
            values, tokens = logq.topk(topk)
            candidates += [(path + (t,), score + v) for v, t in zip(values.tolist(), tokens.tolist())]
        pool += candidates
        frontier = sorted(candidates, key=lambda c: -c[1])[:frontier_size]
    return sorted(pool, key=lambda c: -c[1])[:num_nodes]


def _paths(tree, b):
    """Node paths (tuples of tokens from the root) of row b."""
    paths = []
    for i in range(tree.tokens.shape[1]):
        parent = tree.parents[b, i].item()
        paths.append((paths[parent] if parent >= 0 else ()) + (tree.tokens[b, i].item(),))
    return paths


def _build(logq_fn, num_rows, topk, frontier_size, depth, num_nodes):
    """Drive a TreeBuilder with a drafter given as a function of each row's node path; check fed_mask."""
    builder = TreeBuilder(topk, frontier_size)
    fed_paths = [[()] for _ in range(num_rows)]  # per row: the paths of the last level fed
    all_fed = [[] for _ in range(num_rows)]
    for _ in range(depth):
        frontier = builder.expand(torch.stack([torch.stack([logq_fn(b, p) for p in fed_paths[b]]) for b in range(num_rows)]))
        for b in range(num_rows):
            fed_paths[b] = [fed_paths[b][s] + (t,) for s, t in zip(frontier.parent_slot[b].tolist(), frontier.tokens[b].tolist())]
            all_fed[b] += fed_paths[b]
            expected = torch.tensor([[q[: len(p)] == p for p in all_fed[b]] for q in all_fed[b]])  # p is a prefix of q
            assert torch.equal(frontier.fed_mask[b], expected)
    return builder.finalize(num_nodes)


def _check_structure(tree):
    B, N = tree.tokens.shape
    node = torch.arange(N)
    assert torch.all(tree.parents < node), "parents must precede children (ancestor-closed)"
    parent_depth = torch.where(tree.parents >= 0, tree.depth.gather(1, tree.parents.clamp(min=0)), 0)
    assert torch.equal(tree.depth, parent_depth + 1)
    parent_score = torch.where(tree.parents >= 0, tree.scores.gather(1, tree.parents.clamp(min=0)), 0.0)
    torch.testing.assert_close(tree.scores, parent_score + tree.draft_logprobs)
    assert torch.equal(tree.position_offsets, torch.cat([torch.zeros(B, 1, dtype=torch.long), tree.depth], 1))
    for b in range(B):
        expected = torch.eye(1 + N, dtype=torch.bool)
        for i in range(N):
            expected[1 + i, 0] = True
            parent = tree.parents[b, i].item()
            if parent >= 0:
                expected[1 + i] |= expected[1 + parent]
        assert torch.equal(tree.tree_mask[b], expected)


def test_tree_is_the_best_n_of_eagle2_expansion():
    num_rows, vocab = 4, 12
    table = torch.randn(num_rows, vocab, vocab, generator=torch.Generator().manual_seed(6)).log_softmax(-1)

    def logq(b, path):  # drafter log-probs after a path: depends on the row and the path's last token
        return table[b, path[-1] if path else 0] - 0.1 * len(path)  # scaled so depth matters

    tree = _build(logq, num_rows, topk=3, frontier_size=2, depth=4, num_nodes=9)
    _check_structure(tree)
    for b in range(num_rows):
        reference = _reference_eagle2(lambda p: logq(b, p), 3, 2, 4, 9)
        assert set(_paths(tree, b)) == {path for path, _ in reference}
        torch.testing.assert_close(tree.scores[b], torch.tensor([s for _, s in reference]))
        for i, path in enumerate(_paths(tree, b)):
            torch.testing.assert_close(tree.draft_logprobs[b, i], logq(b, path[:-1])[path[-1]])


@pytest.mark.parametrize("kind", ["uniform", "one_hot"])
def test_ties_keep_the_tree_ancestor_closed(kind):
    """Uniform q ties every sibling and cousin; one-hot q gives children their parent's exact score."""
    vocab = 5
    if kind == "uniform":
        level = torch.full((vocab,), -math.log(vocab))
    else:
        level = torch.full((vocab,), float("-inf")).index_fill(0, torch.tensor([3]), 0.0)
    tree = _build(lambda b, path: level, 2, topk=3, frontier_size=3, depth=4, num_nodes=20)
    _check_structure(tree)


def test_sampled_chain_keeps_the_draft_distributions():
    gen = torch.Generator().manual_seed(7)
    builder = TreeBuilder(topk=1, generator=gen)
    levels = [torch.randn(3, 1, V, generator=gen).log_softmax(-1) for _ in range(4)]
    for level in levels:
        builder.expand(level)
    tree = builder.finalize(4)
    assert torch.equal(tree.draft_dists, torch.cat(levels, dim=1))
    assert torch.equal(tree.parents, torch.arange(-1, 3).expand(3, 4))
    with pytest.raises(ValueError, match="chains only"):
        TreeBuilder(topk=2, generator=gen)


def test_per_row_generators_make_rows_independent_of_the_batch():
    target, drafter = _tables(seed=8)
    target_logp, draft_logp = _warp(target, 1.0, 0), drafter.log_softmax(-1)
    context = torch.tensor([[0, 1], [2, 3], [1, 1]])
    for mode in ("chain_sampled", "tree_k2"):
        batched = _round(context, target_logp, draft_logp, mode, [torch.Generator().manual_seed(s) for s in range(3)])
        for b in range(3):
            alone = _round(context[b : b + 1], target_logp, draft_logp, mode, [torch.Generator().manual_seed(b)])
            assert torch.equal(alone.tokens[0], batched.tokens[b])


# ---- KV compaction ----


def test_kv_keep_index_and_compaction():
    # Row 0 accepted nodes 1 then 4 (verify rows 2, 5); row 1 accepted nothing.
    result = VerifyResult(
        accept_lens=torch.tensor([2, 0]),
        accepted_nodes=torch.tensor([[1, 4, -1], [-1, -1, -1]]),
        tokens=torch.zeros(2, 4, dtype=torch.long),
        logprobs=torch.zeros(2, 4),
    )
    keep = kv_keep_index(result)
    assert keep.tolist() == [[0, 2, 5, 3], [0, 1, 2, 3]]

    cache = KVCache(num_layers=2, num_slots=3, max_seq_len=16, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for buf in (*cache.k, *cache.v):
        buf.copy_(torch.arange(16.0).view(1, 16, 1, 1).expand_as(buf))  # value = position
    slots, start = torch.tensor([2, 0]), torch.tensor([5, 9])
    cache.compact(slots, start, keep)
    for buf in (*cache.k, *cache.v):
        assert buf[2, 5:8, 0, 0].tolist() == [5.0, 7.0, 10.0]  # root, node 1 (row 2), node 4 (row 5)
        assert buf[0, 9, 0, 0].item() == 9.0
        assert buf[1, :, 0, 0].tolist() == list(map(float, range(16)))  # other slots untouched
