"""Process groups, devices and seeds, set up and torn down in one place.

`init_parallel(cfg)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it, it starts a single-process group on an in-process store. The training layout TP x PP x DP
comes from `megatron.core.parallel_state` (order tp-dp-pp: TP innermost, so a TP group sits on one node;
PP outermost, so stages can span nodes), and the groups are handed to the model explicitly through the
returned `ParallelState`.

The rollout layout (`rollout_tp`, default the training TP) has no pipeline: every rollout replica holds the
whole model at rollout TP over `rollout_tp` consecutive ranks, and rollout DP = world / rollout TP.
`ps.rollout` is that layout as a `ParallelState` of its own (pp_size 1; its dp group is the rollout DP
group); when the two layouts coincide (PP = 1 and the same TP) it is `ps` itself.

    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    model = Policy(cfg, tp_group=ps.tp_group)
    ...
    destroy_parallel()
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_tlt.config.schema import ParallelConfig
from megatron_tlt.errors import LayoutError

log = logging.getLogger(__name__)


class RankCoords(NamedTuple):
    """Where a global rank sits in the training and in the rollout layout."""
    dp: int
    pp: int
    tp: int
    rollout_dp: int
    rollout_tp: int


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
    # the first and last pipeline stage of this rank's pipeline (tied embedding / LM head); None at PP = 1
    embedding_group: Optional[dist.ProcessGroup] = None
    rank_table: tuple["RankCoords", ...] = ()  # every global rank's coordinates, the same on every rank
    rollout: Optional["ParallelState"] = None  # the rollout layout (see the module docstring); set by init_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def same_layouts(self) -> bool:
        """Whether training and rollout share the layout (the engine can run on the training weights)."""
        return self.rollout is self


_STATE: Optional[ParallelState] = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent() -> None:
    """Make this process, when torch.multiprocessing started it, die with its launcher: on Linux the kernel kills
    it (SIGKILL) when the parent exits, however it exits, so a killed launcher never leaves ranks computing on as
    orphans; a parent already gone by now is an immediate exit. Elsewhere, and in a process nobody spawned, a
    no-op. (torch's spawn asks for SIGINT instead, which a launcher started in the background by a shell
    (`nohup ... &`) passes on ignored, so its ranks would live on.)"""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent.pid:
        raise SystemExit(f"the launcher (pid {parent.pid}) exited before this rank started")


def set_local_rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of a one-node job (rendezvous at 127.0.0.1:port), for
    processes started by hand (the demo, tests, benchmarks); such a rank also dies with its launcher
    (`exit_with_parent`)."""
    exit_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v is None else int(v)


def init_parallel(cfg: ParallelConfig = ParallelConfig(), rollout_tp: Optional[int] = None) -> ParallelState:
    """Initialise torch.distributed (if needed), megatron-core's training groups and the rollout layout's
    groups (`rollout_tp`, default the training TP); idempotent for the same layout."""
    global _STATE
    from megatron.core import parallel_state as mpu

    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    rollout_tp = rollout_tp or tp
    if _STATE is not None:
        if (_STATE.tp_size, _STATE.pp_size, _STATE.rollout.tp_size) != (tp, pp, rollout_tp):
            raise RuntimeError("init_parallel called again with a different layout; call destroy_parallel() first")
        return _STATE

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

    if world_size % (tp * pp):
        raise LayoutError(f"world size {world_size} is not divisible by tensor_parallel_size * pipeline_parallel_size = "
                         f"{tp} * {pp} = {tp * pp}")
    if world_size % rollout_tp:
        raise LayoutError(f"world size {world_size} is not divisible by rollout.tensor_parallel_size={rollout_tp}")
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    if max(tp, rollout_tp) > local_world:
        log.warning("a TP group (%d ranks) spans more than one node (%d ranks per node): TP all-reduces cross the network",
                    max(tp, rollout_tp), local_world)
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)

    state = ParallelState(
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
        embedding_group=mpu.get_embedding_group() if pp > 1 else None,
    )
    state.rollout = _rollout_layout(state, rollout_tp)
    table = [None] * world_size
    dist.all_gather_object(table, (state.dp_rank, state.pp_rank, state.tp_rank, state.rollout.dp_rank, state.rollout.tp_rank))
    state.rank_table = tuple(RankCoords(*t) for t in table)
    if state.rollout is not state:
        state.rollout.rank_table = state.rank_table
    _STATE = state
    if rank == 0:
        log.info("parallel: world=%d tp=%d pp=%d dp=%d, rollout tp=%d dp=%d, backend=%s device=%s", world_size, tp, pp,
                 state.dp_size, rollout_tp, state.rollout.dp_size, backend, device.type)
    return state


def _rollout_layout(ps: ParallelState, rollout_tp: int) -> ParallelState:
    """The rollout layout's state: TP groups of `rollout_tp` consecutive ranks, DP across them, no pipeline."""
    if ps.pp_size == 1 and rollout_tp == ps.tp_size:
        return ps
    world = ps.world_size
    tp_groups = [dist.new_group(list(range(k, k + rollout_tp))) for k in range(0, world, rollout_tp)]  # every rank creates every group
    dp_groups = [dist.new_group(list(range(t, world, rollout_tp))) for t in range(rollout_tp)]
    tp_rank, dp_rank = ps.rank % rollout_tp, ps.rank // rollout_tp
    rollout = ParallelState(
        rank=ps.rank, world_size=world, local_rank=ps.local_rank, device=ps.device,
        tp_size=rollout_tp, pp_size=1, dp_size=world // rollout_tp, tp_rank=tp_rank, pp_rank=0, dp_rank=dp_rank,
        tp_group=tp_groups[dp_rank], pp_group=None, dp_group=dp_groups[tp_rank],
    )
    rollout.rollout = rollout
    return rollout


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialised; call megatron_tlt.parallel.init_parallel() first")
    return _STATE


def destroy_parallel(keep_world: bool = False) -> None:
    """Tear down the layout's groups, and the default process group unless `keep_world` (then `init_parallel`
    can set up another layout over the same processes, e.g. in tests)."""
    global _STATE
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized() and not keep_world:
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
