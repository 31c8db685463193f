"""Drafter training: a preemptible one-micro-batch trainer, evaluation, offline warm-up.

What: `DrafterTrainer.step` takes one optimizer step on one packed micro-batch (the unit TLT's online spot
training is preempted at); `evaluate_drafter` reports the loss parts and top-1 agreement without an update;
`train_drafter_offline` and `megatron-tlt train-drafter` warm a drafter up on policy samples before RL.

Why: TLT keeps the drafter aligned with a policy that RL keeps moving. The training signal is what the
policy computes anyway (`loss.drafter_loss` on `data.DrafterBatch`es), and a step is short enough to run
in the gaps of a long-tailed rollout: it is self-contained, so training can stop between any two steps.

Step. The loss is a sum over trained positions; a step divides it by its micro-batch's count
(`metrics["num_tokens"]`), so the gradient is that of the mean per trained position. AdamW updates the
drafter's own weights only (weight decay on matrices, never on norm weights or biases) after clipping to
`grad_clip`. Under TP every rank passes the same batch, and the gradient norm used for clipping is the
TP-global one, so replicated weights stay identical on all ranks.

How:

    examples = policy_examples(policy, sequences, max_tokens=4096)        # one packed no-grad forward
    trainer = DrafterTrainer(Drafter(policy), lr=1e-4, max_tokens_per_micro_batch=4096)
    for batch in trainer.make_batches(examples):
        metrics = trainer.step(batch)      # {"loss", "hidden_loss", "ce_loss", "top1", "num_tokens", ...}

    drafter = train_drafter_offline(policy, sequences, steps=500)          # the same, cycling over the data
    megatron-tlt train-drafter ...                                         # the same from the command line (cli/)
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.drafter.eagle3 import frequent_tokens
from megatron_tlt.drafter.data import DrafterBatch, DrafterExample, make_batches, policy_examples
from megatron_tlt.drafter.loss import CE_WEIGHT, HIDDEN_WEIGHT, TTT_HIDDEN_WEIGHT, TTT_STEPS, batch_loss
from megatron_tlt.drafter.model import Drafter, build_drafter
from megatron_tlt.parallel.grads import clip_grads_, global_grad_norm


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
        ttt_steps: int = TTT_STEPS,  # EAGLE-3: training-time test steps (loss.ttt_loss)
        ttt_hidden_weight: float = TTT_HIDDEN_WEIGHT,  # EAGLE-3: weight of ttt_loss's auxiliary hidden regression
    ):
        if max_tokens_per_micro_batch < 2:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 2, got {max_tokens_per_micro_batch}")
        self.drafter = drafter
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.grad_clip = grad_clip
        self.hidden_weight, self.ce_weight, self.ttt_steps = hidden_weight, ce_weight, ttt_steps
        self.ttt_hidden_weight = ttt_hidden_weight
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
        loss, metrics = batch_loss(self.drafter, b, ttt_steps=self.ttt_steps, ttt_hidden_weight=self.ttt_hidden_weight,
                                   hidden_weight=self.hidden_weight, ce_weight=self.ce_weight)
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
def evaluate_drafter(drafter: Drafter, batches: Sequence[DrafterBatch], ttt_steps: int = TTT_STEPS,
                     ttt_hidden_weight: float = TTT_HIDDEN_WEIGHT) -> dict[str, float]:
    """Loss parts and top-1 agreement over `batches`, weighted by trained positions (no update)."""
    device = next(drafter.parameters()).device
    totals: dict[str, float] = {}
    for batch in batches:
        b = batch.to(device)
        _, metrics = batch_loss(drafter, b, ttt_steps=ttt_steps, ttt_hidden_weight=ttt_hidden_weight)
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
    arch: str = "eagle3",
    ttt_steps: int = TTT_STEPS,
    ttt_hidden_weight: float = TTT_HIDDEN_WEIGHT,
    draft_vocab_size: Optional[int] = None,
) -> Drafter:
    """`drafter` (default: a fresh one of `arch` over `policy`) trained for `steps` trainer steps on the policy's hidden
    states over `sequences` (one packed forward, `policy_examples`), cycling over the micro-batches in an order
    reshuffled every pass (seeded). `on_step(step, metrics)` sees every step's metrics. `draft_vocab_size` (a fresh
    eagle3 drafter): its draft vocabulary, the most frequent tokens of `sequences` (`eagle3.frequent_tokens`). A fresh drafter's
    initial weights come from the global torch RNG (seed it first for a reproducible run)."""
    if drafter is None:
        vocab = None if draft_vocab_size is None else frequent_tokens(sequences, draft_vocab_size, policy.cfg.vocab_size)
        drafter = build_drafter(policy, arch, draft_vocab=vocab).to(next(policy.parameters()).device)
    trainer = DrafterTrainer(drafter, lr, weight_decay, max_tokens_per_micro_batch, grad_clip, ttt_steps=ttt_steps,
                             ttt_hidden_weight=ttt_hidden_weight)
    examples = policy_examples(policy, sequences, max_tokens_per_micro_batch, drafter.feature_layers)
    batches = trainer.make_batches(examples)
    order_rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=order_rng).tolist()
        metrics = trainer.step(batches[order.pop()])
        if on_step is not None:
            on_step(step, metrics)
    return drafter
