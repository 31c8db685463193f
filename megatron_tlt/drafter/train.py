"""Drafter training: the EAGLE loss on packed sequences, a preemptible one-micro-batch trainer, offline warm-up.

What: `drafter_loss` scores the drafter against the policy's own final hidden states; `DrafterTrainer.step`
takes one optimizer step on one packed micro-batch (the unit TLT's online spot training is preempted at);
`train_drafter_offline` and `megatron-tlt train-drafter` warm a drafter up on policy samples before RL.

Why: TLT keeps the drafter aligned with a policy that RL keeps moving. The training signal is what the
policy computes anyway: its tokens and the final normed hidden state at every position, so no labels and
no extra model are needed, and a step is short enough to run in the gaps of a long-tailed rollout.

Data. A `DrafterExample` is one policy sequence (prompt + response): tokens x_0..x_{L-1} [L] and
hidden f_0..f_{L-1} [L, H], where f_t is the policy's final normed hidden state at position t, the LM-head
input that predicts x_{t+1} (`Policy.hidden_states`; the trainer's packed forward returns the same).
Examples are packed as the policy is (`megatron_tlt.data.packing`): `make_batches` bin-packs them into
`DrafterBatch`es of at most `max_tokens` tokens with `cu_seqlens` and position ids restarting per example.

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
it on). Under TP every rank passes the same batch; logits are gathered over the vocabulary shards, and the
gradient norm used for clipping is the TP-global one, so replicated weights stay identical on all ranks.

How:

    examples = policy_examples(policy, sequences, max_tokens=4096)        # one packed no-grad forward
    trainer = DrafterTrainer(Drafter(policy), lr=1e-4, max_tokens_per_micro_batch=4096)
    for batch in trainer.make_batches(examples):
        metrics = trainer.step(batch)      # {"loss", "hidden_loss", "ce_loss", "top1", "num_tokens", ...}

    drafter = train_drafter_offline(policy, sequences, steps=500)          # the same, cycling over the data
    megatron-tlt train-drafter ...                                         # the same from the command line (cli/)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_tlt.data.packing import pack_sequences, plan_micro_batches, unpack
from megatron_tlt.drafter.model import Drafter
from megatron_tlt.models.packed import chunk_forward
from megatron_tlt.parallel.grads import clip_grads_, global_grad_norm

HIDDEN_WEIGHT = 1.0  # EAGLE's v_w: smooth-L1 regression of the next hidden state
CE_WEIGHT = 0.1  # EAGLE's p_w: soft cross-entropy against the target's next-token distribution
VOCAB_CHUNK_TOKENS = 1024  # positions per chunk of [chunk, V] logits in the classification term


# ---- the loss ----
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


def _vocab_terms(drafter: Drafter, g: torch.Tensor, f_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g, f_next: [c, H] -> (soft cross-entropy [c] fp32, top-1 agreement [c] bool). Differentiable in g only."""
    with frozen(drafter.policy):  # also during a checkpoint's recompute, so both passes build the same graph
        with torch.no_grad():
            target_logits = drafter.compute_logits(f_next[None])[0].float()  # [c, V]
            target_probs = target_logits.softmax(dim=-1)  # [c, V]
            target_top1 = target_logits.argmax(dim=-1)  # [c]
        draft_logits = drafter.compute_logits(g[None])[0].float()  # [c, V]
    ce = -(target_probs * draft_logits.log_softmax(dim=-1)).sum(dim=-1)  # [c]
    return ce, draft_logits.detach().argmax(dim=-1) == target_top1


def _soft_cross_entropy(
    drafter: Drafter, g: torch.Tensor, f_next: torch.Tensor, chunk_tokens: int
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


# ---- data ----
@dataclass
class DrafterExample:
    """One policy sequence and the policy's hidden states over it."""

    tokens: torch.Tensor  # [L] int64 prompt + response
    hidden: torch.Tensor  # [L, H] final normed hidden state at each position (hidden[t] predicts tokens[t+1])


@dataclass
class DrafterBatch:
    """Packed examples: one micro-batch, the unit of a trainer step."""

    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H]
    position_ids: torch.Tensor  # [T] int64, restarting at 0 per example
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int
    loss_mask: torch.Tensor  # [T] bool, position t has a next token in its example

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "DrafterBatch":
        return DrafterBatch(
            self.tokens.to(device), self.hidden.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
            self.max_seqlen, self.loss_mask.to(device),
        )


def make_batches(examples: Sequence[DrafterExample], max_tokens: int) -> list[DrafterBatch]:
    """Bin-pack examples into micro-batches of at most `max_tokens` tokens. A longer example is cut to its
    first `max_tokens` tokens (causal, so the prefix is exact), which keeps every trainer step bounded."""
    examples = [DrafterExample(e.tokens[:max_tokens], e.hidden[:max_tokens]) for e in examples]
    bins = plan_micro_batches([e.tokens.shape[0] for e in examples], max_tokens)
    batches = []
    for idx in bins:
        packed = pack_sequences([examples[i].tokens for i in idx])
        batches.append(DrafterBatch(
            tokens=packed.tokens,
            hidden=torch.cat([examples[i].hidden for i in idx]),
            position_ids=packed.position_ids,
            cu_seqlens=packed.cu_seqlens,
            max_seqlen=packed.max_seqlen,
            loss_mask=packed.loss_mask,
        ))
    return batches


