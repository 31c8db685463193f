"""The policy's optimizer: AdamW built in one place, with a copy to undo one step.

`build_optimizer(params, optim_cfg, ps)` is the seam the distributed optimizer (`optim.distributed`) plugs
into; `snapshot` / `restore` copy and put back the parameters and the optimizer state around one
`optimizer.step()` (the trainer's rollback of a non-finite update).

    opt = build_optimizer(model.parameters(), cfg.optim, ps)
    saved = snapshot(opt); opt.step(); restore(opt, saved)   # as if the step never happened
"""
from __future__ import annotations

from typing import Iterable

import torch

from megatron_tlt.config.schema import OptimConfig
from megatron_tlt.parallel.state import ParallelState


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, ps: ParallelState) -> torch.optim.Optimizer:
    """AdamW over `params` with the config's hyper-parameters."""
    return torch.optim.AdamW(list(params), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


@torch.no_grad()
def snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """Copies of the parameters and the optimizer state, to undo one `optimizer.step()`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state}
    return [p.detach().clone() for p in params], state


@torch.no_grad()
def restore(optimizer: torch.optim.Optimizer, saved: tuple[list[torch.Tensor], dict]) -> None:
    """Put back what `snapshot` copied."""
    weights, state = saved
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p, w in zip(params, weights):
        p.copy_(w)
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)
