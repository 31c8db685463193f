"""Speculative decoding in the rollout engine: the drafter's per-slot state, drafting, one-forward verification.

What: `DrafterState` keeps an EAGLE drafter (`drafter.model.Drafter`) in step with every live request
without ever re-prefilling the target; `draft_tree` grows a chain or an EAGLE-2 tree from it;
`verify_tree` checks the whole tree in one target forward over the KV cache and keeps the accepted
K/V; `speculative_step` strings them together into one decode step, the engine's `spec_step`. The
maths (tree building, exact-sample acceptance, which K/V to keep) live in `tree.py`; every model call goes
through `model_calls.ModelCalls`, which also holds the drafter's KV cache.

Drafter alignment (see `drafter/model.py`): drafter position t consumes (x_{t+1}, f_t), f_t being
the target's final hidden state at position t. A row with L cached target tokens has the root
x_L = `last_tokens` and f_{L-1} = `last_hidden`, so its drafter is up to date when it has cached
positions 0 .. L-2 and the root's entry (x_L, f_{L-1}) at position L-1 is next.

How the drafter is kept fed (TLT re-prefills every request when SD switches on; we do not):
- admission: the target's prefill returns its hidden states at no extra cost; the drafter prefills
  positions 0 .. P-3 from them in one call (siblings sharing the prefill copy its K/V too);
- every step: the step's new (token, target hidden) pairs are written to a per-slot pending buffer of
  `capacity` entries (a device scatter, no model call, no sync);
- a speculative step first feeds the pending entries and the root in one causal drafter call (this
  is also how the accepted tokens of the previous round are re-fed with the target's own hidden
  states: the draft-level entries are never kept), then drafts;
- plain steps feed nothing until some row's buffer is full, then flush all rows in one call.
Feeding in chunks makes one drafter call per `capacity` plain steps instead of one per step. Measured
on CPU (8 rows x 200 plain steps, the tests' 2-layer model): feeding every step added 66% to the
generation time (0.26 s of drafter calls on 0.44 s), capacity 64 added 11% (0.009 s of drafter calls;
the rest is the per-step scatter into the buffers). The buffers cost num_slots x capacity x H.

Visibility while drafting: draft level k feeds the frontier's K nodes after the E nodes of levels
1 .. k-1, which are already in the drafter's cache. A node must see its ancestors among those and
not its cousins, so the level's `new_mask` is [B, K, E+K] (`TreeBuilder`'s `fed_mask` rows of the
new frontier): `cache_attention_mask` applies its first E columns to the E entries before `start`.
One drafter token per node, nothing re-fed.

Cache layout: the drafter's cache has `cache_headroom` extra positions past max_seq_len, where right
padding of a feed and the draft levels may write beyond a row's end without bounds checks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs
from megatron_tlt.rollout.spec.selector import DraftShape
from megatron_tlt.rollout.spec.tree import DraftTree, TreeBuilder, VerifyResult, kv_keep_index, verify
from megatron_tlt.rollout.types import DecodeRows, StepOutput

if TYPE_CHECKING:
    from megatron_tlt.rollout.model_calls import ModelCalls


def cache_headroom(shapes: Sequence[DraftShape], capacity: int) -> int:
    """Drafter-cache positions past max_seq_len (see the module docstring) for drafts of `shapes` and
    `capacity` pending pairs per slot."""
    return capacity + 1 + max(s.topk * s.depth for s in shapes)


class DrafterState:
    """Per slot, how far the drafter has been fed and the target pairs it has not seen (its KV cache is
    `calls.drafter_cache`)."""

    def __init__(self, calls: "ModelCalls", capacity: int):  # capacity: pending pairs per slot
        if capacity < 1:
            raise ValueError(f"the drafter feed capacity must be >= 1, got {capacity}")
        self.calls = calls
        self.capacity = capacity
        num_slots, H, device = calls.cache.num_slots, calls.hidden_size, calls.device
        # Pending pairs (x_{t+1}, f_t) for positions fed .. L-2 of each slot, at index t - fed; the last
        # column absorbs ignored writes.
        self.tokens = torch.zeros(num_slots, capacity + 1, dtype=torch.long, device=device)  # [slots, C+1]
        self.hidden = torch.zeros(num_slots, capacity + 1, H, dtype=calls.hidden_dtype, device=device)  # [slots, C+1, H]
        self.fed = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots] drafter positions cached
        self.host_fed = [0] * num_slots

    def pending(self, rows: DecodeRows) -> list[int]:
        """Pending pairs per row (host ints, no sync); -1 for a row whose root has no target hidden yet."""
        return [n - 1 - self.host_fed[r.slot] for n, r in zip(rows.host_lengths, rows.requests)]

    def admit(self, slots: list[int], prompt_lens: list[int]) -> None:
        """New requests whose prompts' drafter prefill (if any) is in place."""
        fed = [max(n - 2, 0) for n in prompt_lens]
        self.fed[torch.tensor(slots, device=self.fed.device)] = torch.tensor(fed, device=self.fed.device)
        for slot, n in zip(slots, fed):
            self.host_fed[slot] = n

    def prefill(self, tokens: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor) -> None:
        """Drafter prefill from the target's: tokens [R, W] = prompt[:-1] right-padded, hidden [R, W, H]
        the target's at those positions, slots [R]. Caches positions 0 .. P-3: (prompt[t+1], f_t)."""
        width = tokens.shape[1] - 1
        if width == 0:
            return
        self.calls.drafter_feed(tokens[:, 1:], hidden[:, :-1], slots, torch.zeros_like(slots), kv_len=width)

    def record(self, rows: DecodeRows, out: StepOutput) -> None:
        """After a step over `rows` (state before its commit): buffer the pairs it made pending. Entry j of
        [old root, out tokens...] is the pair of position L-1+j; it is pending if that position is not fed
        yet and below the new root (j < num_new)."""
        tokens = torch.cat([rows.last_tokens[:, None], out.tokens], dim=1)  # [B, 1+T]
        hidden = torch.cat([rows.last_hidden[:, None], out.hidden.to(rows.last_hidden.dtype)], dim=1)  # [B, 1+T, H]
        j = torch.arange(tokens.shape[1], device=tokens.device)  # [1+T]
        index = (rows.lengths - 1 - self.fed[rows.slots])[:, None] + j  # [B, 1+T] buffer index
        keep = (index >= 0) & (j < out.num_new[:, None])
        index = torch.where(keep, index, self.capacity)
        slot_rows = rows.slots[:, None].expand_as(index)
        self.tokens[slot_rows, index] = tokens.clamp(min=0)  # -1 (not emitted) goes to scratch, which feeds read as padding
        self.hidden[slot_rows, index] = hidden.to(self.hidden.dtype)

    def flush_if_full(self, rows: DecodeRows) -> None:
        """Before a plain step (which adds one pending pair per row): feed the drafter if a buffer is full."""
        if max(self.pending(rows), default=0) >= self.capacity:
            self.feed(rows, with_root=False)

    def feed(self, rows: DecodeRows, with_root: bool) -> Optional[torch.Tensor]:
        """Run the drafter over every row's pending pairs (then its root, with_root) in one right-padded call.
        Returns the drafter output at the root [B, H] with_root (it predicts the token after the root)."""
        counts = [max(c, 0) for c in self.pending(rows)]
        width = max(counts, default=0) + int(with_root)
        if width == 0:
            return None
        tokens = self.tokens[rows.slots, :width]  # [B, W] (a copy)
        hidden = self.hidden[rows.slots, :width]  # [B, W, H]
        batch = torch.arange(len(rows), device=tokens.device)
        at = torch.tensor(counts, device=tokens.device)  # [B] index of the root in each row
        if with_root:
            tokens[batch, at] = rows.last_tokens
            hidden[batch, at] = rows.last_hidden.to(hidden.dtype)
        start = self.fed[rows.slots]  # [B]
        kv_len = max(self.host_fed[r.slot] for r in rows.requests) + width
        out = self.calls.drafter_feed(tokens, hidden, rows.slots, start, kv_len)  # [B, W, H]
        self.fed[rows.slots] = torch.maximum(start, rows.lengths - 1 + int(with_root))
        for n, r in zip(rows.host_lengths, rows.requests):
            self.host_fed[r.slot] = max(self.host_fed[r.slot], n - 1 + int(with_root))
        return out[batch, at] if with_root else None