@torch.no_grad()
def policy_examples(policy: nn.Module, sequences: Sequence[Sequence[int]], max_tokens: int) -> list[DrafterExample]:
    """One packed no-grad forward of the policy per micro-batch of `sequences` -> their DrafterExamples.

    The hidden states are kept in host memory (sum of lengths x H x dtype bytes) and moved to the device
    one micro-batch per trainer step. Sequences longer than `max_tokens` get a forward of their own.
    """
    examples: list[Optional[DrafterExample]] = [None] * len(sequences)
    for idx in plan_micro_batches([len(s) for s in sequences], max_tokens):
        packed = pack_sequences([list(sequences[i]) for i in idx])
        hidden = chunk_forward(policy, packed).cpu()  # [T, H]
        for i, tokens, h in zip(idx, unpack(packed.tokens, packed.cu_seqlens), unpack(hidden, packed.cu_seqlens)):
            examples[i] = DrafterExample(tokens, h)
    return examples


# ---- the trainer ----
class DrafterTrainer:
    """AdamW on the drafter's own weights, one packed micro-batch per `step`.

    Each step is self-contained (zero grads, forward, backward, clip, update), so online training can be
    stopped between any two steps. A step whose loss or gradient norm is not finite, or whose batch has no
    trained position, makes no update and says so in its metrics (`skipped` = 1). `state_dict()` / `load_state_dict()` cover the drafter's
    weights (this rank's shards), the optimizer state and the step count.
    """

    def __init__(
        self,
        drafter: Drafter,
        lr: float = 1e-4,  # SpecForge's default for EAGLE heads
        weight_decay: float = 0.0,  # applied to matrices only, never to norm weights or biases
        max_tokens_per_micro_batch: int = 4096,
        grad_clip: float = 0.5,  # EAGLE's gradient clipping
        *,
        betas: tuple[float, float] = (0.9, 0.95),  # EAGLE's
        hidden_weight: float = HIDDEN_WEIGHT,
        ce_weight: float = CE_WEIGHT,
    ):
        if max_tokens_per_micro_batch < 2:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 2, got {max_tokens_per_micro_batch}")
        self.drafter = drafter
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.grad_clip = grad_clip
        self.hidden_weight, self.ce_weight = hidden_weight, ce_weight
        self.params = [p for p in drafter.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
        self.device = self.params[0].device
        self.steps = 0

    def make_batches(self, examples: Sequence[DrafterExample]) -> list[DrafterBatch]:
        return make_batches(examples, self.max_tokens_per_micro_batch)

    def step(self, batch: DrafterBatch) -> dict[str, float]:
        """One optimizer step on one micro-batch -> metrics (floats; one host sync)."""
        if batch.num_tokens > self.max_tokens_per_micro_batch:
            raise ValueError(
                f"micro-batch of {batch.num_tokens} tokens exceeds max_tokens_per_micro_batch="
                f"{self.max_tokens_per_micro_batch}; build batches with make_batches"
            )
        t0 = time.perf_counter()
        b = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = drafter_loss(
            self.drafter, b.tokens, b.hidden, b.cu_seqlens, b.position_ids, b.loss_mask,
            hidden_weight=self.hidden_weight, ce_weight=self.ce_weight, max_seqlen=b.max_seqlen,
        )
        (loss / metrics["num_tokens"].clamp(min=1.0)).backward()
        grad_norm = global_grad_norm(self.params, self.drafter.tp_group)
        clip_grads_(self.params, self.grad_clip, grad_norm)
        values = torch.stack([*metrics.values(), grad_norm]).tolist()  # the step's one host sync
        out = dict(zip([*metrics, "grad_norm"], values))
        update = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]) and out["num_tokens"] > 0
        if update:
            self.optimizer.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        out["skipped"] = float(not update)
        out["step_time_s"] = time.perf_counter() - t0
        return out

    def state_dict(self) -> dict:
        return {"drafter": self.drafter.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.drafter.load_state_dict(state["drafter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


@torch.no_grad()
def evaluate_drafter(drafter: Drafter, batches: Sequence[DrafterBatch]) -> dict[str, float]:
    """Loss parts and top-1 agreement over `batches`, weighted by trained positions (no update)."""
    device = next(drafter.parameters()).device
    totals: dict[str, float] = {}
    for batch in batches:
        b = batch.to(device)
        _, metrics = drafter_loss(drafter, b.tokens, b.hidden, b.cu_seqlens, b.position_ids, b.loss_mask, max_seqlen=b.max_seqlen)
        n = float(metrics["num_tokens"])
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + (n if key == "num_tokens" else float(value) * n)
    n = max(totals.get("num_tokens", 0.0), 1.0)
    return {key: value if key == "num_tokens" else value / n for key, value in totals.items()}


def train_drafter_offline(
    policy: nn.Module,
    sequences: Sequence[Sequence[int]],  # policy samples: prompt + response token ids
    steps: int,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    max_tokens_per_micro_batch: int = 4096,
    grad_clip: float = 0.5,
    seed: int = 0,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
    drafter: Optional[Drafter] = None,
) -> Drafter:
    """`drafter` (default: a fresh one over `policy`) trained for `steps` trainer steps on the policy's hidden
    states over `sequences` (one packed forward, `policy_examples`), cycling over the micro-batches in an order
    reshuffled every pass (seeded). `on_step(step, metrics)` sees every step's metrics. A fresh drafter's
    initial weights come from the global torch RNG (seed it first for a reproducible run)."""
    drafter = drafter if drafter is not None else Drafter(policy).to(next(policy.parameters()).device)
    trainer = DrafterTrainer(drafter, lr, weight_decay, max_tokens_per_micro_batch, grad_clip)
    batches = trainer.make_batches(policy_examples(policy, sequences, max_tokens_per_micro_batch))
    order_rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=order_rng).tolist()
        metrics = trainer.step(batches[order.pop()])
        if on_step is not None:
            on_step(step, metrics)
    return drafter
