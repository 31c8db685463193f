"""Process groups, devices and seeds, set up and torn down in one place.

`init_parallel(cfg)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it, it starts a single-process group on an in-process store. The TP x PP x DP layout comes
from `megatron.core.parallel_state` (TP innermost, so a TP group sits on one node), and the groups
are handed to the model explicitly through the returned `ParallelState`.

    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    model = Policy(cfg, tp_group=ps.tp_group)
    ...
    destroy_parallel()
"""
from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tlt.config.schema import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class ParallelState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE: Optional[ParallelState] = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of a one-node job (rendezvous at 127.0.0.1:port), for
    processes started by hand (the demo, tests)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v is None else int(v)


def init_parallel(cfg: ParallelConfig = ParallelConfig()) -> ParallelState:
    """Initialise torch.distributed (if needed) and megatron-core's groups; idempotent for the same layout."""
    global _STATE
    from megatron.core import parallel_state as mpu

    if _STATE is not None:
        if (_STATE.tp_size, _STATE.pp_size) != (cfg.tensor_parallel_size, cfg.pipeline_parallel_size):
            raise RuntimeError("init_parallel called again with a different layout; call destroy_parallel() first")
        return _STATE
    if cfg.pipeline_parallel_size != 1:
        raise NotImplementedError("pipeline parallelism is not implemented yet (parallel.pipeline_parallel_size must be 1)")

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    world_size, rank = dist.get_world_size(), dist.get_rank()

    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tensor_parallel_size*pipeline_parallel_size={tp * pp}")
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    _STATE = ParallelState(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp_size=tp,
        pp_size=pp,
        dp_size=world_size // (tp * pp),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
    )
    if rank == 0:
        log.info("parallel: world=%d tp=%d pp=%d dp=%d backend=%s device=%s", world_size, tp, pp, _STATE.dp_size, backend, device.type)
    return _STATE


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised; call megatron_tlt.parallel.init_parallel() first")
    return _STATE


def destroy_parallel() -> None:
    global _STATE
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = None


def set_seed(seed: int) -> None:
    """Seed every RNG the same way on every rank (weights are initialised full, then sharded)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