def feasible_shape(shape: DraftShape, host_lengths: list[int], max_seq_len: int) -> Optional[DraftShape]:
    """`shape` cut so every row's verify tokens fit its context (root at L, nodes up to L + N <= max_seq_len - 1);
    None when some row has no room for a draft, or has no target hidden state for its root yet (L = 0:
    the first step of a one-token prompt). Those steps decode plainly."""
    if min(host_lengths) < 1:
        return None
    return shape.shrink(max_seq_len - 1 - max(host_lengths))


def speculative_step(
    state: DrafterState, rows: DecodeRows, params: SamplingParams, shape: DraftShape, coupled: bool = True
) -> StepOutput:
    """Feed the drafter its pending pairs and the roots, draft `shape` (it must fit every row's context: see
    `feasible_shape`), verify all drafts in one target forward. Returns per row the accepted drafts and
    the correction/bonus token, with the target's logprobs and hidden states."""
    g_root = state.feed(rows, with_root=True)  # [B, H]
    tree = draft_tree(state, rows, params, shape, g_root, coupled)
    result, hidden = verify_tree(state.calls, rows, params, tree)  # hidden: [B, D+1, H]
    return StepOutput(result.tokens, result.logprobs, hidden, result.accept_lens + 1, shape)


def _expand(
    builder: TreeBuilder, calls: "ModelCalls", g: torch.Tensor, rows: DecodeRows, params: SamplingParams, depth: int,
    coupled: bool,
):
    """Drafter outputs g [B, M, H] of the frontier at `depth - 1` -> the next frontier. Children are scored by
    the drafter's log-softmax (chains: its target-warped distribution); with `coupled`, each node's first child
    is the drafter's sample under the target's noise for response position num_generated + depth - 1."""
    logits = calls.draft_logits(g)  # [B, M, V]
    warped = target_logprobs(logits.flatten(0, 1), params).view_as(logits) if coupled or builder.topk == 1 else None
    first = None
    if coupled:
        positions = (rows.num_generated + depth - 1)[:, None].expand(logits.shape[:2])  # [B, M]
        first = sample(warped, rows.seeds, positions, greedy=params.greedy)
    return builder.expand(warped if builder.topk == 1 else logits.log_softmax(dim=-1), first)


