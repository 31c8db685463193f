"""Speculative-decoding maths (DESIGN invariant 4: speculative decoding is exact).

A mock target and a mock drafter are fixed random tables of next-token logits conditioned on the two
previous tokens (so a wrong tree row or a wrong parent shows up as a wrong token). Rounds of draft ->
verify run vectorised over thousands of rows, each row a request with its own noise seed, and must emit
exactly the tokens plain sampling draws with the same position-keyed noise, for chains and trees, with
top-k or coupled drafts, at several temperatures. Plain sampling itself must follow the exactly
enumerated target distribution (and noise shared across positions must fail the same bound), acceptance
of top-k drafts must happen with the target's probability of the draft (as under rejection sampling),
and the returned logprobs must be the target's. Pure tensor code on CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tlt.models.kv_cache import KVCache
from megatron_tlt.rollout import sampling
from megatron_tlt.rollout.sampling import sample
from megatron_tlt.rollout.spec.tree import TreeBuilder, VerifyResult, kv_keep_index, verify

V = 4  # vocabulary: V**3 = 64 three-token sequences
CONTEXT = (1, 2)  # the two committed tokens every row starts from
NUM_TOKENS = 3
MODES = {  # name: (topk, frontier_size, depth, num_nodes, coupled drafts)
    "chain_top1": (1, 1, 3, 3, False),
    "chain_coupled": (1, 1, 3, 3, True),
    "tree_k2": (2, 2, 3, 6, False),
    "tree_k3": (3, 3, 3, 10, False),
    "tree_k3_coupled": (3, 3, 3, 10, True),
}
WARPS = {"t1": (1.0, 0), "t0.7_top3": (0.7, 3), "greedy": (0.0, 0)}  # (temperature, top_k); top-k puts zeros into p


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


def _draft(context, draft_logits, mode, warp, seeds, position):
    """Grow the draft tree after context [B, 2] (the root is context[:, 1]) with the mock drafter; `position`
    [B] is the response position the root's row predicts (coupled drafts use its noise)."""
    topk, frontier_size, depth, num_nodes, coupled = MODES[mode]
    builder = TreeBuilder(topk, frontier_size)
    fed_prev, fed_tok = context[:, :1], context[:, 1:]  # [B, M] tokens fed to the drafter and their predecessors
    for level in range(depth):
        logits = draft_logits[fed_prev, fed_tok]  # [B, M, V]
        first = None
        if coupled:
            positions = (position + level)[:, None].expand(logits.shape[:2])
            first = sample(_warp(logits, *warp), seeds, positions, greedy=warp[0] == 0)
        frontier = builder.expand(logits.log_softmax(-1), first)
        fed_prev, fed_tok = fed_tok.gather(1, frontier.parent_slot), frontier.tokens
    return builder.finalize(num_nodes)


def _round(context, target_logp, draft_logits, mode, warp, seeds, position) -> VerifyResult:
    """One draft + verify round after context [B, 2]."""
    tree = _draft(context, draft_logits, mode, warp, seeds, position)
    before = torch.where(tree.parents >= 0, tree.tokens.gather(1, tree.parents.clamp(min=0)), context[:, 1:])  # [B, N]
    logp = torch.cat([target_logp[context[:, 0], context[:, 1]].unsqueeze(1), target_logp[before, tree.tokens]], dim=1)
    targets = sample(logp, seeds, position[:, None] + tree.position_offsets, greedy=warp[0] == 0)
    return verify(tree, logp, targets)  # logp: [B, 1+N, V]


