"""Speculative-decoding maths: EAGLE-2 draft trees, exact-sample verification, which K/V to keep.

What: pure tensor functions, batched over B rows and free of model calls and host syncs, that
(1) grow a draft tree level by level from a drafter's next-token log-probs and keep the best N nodes
(`TreeBuilder`), (2) verify a chain or tree against the target's own samples at every verify row, so
that the emitted tokens are exactly the ones plain decoding samples (`verify`), and (3) say which
verified positions to keep in the KV cache (`kv_keep_index`; `models.kv_cache.KVCache.compact` moves them).

Why: TLT speeds up the long tail of RL rollouts with speculative decoding. RL trains on the rollout
tokens and their logprobs as if plain decoding had produced them, so verification must not change what
is sampled, and the logprobs returned are those of the target distribution.

How (one decoding round, as the engine runs it):

    builder = TreeBuilder(topk=4)                    # chain: topk=1
    frontier = builder.expand(q_root, coupled)       # q_root [B, 1, V]: drafter log-probs after the root;
    for _ in range(depth - 1):                       # coupled [B, 1]: the drafter's own noise sample (or None)
        q = drafter(frontier.tokens, hidden of row frontier.parent_slot)   # [B, K, V] log-probs
        frontier = builder.expand(q, coupled)
    tree = builder.finalize(num_nodes=N)
    logp = target_logprobs(verify forward of [root, *tree.tokens], tree_mask, positions)  # [B, 1+N, V]
    result = verify(tree, logp, sampling.sample(logp, seeds, response positions of the verify rows))
    cache.compact(slots, start, kv_keep_index(result))

Conventions: the root is the last committed token; its KV is not yet in the cache, so the verify
forward writes the root at cache position `start` and node i at `start + 1 + i` ("verify row 1+i").
`target_logprobs[:, 0]` is the target distribution of the token after the root, `target_logprobs[:, 1+i]`
the one after node i. Nodes are numbered by rank (best cumulative draft score first), which puts every
parent before its children.

Verification (exact-sample): the target's sample at verify row r is y_r = argmax(logp_r + G), G the
position-keyed Gumbel noise of the response position row r predicts (`sampling.sample`). All nodes of one
depth predict the same position, so they share its noise, and y_r is what plain decoding would sample
after the path to r. A node is accepted iff it equals y at its parent and its parent is accepted
(siblings are distinct tokens, so at most one child matches); after the last accepted node comes y at its
row. The emitted tokens are therefore plain decoding's, whatever the drafter, the shape or the selector
did. The chance that a node is accepted is the chance that the target samples it: for a draft drawn
without the noise (top-k) that is p(x), as with rejection sampling; a draft that uses the same noise on
the drafter's distribution (`expand`'s `coupled`) matches the target's sample whenever the two
distributions' perturbed maxima agree, which is likelier than p(x) when p is spread out (temperature 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DraftFrontier:
    """The newest level's best nodes: what the drafter consumes next."""

    tokens: torch.Tensor  # [B, K] int64 their tokens (the drafter's next input tokens)
    parent_slot: torch.Tensor  # [B, K] int64 row of the last `level_logprobs` each node came from; its drafter
    #                            hidden is the node's input hidden (EAGLE feeds the parent's drafter output)
    depth: int  # depth of these nodes (1 = children of the root); drafter position = root position + depth
    fed_mask: torch.Tensor  # [B, F, F] bool ancestry among all frontiers so far in feed order (this one last,
    #                         F = their total size): node i sees j iff j is i or an ancestor of i


@dataclass
class DraftTree:
    """N draft nodes per row, numbered by rank (parents before children); verify row 1+i is node i."""

    tokens: torch.Tensor  # [B, N] int64
    parents: torch.Tensor  # [B, N] int64 node index of the parent, -1 = the root
    depth: torch.Tensor  # [B, N] int64, 1 = child of the root
    draft_logprobs: torch.Tensor  # [B, N] fp32 log q(token) under the drafter's distribution at the parent
    scores: torch.Tensor  # [B, N] fp32 cumulative draft log-prob of the path root -> node, coupled children adding 0 (non-increasing)
    tree_mask: torch.Tensor  # [B, 1+N, 1+N] bool over [root, nodes]: a row sees itself and its ancestors
    position_offsets: torch.Tensor  # [B, 1+N] int64 depth of each verify row (root 0): position = start + offset
    max_depth: int  # host bound on depth (loop count of verification)


