"""Spot training of the drafter on DP ranks whose rollout is done, stopped when the last one finishes.

What: `SpotTrainer(drafter_trainer, buffer, ps, store=None)` runs TLT's spot training around each rollout:

    spot.rollout_finished(rl_step)                  # this rank's share of the rollout is generated
    stats = spot.train_until_rollout_ends(rl_step)  # drafter steps on this rank's buffer shard, preemptible
    ...                                             # (or both at once: spot.spot_train(rl_step))
    metrics = spot.merge()                          # every rank: identical drafter weights and Adam state
    spot.add_to_buffer(rl_step, samples, hidden)    # after the policy update, from its own forward

Why: in a long-tailed rollout most DP ranks finish early and wait for the slowest. TLT spends that wait
training the drafter, which must never delay the rollout (DESIGN invariant 5): every rank leaves its loop
within one drafter step of the last replica finishing, and all ranks start the next rollout with the same
drafter.

How. Ranks are out of step while some still generate, so they coordinate through the torch.distributed
key-value store (the default group's, unless one is passed), not collectives:

- `rollout_finished`: the first rank of each DP replica (TP rank 0; PP is 1) does
  `store.add("tlt/{rl_step}/done", 1)`. The rank whose add returns dp_size raises the stop signal
  `tlt/{rl_step}/all_done`, whose value is its wall-clock time (time.time(); one machine or synced clocks).
- `train_until_rollout_ends`: before each step TP rank 0 decides STOP (the signal is up: one `store.check`
  round trip), WAIT (the buffer is empty) or STEP, and broadcasts the decision over the TP group, so every
  TP rank of a replica takes the same steps on the same micro-batches (identically seeded rngs). A step is
  one `DrafterTrainer.step`, so at most one step runs after the signal. WAIT blocks in
  `store.wait([all_done])`, asleep in a socket read, never spinning.
- `merge` (a collective over the DP group, called by every rank): the drafter weights AND the AdamW state
  (moments and step count) become their average over DP replicas weighted by the updates each took since
  the last merge; nothing changes when no replica took any. Averaging the Adam state too keeps every rank's
  optimizer identical, which the run checkpoint relies on (it stores one copy of the replicated state), and
  hands ranks that did not train the moments of those that did (the averaged step count may be fractional:
  bias correction only needs it approximately). For bit-identical results on every rank the
  weighted sum is reduced to DP rank 0 and broadcast from it (the same volume as one all-reduce), in fp32
  buckets of up to MERGE_BUCKET_BYTES (a few collectives instead of two per tensor; the transient memory
  is one bucket, not the drafter).

Measured per rank (`SpotStats`) and, by `merge`, per RL step over DP replicas: drafter_steps (updates, sum),
drafter_train_time_s (rank-seconds in drafter steps, sum), idle_rank_s (rank-seconds between a replica's
rollout end and the stop signal, sum), idle_rank_s_recovered (the part of the training time before the
signal, sum), stop_latency_s (signal -> out of the loop, max), merge_time_s (this rank).

A single DP replica is always the last to finish: its stop signal is up before it asks, so it takes no
step. Interleaving drafter steps with decoding on one replica is a separate policy, not done here.

A dead peer ends every rank in bounded time (`PeerWatchdog`, started by `step.tlt` for a TLT run of more
than one process): each rank's watchdog thread heartbeats through the rendezvous store (its own client
connection) every `interval_s` and watches one ring neighbour's heartbeat; a neighbour silent for
`drafter.peer_timeout_s`, or an unreachable store, raises a run-wide abort key that every watchdog polls,
and each rank then prints one line naming the dead rank and exits with `EXIT_PEER_LOST`, whatever phase
its main thread is in (a drafter step, a store wait, a collective). Detection takes at most
peer_timeout_s + 2 * interval_s. A rank that ends normally marks itself done first (`close`). Separately,
`train_until_rollout_ends` gives up with a RuntimeError when the stop signal is not up within
`drafter.max_wait_s` of this rank's rollout end (a live but stuck replica), whether it is training or
waiting.

`rl_step` names one rollout and must be unique per store for the life of the process group (its keys are a
few bytes and never deleted): the driver passes `str(coordinator.assignment.RolloutId(step, round))`.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_tlt.checkpoint.dcp import init_adam_state
from megatron_tlt.drafter.data import DrafterBuffer, from_trainer_output
from megatron_tlt.drafter.trainer import DrafterTrainer
from megatron_tlt.parallel.state import ParallelState

log = logging.getLogger(__name__)

STOP, WAIT, STEP = 0, 1, 2  # TP rank 0's decision before each step
MERGE_BUCKET_BYTES = 64 << 20  # fp32 bytes reduced per collective by `merge`
EXIT_PEER_LOST = 75  # the exit code of a rank that ends because a peer died


def store_lost_message(rank: int, e: Exception) -> str:
    """What a rank says when the rendezvous store stopped answering (`e`: the store client's error)."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"the rendezvous store is unreachable from rank {rank} ({type(e).__name__}: {first}): its host is presumed dead"


def buckets(tensors: Sequence[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors grouped so each group holds at most max_numel elements (a bigger tensor goes alone)."""
    groups, size = [], 0
    for t in tensors:
        if not groups or size + t.numel() > max_numel:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.numel()
    return groups


@dataclass
class SpotStats:
    """One rank's spot training over one rollout; `+` combines rollouts (sums, maxima of the max fields)."""

    steps: int = 0  # drafter updates (steps skipped for a non-finite loss or gradient do not count)
    train_time_s: float = 0.0  # wall time inside drafter steps
    idle_s: float = 0.0  # this rank's rollout end -> the stop signal
    idle_recovered_s: float = 0.0  # training time before the stop signal
    stop_latency_s: float = 0.0  # the stop signal -> out of the loop (max)
    max_step_time_s: float = 0.0  # the longest drafter step (max)

    def __add__(self, other: "SpotStats") -> "SpotStats":
        return SpotStats(
            self.steps + other.steps, self.train_time_s + other.train_time_s, self.idle_s + other.idle_s,
            self.idle_recovered_s + other.idle_recovered_s, max(self.stop_latency_s, other.stop_latency_s),
            max(self.max_step_time_s, other.max_step_time_s),
        )


class SpotTrainer:
    """Preemptible drafter training while other DP replicas still roll out (see the module docstring).

    `seed` seeds the micro-batch order: rollout `rl_step` on DP rank d draws with
    `random.Random(f"{seed}/{d}/{rl_step}")`, the same on the TP ranks of a replica. `max_wait_s` bounds the
    time from this rank's rollout end to the stop signal, training or waiting (RuntimeError past it), so a
    replica that is stuck cannot hold the others forever; a dead one is `PeerWatchdog`'s.
    """

    def __init__(self, drafter_trainer: DrafterTrainer, buffer: DrafterBuffer, ps: ParallelState,
                 store: Optional[dist.Store] = None, *, seed: int = 0, max_wait_s: float = 6 * 3600.0):
        self.trainer, self.buffer, self.ps = drafter_trainer, buffer, ps
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.seed, self.max_wait_s = seed, max_wait_s
        self._finished_at: dict[int, float] = {}  # rl_step -> this rank's rollout end (time.time())
        self._pending = SpotStats()  # since the last merge

    # ---- signalling ----
    def rollout_finished(self, rl_step: object) -> None:
        """This rank's rollout is done: count its replica; the last replica raises the stop signal."""
        self._finished_at[rl_step] = time.time()
        if self.ps.tp_rank == 0 and self.store.add(f"tlt/{rl_step}/done", 1) == self.ps.dp_size:
            self.store.set(f"tlt/{rl_step}/all_done", repr(time.time()))

    def _stop_time(self, rl_step: object) -> Optional[float]:
        """The stop signal's wall-clock time, or None while it is not up (one store round trip)."""
        key = f"tlt/{rl_step}/all_done"
        return float(self.store.get(key)) if self.store.check([key]) else None

    def _too_late(self, rl_step: object) -> RuntimeError:
        return RuntimeError(f"rollout {rl_step}: not every DP replica finished within drafter.max_wait_s={self.max_wait_s:g} s "
                            f"of this rank's rollout end (DP rank {self.ps.dp_rank}): a replica is stuck")

    def _wait_for_stop(self, rl_step: object) -> float:
        key = f"tlt/{rl_step}/all_done"
        left = self._finished_at[rl_step] + self.max_wait_s - time.time()
        try:
            self.store.wait([key], timedelta(seconds=max(left, 0.001)))
        except dist.DistNetworkError as e:
            raise self._store_lost(e) from e
        except dist.DistStoreError as e:
            raise self._too_late(rl_step) from e
        return float(self.store.get(key))

    def _store_lost(self, e: Exception) -> RuntimeError:
        return RuntimeError(store_lost_message(self.ps.rank, e) + ", the run stops")

    def _decide(self, rl_step: object) -> tuple[int, float]:
        """(STOP | WAIT | STEP, the stop signal's time or 0): decided by TP rank 0, the same on all TP ranks."""
        decision = torch.zeros(2, dtype=torch.float64)  # [action, stop time]
        if self.ps.tp_rank == 0:
            try:
                stop_time = self._stop_time(rl_step)
            except dist.DistNetworkError as e:
                raise self._store_lost(e) from e
            action = STOP if stop_time is not None else WAIT if self.buffer.num_examples == 0 else STEP
            decision = torch.tensor([action, stop_time or 0.0], dtype=torch.float64)
        if self.ps.tp_size > 1:
            shared = decision.to(self.ps.device)
            dist.broadcast(shared, group=self.ps.tp_group, group_src=0)
            decision = shared.cpu()
        return int(decision[0]), float(decision[1])

    # ---- training ----
    def train_until_rollout_ends(self, rl_step: object) -> SpotStats:
        """Drafter steps on this rank's buffer until every DP replica has finished rollout `rl_step`."""
        if rl_step not in self._finished_at:
            raise RuntimeError(f"call rollout_finished({rl_step}) before train_until_rollout_ends({rl_step})")
        stats = SpotStats()
        rng = random.Random(f"{self.seed}/{self.ps.dp_rank}/{rl_step}")
        batches = self.buffer.batches(self.trainer.max_tokens_per_micro_batch, rng)
        last_step_end = 0.0
        while True:
            action, stop_time = self._decide(rl_step)
            if action == WAIT:
                stop_time = self._wait_for_stop(rl_step)
            if action != STEP:
                break
            if time.time() - self._finished_at[rl_step] > self.max_wait_s:  # the same on every TP rank, within a step
                raise self._too_late(rl_step)
            start = time.time()
            metrics = self.trainer.step(next(batches))
            last_step_end = time.time()
            stats.steps += int(not metrics["skipped"])
            stats.train_time_s += last_step_end - start
            stats.max_step_time_s = max(stats.max_step_time_s, last_step_end - start)
        stats.stop_latency_s = max(0.0, time.time() - stop_time)
        stats.idle_s = max(0.0, stop_time - self._finished_at.pop(rl_step))
        # Only the last step can straddle the signal: the check after every earlier one found it down.
        stats.idle_recovered_s = max(0.0, stats.train_time_s - max(0.0, last_step_end - stop_time))
        self._pending += stats
        return stats

    def spot_train(self, rl_step: object) -> SpotStats:
        """`rollout_finished` then `train_until_rollout_ends`: call when this rank's rollout is done."""
        self.rollout_finished(rl_step)
        return self.train_until_rollout_ends(rl_step)

    def add_to_buffer(self, rl_step: int, samples: Sequence, hidden: dict[int, torch.Tensor]) -> None:
        """Buffer the hidden states of `PolicyTrainer.step(samples, ..., collect_hidden=True)` (this rank's share)."""
        self.buffer.add(rl_step, from_trainer_output(samples, hidden, self.trainer.drafter.cfg.hidden_size))

    # ---- merging ----
    def merge(self) -> dict[str, float]:
        """Average the drafter over DP, weighted by updates since the last merge (a collective) -> metrics."""
        t0 = time.perf_counter()
        stats, self._pending = self._pending, SpotStats()
        f64 = dict(dtype=torch.float64, device=self.ps.device)
        sums = torch.tensor([stats.steps, stats.train_time_s, stats.idle_s, stats.idle_recovered_s], **f64)
        latency = torch.tensor([stats.stop_latency_s], **f64)
        if self.ps.dp_size > 1:
            dist.all_reduce(sums, group=self.ps.dp_group)
            dist.all_reduce(latency, op=dist.ReduceOp.MAX, group=self.ps.dp_group)
        total_steps, train_s, idle_s, recovered_s = sums.tolist()
        if total_steps > 0 and self.ps.dp_size > 1:
            self._average(stats.steps / total_steps)
        self.trainer.steps += int(total_steps) - stats.steps  # the same count on every rank
        return {
            "drafter_steps": total_steps, "drafter_train_time_s": train_s, "idle_rank_s": idle_s,
            "idle_rank_s_recovered": recovered_s, "stop_latency_s": float(latency[0]), "merge_time_s": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def _average(self, weight: float) -> None:
        """Every trained parameter and its AdamW state := sum over DP of weight * value, from DP rank 0."""
        optimizer = self.trainer.optimizer
        init_adam_state(optimizer)  # a rank that never stepped contributes zeros (its weight is 0)
        tensors = [t for p in self.trainer.params for t in (p, *(optimizer.state[p][k] for k in sorted(optimizer.state[p])))]
        for group in buckets(tensors, MERGE_BUCKET_BYTES // 4):
            merged = torch.cat([t.to(self.ps.device, torch.float32).flatten() for t in group]) * weight
            dist.reduce(merged, group_dst=0, group=self.ps.dp_group)
            dist.broadcast(merged, group_src=0, group=self.ps.dp_group)
            for t, part in zip(group, merged.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))


class PeerWatchdog:
    """Ends this process when a peer rank dies (see the module docstring): heartbeat, ring watch, abort key.

        dog = PeerWatchdog(rank, world_size, timeout_s=60).start()   # every rank, at the same point of the run
        ...
        dog.close()                                                  # this rank ended normally

    `store` defaults to a new TCPStore client of the rendezvous (MASTER_ADDR:MASTER_PORT), so the heartbeat
    never queues behind the main thread's store calls. Keys live under `megatron_tlt/alive/{generation}/`,
    the generation counting the watchdogs this rank started, so a second run in the same process group
    starts clean. `on_lost(message)` defaults to printing the message and `os._exit(EXIT_PEER_LOST)`.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: Optional[dist.Store] = None,
                 interval_s: Optional[float] = None, on_lost=None):
        if world_size < 2 or not timeout_s > 0:
            raise ValueError(f"PeerWatchdog needs world_size >= 2 and timeout_s > 0, got {world_size} and {timeout_s}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.interval_s = interval_s if interval_s is not None else min(1.0, self.timeout_s / 4)
        self.store = store if store is not None else self._client()
        self.on_lost = on_lost or self._exit
        generation = self.store.add(f"megatron_tlt/alive/generation/{rank}", 1)
        self.prefix = f"megatron_tlt/alive/{generation}"
        self.neighbour = (rank + 1) % world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def _client(self) -> dist.Store:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=max(self.timeout_s, 5.0)), wait_for_workers=False)

    def start(self) -> "PeerWatchdog":
        self.store.add(f"{self.prefix}/{self.rank}", 1)
        self._thread.start()
        return self

    def close(self) -> None:
        """This rank is done (not a failure): its watcher stops watching it; the thread ends."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(f"{self.prefix}/{self.rank}/done", "1")
        except Exception:  # the store is gone at shutdown: nobody is left to watch us
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval_s + 1.0)

    def _exit(self, message: str) -> None:
        print(f"megatron-tlt: error: {message}; rank {self.rank} exits (code {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def _lost(self, message: str) -> None:
        log.critical(message)
        self._stop.set()
        self.on_lost(message)

    def _run(self) -> None:
        own, abort = f"{self.prefix}/{self.rank}", f"{self.prefix}/abort"
        other = f"{self.prefix}/{self.neighbour}"
        last_value, last_change = None, time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(own, 1)
                if self.store.check([abort]):
                    return self._lost(self.store.get(abort).decode())
                if self.store.check([f"{other}/done"]):
                    continue
                value = int(self.store.get(other)) if self.store.check([other]) else None
            except Exception as e:  # the store's host (a peer, or its agent) is gone
                if self._stop.is_set():
                    return
                return self._lost(store_lost_message(self.rank, e))
            now = time.monotonic()
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.timeout_s:
                message = (f"rank {self.neighbour} of {self.world_size} sent no heartbeat for {now - last_change:.1f} s "
                           f"(drafter.peer_timeout_s={self.timeout_s:g}): it is presumed dead, the run stops")
                try:
                    self.store.set(abort, message)
                except Exception:
                    pass
                return self._lost(message)
