"""The drafter's loss: EAGLE's hidden-state regression plus soft cross-entropy, on one packed micro-batch.

What: `drafter_loss` scores the drafter against the policy's own final hidden states over packed examples
(the fields of a `data.DrafterBatch`) and returns the loss summed over trained positions, with its parts
as metrics. `frozen` and `has_next_token` are its two helpers, public for callers that need the same.

Why: the training signal is what the policy computes anyway: its tokens and the final normed hidden state
at every position (f_t, the LM-head input that predicts x_{t+1}), so no labels and no extra model are needed.

Loss (EAGLE alignment, see drafter/model.py). At packed position t of an example the drafter consumes
(x_{t+1}, f_t) at position id t and returns g_t, trained towards the policy's next state f_{t+1}:

    regression      smooth_l1(g_t, f_{t+1}), averaged over H          (beta = 1, EAGLE's nn.SmoothL1Loss)
    classification  -sum_v p_t(v) log q_t(v),  p_t = softmax(lm_head(f_{t+1})) (no grad),
                                               q_t = softmax(lm_head(g_t))
    loss            HIDDEN_WEIGHT * regression + CE_WEIGHT * classification, summed over trained positions

Position t is trained iff `loss_mask[t]` and x_{t+1} is in the same example (the last position of each
example has no next token and no f_{t+1}: it runs through the drafter, which is causal, and is ignored),
so nothing is ever predicted across an example boundary. The weights are EAGLE's (v_w = 1.0, p_w = 0.1):
the hidden-state regression is the main signal because the drafter's output is fed back as its next input
hidden state, so errors in it compound along a draft; the soft cross-entropy against the target's full
next-token distribution (richer than the sampled token, and free since f_{t+1} is at hand) aligns the
drafter's proposals with what verification accepts, and is down-weighted because its scale (nats over the
vocabulary) is larger and noisier than the regression's. Top-1 agreement (drafter argmax == target argmax)
is reported as a proxy for the acceptance rate.

The loss is a SUM over trained positions, so packing is additive (a pack's loss is the sum of its examples'
losses) and a caller that accumulates micro-batches divides once by their total count of trained positions;
`DrafterTrainer.step` divides by its micro-batch's (`metrics["num_tokens"]`).

Memory: the classification term needs [M, V] logits (M trained positions). Computed whole, autograd keeps
two [M, V] fp32 tensors for backward (the target probabilities and the drafter's log-softmax) and about three
more exist transiently: ~5 * M * V * 4 bytes, 25 GB for M = 8192 and a 152k vocabulary; fine for tiny CPU
vocabularies. So positions are processed in chunks of `vocab_chunk_tokens` (c) under activation
checkpointing: only the [M, H] chunk inputs are kept, each chunk's logits are rebuilt in backward, and the
peak is ~5 * c * V * 4 bytes (3 GB for c = 1024 at 152k). A micro-batch with M <= c is one chunk and is
not recomputed.

Gradients reach only the drafter's own weights: the shared embedding and LM head are the policy's, and
`drafter_loss` runs the policy's pieces with the policy's parameters frozen (`frozen`, restored on exit),
so the policy's `.grad` stays untouched without the caller flipping `requires_grad` (the RL trainer needs
it on). Under TP every rank passes the same batch and the logits are gathered over the vocabulary shards.

How:

    loss, metrics = drafter_loss(drafter, b.tokens, b.hidden, b.cu_seqlens, b.position_ids, b.loss_mask,
                                 max_seqlen=b.max_seqlen)          # b: a DrafterBatch on the drafter's device
    (loss / metrics["num_tokens"].clamp(min=1.0)).backward()      # a mean per trained position
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.drafter.model import Drafter

HIDDEN_WEIGHT = 1.0  # EAGLE's v_w: smooth-L1 regression of the next hidden state
CE_WEIGHT = 0.1  # EAGLE's p_w: soft cross-entropy against the target's next-token distribution
VOCAB_CHUNK_TOKENS = 1024  # positions per chunk of [chunk, V] logits in the classification term
TTT_STEPS = 3  # EAGLE-3 training-time test: unrolled steps (drafter.ttt_steps)
TTT_STEP_DECAY = 0.8  # EAGLE-3's weight of step j: 0.8 ** j
TTT_HIDDEN_WEIGHT = 1.0  # EAGLE-3 here: weight of the auxiliary regression norm(g_j) ~ f (drafter.ttt_hidden_weight)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Run with every parameter of `module` not requiring grad; restore each flag on exit. Autograd records
    edges to a leaf only if it requires grad when an op runs, so ops run inside never reach its `.grad`."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def has_next_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """cu_seqlens [N+1] -> [T] bool: position t has a next token in its own example (False at each example's end)."""
    has_next = torch.ones(num_tokens, dtype=torch.bool, device=cu_seqlens.device)
    has_next[cu_seqlens[1:].long() - 1] = False
    return has_next


def _vocab_terms(drafter: "Drafter | Eagle3Drafter", g: torch.Tensor, f_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g, f_next: [c, H] -> (soft cross-entropy [c] fp32, top-1 agreement [c] bool). Differentiable in g only."""
    ids = drafter.draft_ids  # [Vd] target ids of a draft vocabulary, or None (the policy's whole vocabulary)
    with frozen(drafter.policy):  # also during a checkpoint's recompute, so both passes build the same graph
        with torch.no_grad():
            target_logits = drafter.policy.compute_logits(f_next[None])[0].float()  # [c, V]
            target_top1 = target_logits.argmax(dim=-1)  # [c]
            if ids is not None:  # the target's distribution renormalised over the draft vocabulary (SpecForge's)
                target_logits = target_logits[:, ids]  # [c, Vd]
            target_probs = target_logits.softmax(dim=-1)  # [c, Vd]
        draft_logits = drafter.vocab_logits(g[None])[0].float()  # [c, Vd]
    ce = -(target_probs * draft_logits.log_softmax(dim=-1)).sum(dim=-1)  # [c]
    top1 = draft_logits.detach().argmax(dim=-1)
    return ce, (top1 if ids is None else ids[top1]) == target_top1


def _soft_cross_entropy(
    drafter: "Drafter | Eagle3Drafter", g: torch.Tensor, f_next: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_vocab_terms` over [M, H] inputs in chunks of `chunk_tokens` rows, recomputed in backward when chunked."""
    if g.shape[0] <= chunk_tokens:
        return _vocab_terms(drafter, g, f_next)
    parts = [
        checkpoint(_vocab_terms, drafter, g_chunk, f_chunk, use_reentrant=False, preserve_rng_state=False)
        for g_chunk, f_chunk in zip(g.split(chunk_tokens), f_next.split(chunk_tokens))
    ]
    return torch.cat([ce for ce, _ in parts]), torch.cat([agree for _, agree in parts])


def drafter_loss(
    drafter: Drafter,
    tokens: torch.Tensor,  # [T] int64 the policy's packed tokens x
    target_hidden: torch.Tensor,  # [T, H] the policy's final normed hidden state f at each position
    cu_seqlens: torch.Tensor,  # [N+1] int32 example boundaries
    position_ids: torch.Tensor,  # [T] int64, restarting at 0 per example
    loss_mask: torch.Tensor,  # [T] bool, train position t (its x_{t+1} and f_{t+1} must be in the same example)
    *,
    hidden_weight: float = HIDDEN_WEIGHT,
    ce_weight: float = CE_WEIGHT,
    max_seqlen: Optional[int] = None,
    vocab_chunk_tokens: int = VOCAB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The EAGLE loss of one packed micro-batch, summed over trained positions (see the module docstring).

    Returns (loss, metrics): metrics hold detached 0-d tensors: `hidden_loss`, `ce_loss` and `loss` as
    means per trained position, `top1` (drafter argmax == target argmax, mean) and `num_tokens` (trained
    positions M). Only the drafter's own parameters get gradients.
    """
    num_tokens = tokens.shape[0]
    has_next = has_next_token(cu_seqlens, num_tokens)  # [T]
    next_tokens = torch.where(has_next, tokens.roll(-1), tokens)  # [T] x_{t+1}; an example's end keeps its own (ignored)
    with frozen(drafter.policy):
        g = drafter(
            next_tokens[None], target_hidden[None], position_ids[None], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        )[0]  # [T, H] g_t ~ f_{t+1}
    trained = (loss_mask & has_next).nonzero().squeeze(1)  # [M]
    g, f_next = g[trained], target_hidden[trained + 1]  # [M, H] each
    hidden_terms = F.smooth_l1_loss(g.float(), f_next.float(), reduction="none").mean(dim=-1)  # [M]
    ce_terms, agree = _soft_cross_entropy(drafter, g, f_next, vocab_chunk_tokens)  # [M], [M]
    hidden_sum, ce_sum = hidden_terms.sum(), ce_terms.sum()
    loss = hidden_weight * hidden_sum + ce_weight * ce_sum
    count = torch.tensor(float(trained.numel()), device=g.device)
    denom = count.clamp(min=1.0)
    metrics = {
        "loss": loss.detach() / denom,
        "hidden_loss": hidden_sum.detach() / denom,
        "ce_loss": ce_sum.detach() / denom,
        "top1": agree.float().sum() / denom,
        "num_tokens": count,
    }
    return loss, metrics


def batch_loss(drafter, b, *, ttt_steps: int = TTT_STEPS, ttt_hidden_weight: float = TTT_HIDDEN_WEIGHT,
               hidden_weight: float = HIDDEN_WEIGHT, ce_weight: float = CE_WEIGHT):
    """The loss of `drafter`'s arch on a `data.DrafterBatch` b (on the drafter's device): `ttt_loss` for an
    EAGLE-3 drafter (b needs its features; ttt_* options), `drafter_loss` for the EAGLE one (hidden / ce weights)."""
    if isinstance(drafter, Eagle3Drafter):
        if b.features is None:
            raise ValueError("an eagle3 drafter trains on target features: build its examples with its feature_layers")
        return ttt_loss(drafter, b.tokens, b.hidden, b.features, b.cu_seqlens, b.position_ids, b.loss_mask, steps=ttt_steps,
                        hidden_weight=ttt_hidden_weight)
    return drafter_loss(drafter, b.tokens, b.hidden, b.cu_seqlens, b.position_ids, b.loss_mask,
                        hidden_weight=hidden_weight, ce_weight=ce_weight, max_seqlen=b.max_seqlen)


def ttt_loss(
    drafter: Eagle3Drafter,
    tokens: torch.Tensor,  # [T] int64 the policy's packed tokens x
    target_hidden: torch.Tensor,  # [T, H] the policy's final normed hidden state f at each position
    features: torch.Tensor,  # [T, 3H] the target features F at each position (`Eagle3Drafter.feature_layers`)
    cu_seqlens: torch.Tensor,  # [N+1] int32 example boundaries
    position_ids: torch.Tensor,  # [T] int64, restarting at 0 per example
    loss_mask: torch.Tensor,  # [T] bool
    *,
    steps: int = TTT_STEPS,
    step_decay: float = TTT_STEP_DECAY,
    hidden_weight: float = TTT_HIDDEN_WEIGHT,
    vocab_chunk_tokens: int = VOCAB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EAGLE-3's loss with training-time test on one packed micro-batch, summed over trained positions.

    Step j = 0 .. steps-1 (`Eagle3Drafter.unroll`): entry t consumes (x_{t+1+j}, its own step j-1 output g_{j-1};
    step 0: F_t) at position id t+j and is scored by the soft cross-entropy against the target's next-token
    distribution softmax(lm_head(f_{t+1+j})), the distribution of x_{t+2+j}, plus `hidden_weight` x the
    regression smooth_l1(norm(g_j), f_{t+1+j}) (mean over H) of the drafter's LM-head input on the target's.
    Entry t is trained at step j iff x_{t+1+j} is in its own example and loss_mask[t+j] (step 0: the positions
    `drafter_loss` trains), so nothing is predicted across an example boundary and the loss of a pack is the
    sum of its examples'.

        loss = sum_j step_decay**j * sum_{t trained at j} (CE_j(t) + hidden_weight * REG_j(t))

    The regression is not EAGLE-3's (its loss is the token term alone: hidden_weight = 0) and changes nothing
    that is served: it is a training signal only. It is EAGLE's, applied where EAGLE-3's head has the policy's
    LM-head input: it keeps the drafter's fed-back outputs near the target's states over the unrolled steps,
    and on the benchmark policy it lengthens accepted drafts (tools/bench/rollout.py's heads section, with
    --ttt-hidden-weight 0 for the paper's loss).

    With steps = 1 and hidden_weight = 0 it is the plain next-token soft cross-entropy of the drafter's step-0
    logits. Chunked over positions as `drafter_loss` (the vocabulary terms under activation checkpointing).
    Metrics (detached 0-d tensors): `loss` per step-0 trained position (the normaliser, `num_tokens`), `ce_loss`,
    `hidden_loss` and `top1` of step 0, `ce_step{j}` / `top1_step{j}` of each step j (means over its entries).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = tokens.shape[0]
    t = torch.arange(T, device=tokens.device)
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    end = torch.repeat_interleave(cu_seqlens[1:].long(), sizes)  # [T] one past the last position of t's example
    ahead = [torch.minimum(t + 1 + j, end - 1) for j in range(steps)]  # [T] each: t+1+j within the example
    step_tokens = torch.stack([tokens[a] for a in ahead])  # [k, T]
    with frozen(drafter.policy):
        outputs = drafter.unroll(step_tokens, features, position_ids, cu_seqlens)  # k x [T, H]
    loss = torch.zeros((), device=tokens.device)
    metrics: dict[str, torch.Tensor] = {}
    for j, g in enumerate(outputs):
        trained = ((t + 1 + j < end) & loss_mask[torch.minimum(t + j, end - 1)]).nonzero().squeeze(1)  # [M_j]
        g_j, f_next = g[trained], target_hidden[trained + 1 + j]  # [M_j, H] each
        ce, agree = _soft_cross_entropy(drafter, g_j, f_next, vocab_chunk_tokens)
        step_loss = ce.sum()
        count = torch.tensor(float(trained.numel()), device=tokens.device)
        if hidden_weight:
            reg = F.smooth_l1_loss(drafter.norm(g_j).float(), f_next.float(), reduction="none").mean(dim=-1).sum()
            step_loss = step_loss + hidden_weight * reg
            if j == 0:
                metrics["hidden_loss"] = reg.detach() / count.clamp(min=1.0)
        loss = loss + step_decay**j * step_loss
        metrics[f"ce_step{j}"] = ce.detach().sum() / count.clamp(min=1.0)
        metrics[f"top1_step{j}"] = agree.float().sum() / count.clamp(min=1.0)
        if j == 0:
            metrics["num_tokens"] = count
    denom = metrics["num_tokens"].clamp(min=1.0)
    return loss, {"loss": loss.detach() / denom, "ce_loss": metrics["ce_step0"], "top1": metrics["top1_step0"], **metrics}