@dataclass
class VerifyResult:
    """Per row: the accepted path and the accept_lens + 1 emitted tokens (accepted drafts, then one more)."""

    accept_lens: torch.Tensor  # [B] int64 accepted draft tokens, 0..D
    accepted_nodes: torch.Tensor  # [B, D] int64 node accepted at each depth, -1 from accept_lens on
    tokens: torch.Tensor  # [B, D+1] int64 emitted tokens: accepted drafts, the correction/bonus token at
    #                       index accept_lens, -1 after it
    logprobs: torch.Tensor  # [B, D+1] fp32 log p(token) under the original target distribution, 0 after


class TreeBuilder:
    """Grows an EAGLE-2 draft tree one drafter level at a time, then keeps the best N nodes.

    Each `expand` gives every node of the current frontier (the root at first) its `topk` most likely
    children under the drafter, scored by cumulative draft log-prob; all of them join the candidate
    pool, and the best `frontier_size` new ones form the next frontier. `finalize(N)` keeps the N best
    of the pool. Scores never increase along a path (log q <= 0, and float addition of a non-positive
    number is monotone), so ranking by (score descending, pool index ascending) ranks every parent
    before its children (parents join the pool first): the best N are ancestor-closed, ties included.

    With `coupled` tokens (the drafter's own sample at each frontier node under the target's noise for that
    position), every node's first child is that token and the others are its next most likely ones. The
    coupled child keeps its parent's score: were the drafter exact, it would be the target's sample for
    sure (and the others never), so the coupled chain is kept whole and the other children, scored by
    their log q as usual, hedge the drafter's errors.
    """

    def __init__(self, topk: int, frontier_size: Optional[int] = None):
        frontier_size = topk if frontier_size is None else frontier_size
        if topk < 1 or frontier_size < 1:
            raise ValueError(f"topk ({topk}) and frontier_size ({frontier_size}) must be >= 1")
        self.topk, self.frontier_size = topk, frontier_size
        self._levels: list[dict[str, torch.Tensor]] = []  # candidate pool, one dict of [B, C] tensors per level
        self._pool_size = 0
        self._frontier_index: Optional[torch.Tensor] = None  # [B, M] pool index of the frontier; None = the root
        self._frontier_scores: Optional[torch.Tensor] = None  # [B, M]
        self._fed_mask: Optional[torch.Tensor] = None  # [B, F, F]

    def expand(self, level_logprobs: torch.Tensor, coupled: Optional[torch.Tensor] = None) -> DraftFrontier:
        """level_logprobs: [B, M, V] drafter log-probs after each frontier node (M = 1: after the root);
        coupled: [B, M] int64 first child of each node, or None (children = the top-k of the log-probs)."""
        B, M, V = level_logprobs.shape
        expected = 1 if self._frontier_index is None else self._frontier_index.shape[1]
        if M != expected:
            raise ValueError(f"expand() expects log-probs for {expected} frontier rows, got {M}")
        device = level_logprobs.device
        logq = level_logprobs.float()  # [B, M, V]
        k = min(self.topk, V)
        if coupled is None:
            child_logq, child_tokens = logq.topk(k, dim=-1)  # [B, M, k]
            gain = child_logq
        else:
            first = coupled[..., None]  # [B, M, 1]
            rest = logq.scatter(2, first, float("-inf")).topk(k - 1, dim=-1).indices  # [B, M, k-1] distinct from it
            child_tokens = torch.cat([first, rest], dim=2)  # [B, M, k]
            child_logq = logq.gather(2, child_tokens)
            gain = torch.cat([torch.zeros_like(child_logq[..., :1]), child_logq[..., 1:]], dim=2)  # the coupled child: 0
        if self._frontier_index is None:
            parent_index = torch.full((B, 1), -1, dtype=torch.long, device=device)  # [B, 1]
            parent_scores = torch.zeros(B, 1, device=device)  # [B, 1]
        else:
            parent_index, parent_scores = self._frontier_index, self._frontier_scores
        scores = (parent_scores.unsqueeze(-1) + gain).flatten(1)  # [B, M*k]
        level = dict(
            tokens=child_tokens.flatten(1),  # [B, M*k]
            parents=parent_index.repeat_interleave(k, dim=1),  # [B, M*k] pool index, -1 = root
            logq=child_logq.flatten(1),  # [B, M*k]
            scores=scores,
            depth=torch.full((B, M * k), len(self._levels) + 1, dtype=torch.long, device=device),
        )
        order = _rank(scores)[:, : self.frontier_size]  # [B, K] best new candidates
        self._frontier_index = self._pool_size + order
        self._frontier_scores = scores.gather(1, order)
        self._fed_mask = _extend_ancestry(self._fed_mask, order // k, num_prev=M)
        self._levels.append(level)
        self._pool_size += M * k
        return DraftFrontier(
            tokens=level["tokens"].gather(1, order), parent_slot=order // k, depth=len(self._levels), fed_mask=self._fed_mask
        )

    def finalize(self, num_nodes: int) -> DraftTree:
        """Keep the `num_nodes` best pool nodes (ancestor-closed), numbered by rank."""
        if not self._levels:
            raise ValueError("finalize() needs at least one expand()")
        if not 1 <= num_nodes <= self._pool_size:
            raise ValueError(f"num_nodes={num_nodes} must be in [1, {self._pool_size}] (the candidate pool)")
        pool = {key: torch.cat([lvl[key] for lvl in self._levels], dim=1) for key in self._levels[0]}  # [B, P]
        selected = _rank(pool["scores"])[:, :num_nodes]  # [B, N] pool index of node i
        B, P = pool["scores"].shape
        node_of_pool = torch.full((B, P), -1, dtype=torch.long, device=selected.device)
        node_of_pool.scatter_(1, selected, torch.arange(num_nodes, device=selected.device).expand(B, -1))  # [B, P]
        pool_parents = pool["parents"].gather(1, selected)  # [B, N]
        parents = torch.where(pool_parents >= 0, node_of_pool.gather(1, pool_parents.clamp(min=0)), -1)  # [B, N]
        depth = pool["depth"].gather(1, selected)  # [B, N]
        max_depth = min(len(self._levels), num_nodes)
        return DraftTree(
            tokens=pool["tokens"].gather(1, selected),
            parents=parents,
            depth=depth,
            draft_logprobs=pool["logq"].gather(1, selected),
            scores=pool["scores"].gather(1, selected),
            tree_mask=ancestor_mask(parents, max_depth),
            position_offsets=torch.cat([torch.zeros_like(depth[:, :1]), depth], dim=1),
            max_depth=max_depth,
        )


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """scores: [B, C] -> [B, C] indices by score descending, ties by index ascending (stable)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _extend_ancestry(mask: Optional[torch.Tensor], parent_slot: torch.Tensor, num_prev: int) -> torch.Tensor:
    """Ancestry among fed nodes after appending a frontier.

    mask: [B, F, F] ancestry of the nodes fed so far, the previous frontier being the last `num_prev`
    of them (None before the first level, whose parents are all the root); parent_slot: [B, K]
    position of each new node's parent within the previous frontier -> [B, F+K, F+K].
    """
    B, K = parent_slot.shape
    eye = torch.eye(K, dtype=torch.bool, device=parent_slot.device).expand(B, K, K)
    if mask is None:
        return eye.clone()
    F = mask.shape[1]
    parent_row = F - num_prev + parent_slot  # [B, K] feed index of each parent
    inherited = mask.gather(1, parent_row.unsqueeze(-1).expand(B, K, F))  # [B, K, F] the parent's ancestry
    top = torch.cat([mask, mask.new_zeros(B, F, K)], dim=2)  # [B, F, F+K]
    bottom = torch.cat([inherited, eye], dim=2)  # [B, K, F+K]
    return torch.cat([top, bottom], dim=1)


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """parents: [B, N] (-1 = root) -> [B, 1+N, 1+N] bool over [root, nodes]: row i sees itself and its ancestors."""
    B, N = parents.shape
    row_parent = torch.cat([parents.new_zeros(B, 1), parents + 1], dim=1)  # [B, 1+N] verify row of the parent; root -> root
    row = torch.arange(1 + N, device=parents.device).expand(B, -1).contiguous()  # [B, 1+N] walks up one level per step
    mask = torch.zeros(B, 1 + N, 1 + N, dtype=torch.bool, device=parents.device)
    for _ in range(max_depth + 1):  # self, then each ancestor up to the root
        mask.scatter_(2, row.unsqueeze(-1), True)
        row = row_parent.gather(1, row)
    return mask


def verify(tree: DraftTree, target_logprobs: torch.Tensor, target_tokens: torch.Tensor) -> VerifyResult:
    """Exact-sample verification (see the module docstring). target_logprobs: [B, 1+N, V] log-probs of the
    distribution plain decoding samples from, at the root and after every node (`sampling.target_logprobs`
    of the verify logits); target_tokens: [B, 1+N] the target's sample at each verify row (`sampling.sample`
    with the noise of the response position that row predicts)."""
    B, N = tree.tokens.shape
    if target_logprobs.shape[:2] != (B, 1 + N) or target_tokens.shape != (B, 1 + N):
        raise ValueError(
            f"target_logprobs {tuple(target_logprobs.shape)} and target_tokens {tuple(target_tokens.shape)} "
            f"must be [B={B}, 1+N={1 + N}, V] and [B, 1+N]"
        )
    matches = tree.tokens == target_tokens.gather(1, tree.parents + 1)  # [B, N] the target's sample after the parent
    accepted = matches
    for _ in range(tree.max_depth - 1):  # parents come first: depth-1 passes carry acceptance down every path
        accepted = matches & torch.where(tree.parents >= 0, accepted.gather(1, tree.parents.clamp(min=0)), True)
    levels = torch.arange(1, tree.max_depth + 1, device=tree.depth.device)[:, None]  # [D, 1]
    at_depth = accepted.unsqueeze(1) & (tree.depth.unsqueeze(1) == levels)  # [B, D, N] at most one per depth
    accepted_nodes = torch.where(at_depth.any(dim=2), at_depth.long().argmax(dim=2), -1)  # [B, D]
    accept_lens = (accepted_nodes >= 0).sum(dim=1)  # [B]
    deepest = accepted_nodes.gather(1, (accept_lens - 1).clamp(min=0)[:, None])[:, 0]  # [B]
    last_row = torch.where(accept_lens > 0, 1 + deepest, 0)  # [B] verify row after the accepted path
    last_token = target_tokens.gather(1, last_row[:, None])[:, 0]
    return _emitted(tree, target_logprobs.float(), accepted_nodes, accept_lens, last_token)


def _emitted(
    tree: DraftTree, logp: torch.Tensor, accepted_nodes: torch.Tensor, accept_lens: torch.Tensor, last_token: torch.Tensor
) -> VerifyResult:
    """Emitted tokens [B, D+1] (accepted drafts, then last_token at accept_lens) and their log p."""
    B, D = accepted_nodes.shape
    slot = torch.arange(D + 1, device=logp.device)  # [D+1]
    drafts = tree.tokens.gather(1, accepted_nodes.clamp(min=0))  # [B, D]
    tokens = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # [B, D+1]
    tokens = torch.where(slot < accept_lens.unsqueeze(1), tokens, -1)
    tokens = tokens.scatter(1, accept_lens.unsqueeze(1), last_token.unsqueeze(1))
    emitted = tokens >= 0  # [B, D+1]
    # verify row whose distribution produced slot j: the root for j = 0, else the node accepted at depth j
    rows = torch.cat([accepted_nodes.new_zeros(B, 1), 1 + accepted_nodes.clamp(min=0)], dim=1)  # [B, D+1]
    token_logp = logp[torch.arange(B, device=logp.device).unsqueeze(1), rows, tokens.clamp(min=0)]  # [B, D+1]
    return VerifyResult(
        accept_lens=accept_lens,
        accepted_nodes=accepted_nodes,
        tokens=tokens,
        logprobs=torch.where(emitted, token_logp, 0.0),
    )


def kv_keep_index(result: VerifyResult) -> torch.Tensor:
    """[B, 1+D] verify rows to keep, in commit order: the root, then the accepted path; entry j past
    accept_lens is j itself (a no-op copy), so the shape stays fixed. The same index gathers the verify
    forward's target hidden states [B, 1+N, H] for the drafter; entry accept_lens is the row whose
    distribution produced the correction/bonus token. `KVCache.compact(slots, start, index)` with it leaves
    start + 1 + accept_lens committed tokens in each row."""
    B, D = result.accepted_nodes.shape
    slot = torch.arange(1 + D, device=result.accept_lens.device)  # [1+D]
    path_rows = torch.cat([result.accepted_nodes.new_zeros(B, 1), 1 + result.accepted_nodes], dim=1)  # [B, 1+D]
    return torch.where(slot <= result.accept_lens.unsqueeze(1), path_rows, slot)
