"""Supervised warm-up: next-token loss on the response tokens of (prompt, response) sequences, before RL.

The demo's tiny policy starts from random weights; a few hundred packed steps on the synthetic task's
worked solutions give it a held-out accuracy RL can then raise. Each step draws `batch_size` sequences
(the same draw on every DP rank, each rank packing its share), divides the summed loss by the step's
trained tokens over all ranks, sums gradients over DP and clips by the TP-global norm.

    losses = supervised_warmup(model, sequences, train_masks, ps, steps=300, lr=2e-3, batch_size=32,
                               micro_batch_tokens=4096, grad_clip=1.0, seed=0)
"""
from __future__ import annotations

import torch

from megatron_tlt.config.schema import OptimConfig
from megatron_tlt.data.packing import pack_sequences, plan_micro_batches
from megatron_tlt.models.packed import token_logprobs
from megatron_tlt.parallel.collectives import sum_over
from megatron_tlt.parallel.grads import clip_grads_, global_grad_norm, reduce_grads_
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.trainer.optimizer import build_optimizer
from megatron_tlt.trainer.schedule import head_chunk, run_micro_batches


def supervised_warmup(
    model, sequences: list[list[int]], train_masks: list[list[bool]], ps: ParallelState, *, steps: int, lr: float,
    batch_size: int, micro_batch_tokens: int, grad_clip: float, seed: int, distributed: bool = False,
) -> list[float]:
    """AdamW steps on the tokens where `train_masks` is True (e.g. the response). Returns each step's loss
    (mean per trained token, over the whole DP batch). `distributed`: the AdamW state sharded over DP (optim.distributed)."""
    opt = build_optimizer(model.parameters(), OptimConfig(lr=lr, weight_decay=0.0, distributed=distributed), ps)
    g = torch.Generator().manual_seed(seed)
    chunk = head_chunk(model)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(sequences), generator=g)[:batch_size].tolist()[ps.dp_rank :: ps.dp_size]
        opt.zero_grad(set_to_none=True)
        (num_tokens,) = sum_over(ps.dp_group, [sum(sum(train_masks[i][1:]) for i in idx)], ps.device)
        total = torch.zeros((), dtype=torch.float64)
        packs = [pack_sequences([sequences[idx[k]] for k in b], train_masks=[train_masks[idx[k]] for k in b])
                 for b in plan_micro_batches([len(sequences[i]) for i in idx], micro_batch_tokens)]

        def head(k: int, hidden: torch.Tensor) -> torch.Tensor:  # the last stage: pack k's summed token loss / num_tokens
            nonlocal total
            lp = token_logprobs(chunk, hidden, packs[k].targets)[0]  # [T]
            loss = -(lp * packs[k].loss_mask.to(lp.device)).sum() / num_tokens
            total += loss.detach().double().cpu()
            return loss

        run_micro_batches(model, packs, head, ps, backward=True)
        reduce_grads_(model, ps)
        clip_grads_(model.parameters(), grad_clip, global_grad_norm(model.parameters(), model.tp_group, ps.pp_group))
        opt.step()
        (loss,) = sum_over(ps.dp_group, [float(total)], ps.device)
        if ps.pp_size > 1:  # the loss is summed on the last stage only
            (loss,) = sum_over(ps.pp_group, [loss], ps.device)
        losses.append(loss)
    return losses
