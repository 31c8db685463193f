"""Run a test body in real worker processes on the gloo backend (CPU), for parallelism-equivalence tests.

    def _worker(rank: int, world_size: int, seed: int) -> None:   # module-level, so it pickles
        ...  # torch.distributed is initialised; assert freely
    run_distributed(_worker, world_size=2, args=(0,))

Each worker gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in its environment, joins a gloo
process group (env://), runs `fn(rank, world_size, *args)` and destroys the group. If any worker
raises, the parent raises too, with the worker's traceback in the message.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
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
