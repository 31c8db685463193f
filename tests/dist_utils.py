"""Run a test body in real worker processes on the gloo backend (CPU), for parallelism-equivalence tests.

    def _worker(rank: int, world_size: int, seed: int) -> None:   # module-level, so it pickles
        ...  # torch.distributed is initialised; assert freely
    run_distributed(_worker, world_size=2, args=(0,))

Each worker gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in its environment, joins a gloo
process group (env://), runs `fn(rank, world_size, *args)` and destroys the group. If any worker
raises, the parent raises too, with the worker's traceback in the message.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tlt.parallel.state import free_port, set_local_rank_env


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, timeout_s: float) -> None:
    set_local_rank_env(rank, world_size, port)
    dist.init_process_group(
        "gloo", init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout_s: float = 120.0) -> None:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)` in a gloo group; raise if any fails.

    `timeout_s` bounds each collective, so a rank stuck in a collective fails instead of hanging the suite.
    """
    try:
        mp.spawn(_entry, args=(fn, world_size, free_port(), tuple(args), timeout_s), nprocs=world_size, join=True)
    except mp.ProcessRaisedException as exc:
        raise AssertionError(f"a distributed worker failed:\n{exc}") from None
