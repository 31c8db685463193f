"""Work stealing between rollout replicas: a replica with free slots and an empty queue runs other replicas'
queued, not yet admitted requests, and sends the results back to the replica the trainer expects them on.

What: `StealingQueue` is the `rollout.types.SharedQueue` one rollout-DP replica's engine uses for one rollout
(`RolloutScheduler.shared_queue` builds it when `coordinator.steal` is on):

    shared = scheduler.shared_queue(str(rid), {group id: prompt ids of the whole draw}, engine.fits)
    completions = engine.generate(prompts, params, seed_ids=groups, shared=shared)   # rollout/engine.py

Why: the assignment is made from predictions, and a prompt's response lengths vary a lot from sample to sample;
once a replica's own queue is empty its free slots would idle while another replica still has requests waiting
for a slot. Moving a request changes nothing but where it runs: its samples depend only on its seed and
positions (rollout/sampling.py), so the rollout is the same, token for token, with stealing on or off.

How (the torch.distributed key-value store, not collectives: replicas are out of step here):
- Every replica knows every replica's queue without asking: the scheduler's assignment is computed identically
  on every rank, so `plan` = {DP rank: its group ids in admission order} and replica r's queue is
  [(g, j) for g in plan[r] for j in range(n)] (prompts the engine does not `fits` are never queued).
- A request (g, j) has one claim key `steal/{rid}/{g}/{j}`; `compare_set(key, "", rank)` is atomic in the store,
  so exactly one claimant wins and the key then names it. The owner claims the head of its queue as it admits;
  thieves claim from the tail, each keeping a cursor per victim. The owner's claims therefore form a prefix of its
  queue and the thieves' a suffix: a thief that meets the owner's claim knows that queue is drained and stops
  asking it; once every victim is drained `steal` costs nothing. A thief asks only while its own queue is empty
  and it has free slots, at most once per decode step: no busy-waiting.
- Results: a thief `set`s `steal/{rid}/{g}/{j}/out` (the pickled Completion) as soon as the request finishes;
  the owner, once its own loop is done, `wait`s for the keys of the requests it lost, asleep in a socket read,
  with a deadline (`timeout_s`): a thief that died or stalls gives a RuntimeError naming it, not a hang. No replica
  waits before its own loop is done, so two replicas that stole from each other cannot deadlock.
- TP > 1: TP rank 0 of the replica talks to the store and broadcasts each answer over the replica's TP group, so
  every TP rank admits the same requests in the same order.
"""
from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rollout import Completion

Key = tuple[int, int]  # (group id = the prompt's seed id, sample index)


class StealingQueue:
    """One rollout's shared queue on one replica (see the module docstring). `plan`: {DP rank: group ids in
    admission order}, identical on every rank; `prompts`: {group id: prompt ids} of every group in `plan`."""

    def __init__(self, rid: str, plan: dict[int, list[int]], prompts: dict[int, list[int]], n: int, fits: Callable[[list[int]], bool],
                 ps: ParallelState, store=None, timeout_s: float = 3600.0):
        self.rid, self.ps, self.prompts, self.timeout_s = rid, ps, prompts, timeout_s
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.me = str(ps.dp_rank)
        self._queues = {
            r: [(g, j) for g in gids if fits(prompts[g]) for j in range(n)]
            for r, gids in plan.items() if r != ps.dp_rank
        }
        self._cursor = {r: len(q) - 1 for r, q in self._queues.items()}  # the next tail index to try, per victim
        self._thief_of: dict[Key, str] = {}  # this replica's requests others won, and who

    def _key(self, key: Key) -> str:
        return f"steal/{self.rid}/{key[0]}/{key[1]}"

    def _try(self, key: Key) -> str:
        """Claim `key` for this replica unless someone has; returns the claimant's DP rank (as the store holds it)."""
        return self.store.compare_set(self._key(key), "", self.me).decode()

    def _from_leader(self, value):
        """TP rank 0's `value`, on every TP rank of the replica."""
        if self.ps.tp_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.ps.tp_group, group_src=0)
        return box[0]

    def claim(self, keys: list[Key]) -> list[bool]:
        won = None
        if self.ps.tp_rank == 0:
            won = []
            for key in keys:
                holder = self._try(key)
                won.append(holder == self.me)
                if holder != self.me:
                    self._thief_of[key] = holder
        return self._from_leader(won)

    def steal(self, limit: int) -> list[tuple[Key, list[int]]]:
        taken = None
        if self.ps.tp_rank == 0:
            taken = []
            # the victim with the most requests possibly left first
            for r in sorted(self._cursor, key=lambda r: (-self._cursor[r], r)):
                queue = self._queues[r]
                while len(taken) < limit and self._cursor[r] >= 0:
                    key = queue[self._cursor[r]]
                    holder = self._try(key)
                    if holder == str(r):  # the owner got here: the rest of its queue is its own
                        self._cursor[r] = -1
                        break
                    self._cursor[r] -= 1
                    if holder == self.me:
                        taken.append(key)
                if len(taken) == limit:
                    break
        taken = self._from_leader(taken)
        return [(key, self.prompts[key[0]]) for key in taken]

    def send(self, key: Key, completion: Completion) -> None:
        if self.ps.tp_rank == 0:
            self.store.set(self._key(key) + "/out", pickle.dumps(completion))

    def receive(self, keys: list[Key]) -> list[Completion]:
        out = None
        if self.ps.tp_rank == 0:
            names = [self._key(k) + "/out" for k in keys]
            try:
                self.store.wait(names, timedelta(seconds=self.timeout_s))
            except dist.DistStoreError as e:
                late = sorted({self._thief_of.get(k, "?") for k, name in zip(keys, names) if not self.store.check([name])})
                raise RuntimeError(
                    f"rollout {self.rid}: DP rank {self.me} waited {self.timeout_s:g} s for requests other replicas took "
                    f"(work stealing) and DP rank(s) {', '.join(late)} never sent them back: a replica died or is stuck"
                ) from e
            out = [pickle.loads(self.store.get(name)) for name in names]
        return self._from_leader(out)
