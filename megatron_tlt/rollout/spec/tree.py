"""Speculative-decoding maths: EAGLE-2 draft trees, lossless verification, which K/V to keep.

What: pure tensor functions, batched over B rows and free of model calls and host syncs, that
(1) grow a draft tree level by level from a drafter's next-token log-probs and keep the best N nodes
(`TreeBuilder`), (2) verify a chain or tree against the target distributions so that the emitted
tokens are distributed exactly as plain sampling from the target (`verify`), and (3) say which
verified positions to keep in the KV cache (`kv_keep_index`; `models.kv_cache.KVCache.compact` moves them).

Why: TLT speeds up the long tail of RL rollouts with speculative decoding. RL trains on the rollout
tokens and their logprobs as if plain decoding had produced them, so verification must be lossless,
and the logprobs returned are those of the original target distribution, never of a residual.

How (one decoding round, as the engine runs it):

    builder = TreeBuilder(topk=4)                    # chain: topk=1; sampled chain: generator=g
    frontier = builder.expand(q_root)                # q_root [B, 1, V]: drafter log-probs after the root
    for _ in range(depth - 1):
        q = drafter(frontier.tokens, hidden of row frontier.parent_slot)   # [B, K, V] log-probs
        frontier = builder.expand(q)
    tree = builder.finalize(num_nodes=N)
    logp = target_logprobs(verify forward of [root, *tree.tokens], tree_mask, positions)  # [B, 1+N, V]
    result = verify(tree, logp, generator)
    cache.compact(slots, start, kv_keep_index(result))

Conventions: the root is the last committed token; its KV is not yet in the cache, so the verify
forward writes the root at cache position `start` and node i at `start + 1 + i` ("verify row 1+i").
`target_logprobs[:, 0]` is the target distribution of the token after the root, `target_logprobs[:, 1+i]`
the one after node i. Nodes are numbered by rank (best cumulative draft score first), which puts every
parent before its children and every node's children in draft-score order.

Verification rules (u ~ U(0, 1] per test; `accept iff u * denominator <= numerator` accepts with
probability exactly min(1, numerator / denominator) and never accepts a token of probability 0):
- sampled chain (Leviathan et al. / gpt-fast): accept x_i ~ q_i with probability min(1, p_i(x_i) / q_i(x_i));
  at the first rejection emit a sample of norm(max(p_i - q_i, 0)); after d acceptances, a bonus from p_d.
- tree, or chain of deterministic (top-k) drafts (SpecInfer-style multi-candidate rejection with point-mass
  drafts): at a node with residual r = p, try its children in order; child x is accepted with probability
  r(x) / sum(r); on rejection r(x) <- 0. If none is accepted, emit a sample of r. Sampling y ~ p equals
  "y = x1 with probability p(x1), else y ~ p restricted to the other tokens", so this is exactly p.
Greedy targets (p one-hot) reduce both rules to argmax matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tlt.rollout.sampling import Generators, exponential_noise, sample


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
    scores: torch.Tensor  # [B, N] fp32 cumulative draft log-prob of the path root -> node (non-increasing)
    tree_mask: torch.Tensor  # [B, 1+N, 1+N] bool over [root, nodes]: a row sees itself and its ancestors
    position_offsets: torch.Tensor  # [B, 1+N] int64 depth of each verify row (root 0): position = start + offset
    max_depth: int  # host bound on depth (loop count of verification)
    max_children: int  # host bound on the children of one node
    draft_dists: Optional[torch.Tensor] = None  # [B, N, V] fp32 drafter log-probs at each node's parent;
    #                                             sampled chains only (their tokens were drawn from it)


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

    With `generator`, the builder grows a sampled chain instead (topk = frontier_size = 1): each level
    draws its token from the drafter's distribution q and keeps q for `verify`.
    """

    def __init__(self, topk: int, frontier_size: Optional[int] = None, generator: Optional[Generators] = None):
        frontier_size = topk if frontier_size is None else frontier_size
        if topk < 1 or frontier_size < 1:
            raise ValueError(f"topk ({topk}) and frontier_size ({frontier_size}) must be >= 1")
        if generator is not None and (topk, frontier_size) != (1, 1):
            raise ValueError("sampled drafts are supported for chains only: topk=1, frontier_size=1")
        self.topk, self.frontier_size, self.generator = topk, frontier_size, generator
        self._levels: list[dict[str, torch.Tensor]] = []  # candidate pool, one dict of [B, C] tensors per level
        self._pool_size = 0
        self._frontier_index: Optional[torch.Tensor] = None  # [B, M] pool index of the frontier; None = the root
        self._frontier_scores: Optional[torch.Tensor] = None  # [B, M]
        self._fed_mask: Optional[torch.Tensor] = None  # [B, F, F]

    def expand(self, level_logprobs: torch.Tensor) -> DraftFrontier:
        """level_logprobs: [B, M, V] drafter log-probs after each frontier node (M = 1: after the root)."""
        B, M, V = level_logprobs.shape
        expected = 1 if self._frontier_index is None else self._frontier_index.shape[1]
        if M != expected:
            raise ValueError(f"expand() expects log-probs for {expected} frontier rows, got {M}")
        device = level_logprobs.device
        logq = level_logprobs.float()  # [B, M, V]
        if self.generator is not None:
            child_tokens = sample(logq[:, 0], self.generator)[:, None, None]  # [B, 1, 1]
            child_logq = logq.gather(2, child_tokens)  # [B, 1, 1]
        else:
            child_logq, child_tokens = logq.topk(min(self.topk, V), dim=-1)  # [B, M, k]
        k = child_tokens.shape[-1]
        if self._frontier_index is None:
            parent_index = torch.full((B, 1), -1, dtype=torch.long, device=device)  # [B, 1]
            parent_scores = torch.zeros(B, 1, device=device)  # [B, 1]
        else:
            parent_index, parent_scores = self._frontier_index, self._frontier_scores
        scores = (parent_scores.unsqueeze(-1) + child_logq).flatten(1)  # [B, M*k]
        level = dict(
            tokens=child_tokens.flatten(1),  # [B, M*k]
            parents=parent_index.repeat_interleave(k, dim=1),  # [B, M*k] pool index, -1 = root
            logq=child_logq.flatten(1),  # [B, M*k]
            scores=scores,
            depth=torch.full((B, M * k), len(self._levels) + 1, dtype=torch.long, device=device),
        )
        if self.generator is not None:
            level["dists"] = logq  # [B, 1, V]
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
        pool = {key: torch.cat([lvl[key] for lvl in self._levels], dim=1) for key in self._levels[0]}  # [B, P(, V)]
        selected = _rank(pool["scores"])[:, :num_nodes]  # [B, N] pool index of node i
        B, P = pool["scores"].shape
        node_of_pool = torch.full((B, P), -1, dtype=torch.long, device=selected.device)
        node_of_pool.scatter_(1, selected, torch.arange(num_nodes, device=selected.device).expand(B, -1))  # [B, P]
        pool_parents = pool["parents"].gather(1, selected)  # [B, N]
        parents = torch.where(pool_parents >= 0, node_of_pool.gather(1, pool_parents.clamp(min=0)), -1)  # [B, N]
        depth = pool["depth"].gather(1, selected)  # [B, N]
        max_depth = min(len(self._levels), num_nodes)
        dists = None
        if "dists" in pool:
            dists = pool["dists"].gather(1, selected.unsqueeze(-1).expand(-1, -1, pool["dists"].shape[-1]))  # [B, N, V]
        return DraftTree(
            tokens=pool["tokens"].gather(1, selected),
            parents=parents,
            depth=depth,
            draft_logprobs=pool["logq"].gather(1, selected),
            scores=pool["scores"].gather(1, selected),
            tree_mask=ancestor_mask(parents, max_depth),
            position_offsets=torch.cat([torch.zeros_like(depth[:, :1]), depth], dim=1),
            max_depth=max_depth,
            max_children=1 if self.generator is not None else self.topk,
            draft_dists=dists,
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


def _uniform(num_rows: int, num_draws: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """[B, n] i.i.d. U(0, 1] draws (exp(-E) with E ~ Exp(1)), per-row generators supported like `sample`."""
    return torch.exp(-exponential_noise((num_rows, num_draws), generator, device))


def _rejection_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q: [B, V] probabilities -> [B, V] unnormalised max(p - q, 0); p itself where that is all zero
    (p == q up to rounding: then a rejection has probability ~0 and any p-sample is exact)."""
    residual = (p - q).clamp_min(0.0)
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)


def _remove_candidate(residual: torch.Tensor, token: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """residual: [B, V]; token: [B, 1]; rejected: [B] bool -> residual with residual[b, token[b]] = 0 where rejected."""
    kept = residual.gather(1, token) * (~rejected).unsqueeze(1)  # [B, 1]
    return residual.scatter(1, token, kept)


def verify(tree: DraftTree, target_logprobs: torch.Tensor, generator: Generators) -> VerifyResult:
    """Lossless verification. target_logprobs: [B, 1+N, V] log-probs of the distribution plain decoding
    samples from, at the root and after every node (e.g. `sampling.target_logprobs` of the verify logits).

    Sampled chains (`tree.draft_dists` set) use the min(1, p/q) rule; everything else the
    multi-candidate point-mass rule (see the module docstring).
    """
    B, N = tree.tokens.shape
    if target_logprobs.shape[:2] != (B, 1 + N):
        raise ValueError(f"target_logprobs {tuple(target_logprobs.shape)} must be [B={B}, 1+N={1 + N}, V]")
    logp = target_logprobs.float()
    if tree.draft_dists is not None:
        if tree.max_children != 1:
            raise ValueError("the sampled-draft rule needs a chain (one child per node)")
        accepted_nodes, accept_lens, residual = _verify_sampled_chain(tree, logp, generator)
    else:
        accepted_nodes, accept_lens, residual = _verify_point_drafts(tree, logp, generator)
    last_token = sample(residual.log(), generator)  # [B] correction or bonus token
    return _emitted(tree, logp, accepted_nodes, accept_lens, last_token)


def _verify_sampled_chain(tree: DraftTree, logp: torch.Tensor, generator: Generators):
    """Chain node i (depth i+1) was drawn from q_i = draft_dists[:, i]; its target p_i is row i.
    Returns accepted_nodes [B, N], accept_lens [B], residual [B, V] to sample the last token from."""
    B, N = tree.tokens.shape
    p = logp.exp()  # [B, 1+N, V]
    q = tree.draft_dists.float().exp()  # [B, N, V]
    drafts = tree.tokens.unsqueeze(-1)  # [B, N, 1]
    p_draft = p[:, :N].gather(2, drafts).squeeze(2)  # [B, N]
    q_draft = q.gather(2, drafts).squeeze(2)  # [B, N]
    accepted = _uniform(B, N, generator, p.device) * q_draft <= p_draft  # [B, N] with prob. min(1, p/q)
    accept_lens = accepted.long().cumprod(dim=1).sum(dim=1)  # [B] leading acceptances
    rows = torch.arange(B, device=p.device)
    stop_p = p[rows, accept_lens]  # [B, V] target at the first rejection (or after the last node)
    stop_q = q[rows, accept_lens.clamp(max=N - 1)] * (accept_lens < N).unsqueeze(1)  # [B, V]; 0 -> bonus from p
    depth = torch.arange(N, device=p.device)
    accepted_nodes = torch.where(depth < accept_lens.unsqueeze(1), depth, -1)  # [B, N]
    return accepted_nodes, accept_lens, _rejection_residual(stop_p, stop_q)


def _verify_point_drafts(tree: DraftTree, logp: torch.Tensor, generator: Generators):
    """Walk down from the root, trying each node's children in rank order against the residual.
    Returns accepted_nodes [B, D], accept_lens [B], residual [B, V] to sample the last token from."""
    B, N = tree.tokens.shape
    D, C = tree.max_depth, tree.max_children
    p = logp.exp()  # [B, 1+N, V]
    rows = torch.arange(B, device=p.device)
    u = _uniform(B, D * C, generator, p.device).view(B, D, C)  # one draw per (depth, child) and row
    current = torch.full((B,), -1, dtype=torch.long, device=p.device)  # [B] node reached, -1 = root
    searching = torch.ones(B, dtype=torch.bool, device=p.device)  # [B] accepted at every depth so far
    residual = p[:, 0]  # [B, V]
    accepted_nodes = torch.full((B, D), -1, dtype=torch.long, device=p.device)
    for d in range(D):
        is_child = tree.parents == current.unsqueeze(1)  # [B, N]
        child_rank = is_child.long().cumsum(dim=1) - 1  # [B, N] order among the siblings
        chosen = torch.full((B,), -1, dtype=torch.long, device=p.device)  # [B]
        for j in range(C):
            candidate = is_child & (child_rank == j)  # [B, N] at most one per row
            node = candidate.long().argmax(dim=1)  # [B]
            tried = searching & candidate.any(dim=1) & (chosen < 0)  # [B]
            token = tree.tokens.gather(1, node.unsqueeze(1))  # [B, 1]
            mass = residual.gather(1, token).squeeze(1)  # [B]
            accept = tried & (u[:, d, j] * residual.sum(dim=1) <= mass)  # prob. residual(x) / sum(residual)
            chosen = torch.where(accept, node, chosen)
            residual = _remove_candidate(residual, token, tried & ~accept)
        searching = chosen >= 0
        accepted_nodes[:, d] = chosen
        current = torch.where(searching, chosen, current)
        residual = torch.where(searching.unsqueeze(1), p[rows, 1 + chosen.clamp(min=0)], residual)
    return accepted_nodes, (accepted_nodes >= 0).sum(dim=1), residual


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
