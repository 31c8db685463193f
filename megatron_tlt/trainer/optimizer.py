"""The policy's optimizer: AdamW built in one place, plain or sharded over DP, with a copy to undo one step.

`build_optimizer(params, optim_cfg, ps)` is torch's AdamW, or with `optim.distributed=true` torch's
`ZeroRedundancyOptimizer` over AdamW on the data-parallel group `ps.dp_group` (ZeRO-1, what Megatron calls the
distributed optimizer). ZeRO gives each DP rank whole parameters to own (largest first, each to the rank with
the fewest elements so far: the same partition on every DP rank, and on every TP rank since TP shards have
equal shapes); `step()` runs AdamW on the owned parameters only, so only their moments exist on that rank, and
then each owner broadcasts its updated parameters to the group. The math per parameter is AdamW's: DP=2
sharded equals DP=1 plain (tests/test_distributed_optimizer.py).

What is sharded: the AdamW moments, 8 of the 16 bytes of an fp32 parameter, now about 8 / DP (balanced to
whole parameters: the largest, e.g. the embedding, bounds how even it gets; Megatron splits flat buffers
exactly). The parameters are the master weights (model.params_dtype=float32 by default; bf16 is autocast on
GPU), so they stay replicated, and so do the gradients: ZeRO-1, not ZeRO-2/3. With model.params_dtype=bfloat16
neither path keeps an fp32 master copy (AdamW's moments are bf16 too, as in the plain optimizer).

Communication, honestly: the trainer all-reduces the full gradients over DP (`parallel.grads.all_reduce_grads_`)
and clips them by the global norm before `step()`; ZeRO reads only its owned gradients and broadcasts the
parameters (the all-gather). Megatron reduce-scatters instead, moving each rank's gradient bytes once rather
than twice and freeing the gradients it does not own; that needs the trainer to reduce each gradient to its
owner only and take the clipping norm from the owned gradients summed over DP. It is not built.

Checkpoints and rollback see only this rank's shard. `checkpoint.dcp.optimizer_state` / `init_adam_state` use
`local_optimizer(opt)`, the state of the parameters this rank owns, keyed `<param name>/<key>` as full logical
tensors: each rank saves its shard, and a run checkpoint loads at another DP size (or TP degree), sharded or
plain. `snapshot` / `restore` copy and put back the parameters (replicated: every rank copies all) and this
rank's optimizer state around one `optimizer.step()`, the trainer's rollback of a non-finite update (every rank
decides alike). A step size that overflows the parameter dtype (torch raises) depends only on lr and the step
count, so every rank's local step raises it before the broadcast: no rank is left waiting in it.

    opt = build_optimizer(model.parameters(), cfg.optim, ps)
    saved = snapshot(opt); opt.step(); restore(opt, saved)   # as if the step never happened
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from megatron_tlt.checkpoint.dcp import local_optimizer
from megatron_tlt.config.schema import OptimConfig
from megatron_tlt.parallel.state import ParallelState


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, ps: ParallelState) -> torch.optim.Optimizer:
    """AdamW over `params` with the config's hyper-parameters; its state sharded over `ps.dp_group` with
    `optim.distributed`."""
    hyper = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.distributed:
        return ZeroRedundancyOptimizer(list(params), torch.optim.AdamW, process_group=ps.dp_group, **hyper)
    return torch.optim.AdamW(list(params), **hyper)


@torch.no_grad()
def snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """Copies of the parameters and this rank's optimizer state, to undo one `optimizer.step()`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    local = local_optimizer(optimizer)
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in local.state[p].items()}
             for g in local.param_groups for p in g["params"] if p in local.state}
    return [p.detach().clone() for p in params], state


@torch.no_grad()
def restore(optimizer: torch.optim.Optimizer, saved: tuple[list[torch.Tensor], dict]) -> None:
    """Put back what `snapshot` copied."""
    weights, state = saved
    for p, w in zip((p for g in optimizer.param_groups for p in g["params"]), weights):
        p.copy_(w)
    local = local_optimizer(optimizer)
    for p in (p for g in local.param_groups for p in g["params"]):
        if p in state:
            local.state[p] = state[p]
        else:
            local.state.pop(p, None)