def _speculative(seeds, target_logp, draft_logits, mode, warp, check_logprobs=False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, NUM_TOKENS] first tokens of speculative generation from CONTEXT, and the accepted drafts per row."""
    num_rows = len(seeds)
    seq = torch.tensor(CONTEXT).repeat(num_rows, 1)  # [B, 2]
    seq = torch.cat([seq, torch.full((num_rows, NUM_TOKENS * (MODES[mode][2] + 1)), -1)], dim=1)  # room for every round
    length = torch.full((num_rows,), 2)  # [B]
    accepted = torch.zeros(num_rows, dtype=torch.long)
    for _ in range(NUM_TOKENS):  # every round emits >= 1 token
        context = seq.gather(1, torch.stack([length - 2, length - 1], dim=1))  # [B, 2]
        result = _round(context, target_logp, draft_logits, mode, warp, seeds, length - 2)
        positions = length.unsqueeze(1) + torch.arange(result.tokens.shape[1])  # [B, D+1]
        seq.scatter_(1, positions, result.tokens)  # slots after the emitted ones are overwritten next round
        if check_logprobs:
            _assert_logprobs_are_targets(seq, positions, result, target_logp)
        length = length + result.accept_lens + 1
        accepted += result.accept_lens
    return seq[:, 2 : 2 + NUM_TOKENS], accepted


def _plain(seeds, target_logp, greedy=False) -> torch.Tensor:
    """[B, NUM_TOKENS]: plain decoding from CONTEXT, one token per step with the noise of its response position."""
    seq = torch.tensor(CONTEXT).repeat(len(seeds), 1)
    for t in range(NUM_TOKENS):
        logp = target_logp[seq[:, -2], seq[:, -1]]  # [B, V]
        token = sample(logp[:, None], seeds, torch.full((len(seeds), 1), t), greedy=greedy)  # [B, 1]
        seq = torch.cat([seq, token], dim=1)
    return seq[:, 2:]


def _assert_logprobs_are_targets(seq, positions, result, target_logp):
    emitted = torch.arange(result.tokens.shape[1]) <= result.accept_lens.unsqueeze(1)  # [B, D+1]
    prev2, prev1 = seq.gather(1, positions - 2), seq.gather(1, positions - 1)  # [B, D+1]
    expected = target_logp[prev2.clamp(min=0), prev1.clamp(min=0), result.tokens.clamp(min=0)]  # [B, D+1]
    torch.testing.assert_close(result.logprobs[emitted], expected[emitted])
    assert torch.all(result.logprobs[~emitted] == 0) and torch.all(result.tokens[~emitted] == -1)
    assert torch.isfinite(result.logprobs).all(), "an emitted token had target probability 0"


@pytest.mark.parametrize("warp", list(WARPS))
@pytest.mark.parametrize("mode", list(MODES))
def test_speculative_tokens_are_the_plain_samples(mode, warp):
    target, drafter = _tables(seed=0)
    target_logp = _warp(target, *WARPS[warp])
    seeds = torch.arange(4000) * 31 + 5
    plain = _plain(seeds, target_logp, greedy=WARPS[warp][0] == 0)
    spec, accepted = _speculative(seeds, target_logp, drafter, mode, WARPS[warp], check_logprobs=True)
    assert torch.equal(spec, plain), f"{mode}/{warp}: {(spec != plain).any(1).sum()} rows differ"
    assert accepted.sum() > 0


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


@pytest.mark.parametrize("warp", ["t1", "t0.7_top3"])
def test_plain_sampling_follows_the_exact_distribution_and_shared_noise_is_caught(warp, monkeypatch):
    target, _ = _tables(seed=1)
    target_logp = _warp(target, *WARPS[warp])
    exact = _exact_distribution(target_logp)
    bound = _tv_bound(exact, NUM_ROWS)
    assert bound < 0.035
    seeds = torch.arange(NUM_ROWS)
    tv = _tv(_plain(seeds, target_logp), exact)
    assert tv < bound, f"{warp}: TV {tv:.4f} >= bound {bound:.4f}"
    # The classic mistake: noise keyed by the request only, the same at every position.
    keys = sampling.noise_keys
    monkeypatch.setattr(sampling, "noise_keys", lambda s, positions: keys(s, torch.zeros_like(positions)))
    biased = _tv(_plain(seeds, target_logp), exact)
    assert biased > bound, f"{warp}: noise shared across positions passed (TV {biased:.4f} <= {bound:.4f})"


@pytest.mark.parametrize("mode", ["chain_top1", "tree_k3"])
def test_top_k_drafts_are_accepted_with_the_target_probability_of_the_draft(mode):
    """One round at the root: the chance that some child of the root is accepted is the target's mass on
    the root's children (p(x) for a chain, the sum over the candidates for a tree), as rejection sampling gives."""
    target, drafter = _tables(seed=3)
    target_logp = _warp(target, 1.0, 0)
    n = 20000
    context = torch.tensor(CONTEXT).repeat(n, 1)
    result = _round(context, target_logp, drafter, mode, WARPS["t1"], torch.arange(n), torch.zeros(n, dtype=torch.long))
    tree = _draft(context[:1], drafter, mode, WARPS["t1"], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    children = tree.tokens[0][tree.parents[0] < 0]  # the root's children (top-k drafts: the same in every row)
    assert 1 <= len(children) <= MODES[mode][0]
    expected = target_logp[CONTEXT].exp()[children].sum().item()
    rate = (result.accept_lens > 0).double().mean().item()
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (rate, expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_emits_the_argmax_chain_and_accepts_the_longest_matching_path(mode):
    vocab, num_rows = 8, 512
    target, drafter = _tables(seed=4, vocab=vocab, draft_noise=1.0)
    target_logp = _warp(target, 0.0, 0)
    gen = torch.Generator().manual_seed(5)
    context = torch.randint(0, vocab, (num_rows, 2), generator=gen)
    seeds, position = torch.arange(num_rows), torch.zeros(num_rows, dtype=torch.long)
    result = _round(context, target_logp, drafter, mode, WARPS["greedy"], seeds, position)

    greedy_next = target.argmax(-1)  # [V, V]
    depth = result.tokens.shape[1] - 1
    chain = [context[:, 0], context[:, 1]]
    for _ in range(depth + 1):
        chain.append(greedy_next[chain[-2], chain[-1]])
    chain = torch.stack(chain[2:], dim=1)  # [B, D+1] the argmax continuation
    emitted = torch.arange(depth + 1) <= result.accept_lens.unsqueeze(1)
    assert torch.equal(result.tokens[emitted], chain[emitted])
    assert result.accept_lens.float().mean() > 0.5, "the drafter should agree with the target often"

    tree = _draft(context, drafter, mode, WARPS["greedy"], seeds, position)  # the same tree again
    longest = torch.zeros(num_rows, dtype=torch.long)
    matches = torch.zeros_like(tree.tokens, dtype=torch.bool)  # [B, N]
    for i in range(tree.tokens.shape[1]):  # parents come first
        parent = tree.parents[:, i]
        parent_ok = (parent < 0) | matches.gather(1, parent.clamp(min=0).unsqueeze(1)).squeeze(1)
        on_chain = tree.tokens[:, i] == chain.gather(1, (tree.depth[:, i] - 1).unsqueeze(1)).squeeze(1)
        matches[:, i] = parent_ok & on_chain
        longest = torch.where(matches[:, i], torch.maximum(longest, tree.depth[:, i]), longest)
    assert torch.equal(result.accept_lens, longest)


def test_a_row_emits_the_same_tokens_in_any_batch():
    target, drafter = _tables(seed=8)
    target_logp = _warp(target, 1.0, 0)
    seeds = torch.tensor([11, 12, 13])
    for mode in ("chain_coupled", "tree_k2"):
        batched, _ = _speculative(seeds, target_logp, drafter, mode, WARPS["t1"])
        for b in range(3):
            alone, _ = _speculative(seeds[b : b + 1], target_logp, drafter, mode, WARPS["t1"])
            assert torch.equal(alone[0], batched[b])


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


def test_coupled_children_come_first_then_the_drafter_s_next_best():
    logq = torch.tensor([[[-0.1, -2.0, -3.0, -4.0, -5.0]], [[-1.0, -0.5, -3.0, -0.2, -9.0]]])  # [B=2, M=1, V=5]
    builder = TreeBuilder(topk=3)
    frontier = builder.expand(logq, torch.tensor([[2], [3]]))
    assert frontier.tokens.tolist() == [[2, 0, 1], [3, 1, 0]]  # the coupled child first (score +0), children distinct
    tree = builder.finalize(3)
    assert tree.tokens.tolist() == [[2, 0, 1], [3, 1, 0]]
    torch.testing.assert_close(tree.scores, torch.tensor([[0.0, -0.1, -2.0], [0.0, -0.5, -1.0]]))
    torch.testing.assert_close(tree.draft_logprobs, logq[:, 0].gather(1, tree.tokens))


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