def draft_tree(
    state: DrafterState, rows: DecodeRows, params: SamplingParams, shape: DraftShape, g_root: torch.Tensor,
    coupled: bool = True,
) -> DraftTree:
    """Grow `shape` from each row's root, whose drafter output is g_root [B, H] (from `state.feed`); `coupled`:
    first children drawn with the target's position noise (else every child is a top-k one).

    Level k's K frontier nodes run at position L-1+k with their parent's drafter output as hidden
    input, cached after the E nodes of the earlier levels (cache positions L+E ..), seeing the
    committed entries, their ancestors and themselves.
    """
    calls = state.calls
    builder = TreeBuilder(shape.topk)
    g = g_root[:, None]  # [B, M=1, H] drafter outputs of the last level
    frontier = _expand(builder, calls, g, rows, params, 1, coupled)
    fed = 0  # E: draft nodes cached so far
    for depth in range(1, shape.depth):
        B, K = frontier.tokens.shape
        parent_g = g.gather(1, frontier.parent_slot[..., None].expand(B, K, g.shape[-1]))  # [B, K, H]
        positions = (rows.lengths - 1 + depth)[:, None].expand(B, K)  # [B, K]
        visible = frontier.fed_mask[:, fed:]  # [B, K, E+K]: ancestors among the cached draft nodes, and itself
        kv_len = max(rows.host_lengths) + fed + K
        g = calls.draft_level(frontier.tokens, parent_g, positions, rows.slots, rows.lengths + fed, kv_len, visible)  # [B, K, H]
        fed += K
        frontier = _expand(builder, calls, g, rows, params, depth + 1, coupled)
    return builder.finalize(shape.num_verify)


def verify_tree(
    calls: "ModelCalls", rows: DecodeRows, params: SamplingParams, tree: DraftTree
) -> tuple[VerifyResult, torch.Tensor]:
    """One target forward over [root, nodes] with the tree mask (positions L + depth), exact-sample
    verification, and the accepted K/V moved next to the committed ones.

    Returns the VerifyResult and hidden [B, D+1, H]: the target's final hidden state at the position
    that produced each emitted token (the root, then each accepted node).
    """
    N = tree.tokens.shape[1]
    tokens = torch.cat([rows.last_tokens[:, None], tree.tokens], dim=1)  # [B, 1+N]
    positions = rows.lengths[:, None] + tree.position_offsets  # [B, 1+N]
    kv_len = max(rows.host_lengths) + 1 + N
    hidden, logits = calls.verify(tokens, positions, rows.slots, rows.lengths, kv_len, tree.tree_mask)  # [B, 1+N, H], [B, 1+N, V]
    logp = target_logprobs(logits.flatten(0, 1), params).view_as(logits)
    positions = rows.num_generated[:, None] + tree.position_offsets  # [B, 1+N] response position each row predicts
    result = verify(tree, logp, sample(logp, rows.seeds, positions, greedy=params.greedy))
    keep = kv_keep_index(result)  # [B, D+1]
    calls.keep_verified(rows.slots, rows.lengths, keep)
    return result, hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
