"""Reward functions by name, and a process pool that computes them with a per-call timeout.

A reward function scores one response against its example (the dataset row: at least "prompt" and
"answer", plus the task's fields, e.g. "numbers" and "target" for countdown):

    def my_reward(response: str, example: Mapping[str, Any]) -> float: ...

Built-ins: "math" (final answer equals example["answer"]), "countdown" (uses example["numbers"] and
example["target"]), "format" (a final answer is stated). A user function is named by its import
path, "my_pkg.my_mod:fn" or "my_pkg.my_mod.fn". Several terms make a weighted sum:

    reward_fn = build_reward_fn([{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}])
    with RewardPool(reward_fn, num_workers=4, timeout_s=10.0) as pool:
        rewards, stats = pool.compute(responses, examples)   # rewards in input order

Failures never stop the run: a call that raises, returns a non-finite number, kills its worker
or runs past `timeout_s` scores 0.0 and is counted in `RewardStats` (a TimeoutError it raises, e.g.
a verifier refusing an input too expensive to check, counts as a timeout); each batch with failures
logs one warning line that includes the first failure's message.

Why our own worker processes rather than `concurrent.futures.ProcessPoolExecutor`: an executor
cannot cancel a call that is already running, so one hung reward would hold a worker (and, at
shutdown, the whole pool) forever. Here each worker runs one call at a time over its own pipe, so
the pool knows which call each worker runs and since when; a worker past its deadline is killed
(SIGKILL, which also stops code stuck in C) and replaced, and only that call is lost. One pipe per
worker (no shared queue) means killing a worker can never leave a lock held that others need.

Why 'forkserver': workers must not be forked from the trainer, whose CUDA context, NCCL and data
loader threads do not survive fork; forkserver forks them from a small single-threaded server
instead, like 'spawn' does safety-wise, but a replacement worker after a timeout starts in
milliseconds instead of re-importing Python and the driver's modules (torch) each time.

`num_workers=0` computes rewards inline in the calling process, for tests and debugging: errors
still score 0.0 and are counted, but timeouts cannot be enforced (a hung call hangs the caller).
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import numbers
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

from megatron_tlt.errors import UserError
from megatron_tlt.rl.verifiers import countdown_reward, format_reward, math_reward

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, response: str, example: Mapping[str, Any]) -> float: ...


def math_reward_fn(response: str, example: Mapping[str, Any]) -> float:
    return math_reward(response, str(example["answer"]))


def countdown_reward_fn(response: str, example: Mapping[str, Any]) -> float:
    return countdown_reward(response, example["numbers"], int(example["target"]))


def format_reward_fn(response: str, example: Mapping[str, Any]) -> float:
    return format_reward(response)


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward_fn, "countdown": countdown_reward_fn, "format": format_reward_fn}


# --- specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardSpec:
    """One term of the reward: a built-in name or an import path, and its weight in the sum."""

    name: str
    weight: float = 1.0


def load_callable(path: str) -> Callable:
    """The object at import path "pkg.mod:attr" (or "pkg.mod.attr"); UserError if absent or not callable."""
    module_name, sep, attr_path = path.partition(":")
    if not sep:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise UserError(f"reward function {path!r}: expected an import path 'pkg.module:function' or 'pkg.module.function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or one that fails while importing
        raise UserError(f"reward function {path!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            owner = getattr(obj, "__name__", repr(obj))
            raise UserError(f"reward function {path!r}: {owner!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"reward function {path!r} is a {type(obj).__name__}, not callable")
    return obj


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or a user function by import path."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if "." in name or ":" in name:
        return load_callable(name)
    raise UserError(f"unknown reward {name!r}: use one of {', '.join(BUILTIN_REWARDS)} or an import path 'pkg.module:function'")


@dataclass(frozen=True)
class WeightedSum:
    """sum(weight * fn(response, example)): picklable when its functions are (module-level)."""

    terms: tuple[tuple[RewardFn, float], ...]

    def __call__(self, response: str, example: Mapping[str, Any]) -> float:
        return sum(weight * fn(response, example) for fn, weight in self.terms)


def _as_spec(spec: Union[RewardSpec, Mapping[str, Any]]) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    unknown = set(spec) - {f.name for f in fields(RewardSpec)}
    if unknown or "name" not in spec:
        raise UserError(f"reward spec {dict(spec)!r}: expected keys 'name' and optional 'weight'")
    return RewardSpec(name=str(spec["name"]), weight=float(spec.get("weight", 1.0)))


def build_reward_fn(specs: Sequence[Union[RewardSpec, Mapping[str, Any]]]) -> WeightedSum:
    """The weighted sum of the rewards in `specs` (RewardSpec or {"name": ..., "weight": ...} dicts)."""
    if not specs:
        raise UserError("no reward given: list at least one, e.g. [{name: math, weight: 1.0}]")
    resolved = [_as_spec(s) for s in specs]
    return WeightedSum(tuple((resolve_reward(s.name), s.weight) for s in resolved))


# --- one call ------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _call(fn: RewardFn, response: str, example: Mapping[str, Any]) -> tuple[float, Optional[str], bool]:
    """(reward, None, False), or (0.0, message, timed_out) if fn raised or returned something other than a
    finite number. A TimeoutError (a verifier giving up on an input too expensive to check, e.g.
    `verifiers.VerificationTimeout`) counts as a timeout, like a call the pool kills at its deadline."""
    try:
        value = fn(response, example)
    except TimeoutError as e:
        return 0.0, _describe(e), True
    except Exception as e:
        return 0.0, _describe(e), False
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value), None, False
    return 0.0, f"reward function returned {value!r}, not a finite number", False


# --- the pool ------------------------------------------------------------------------------------

_STARTUP_TIMEOUT_S = 120.0  # a worker that is not ready by then (its imports hang) is an error


def _worker_main(fn_bytes: bytes, conn: Connection) -> None:
    """Worker loop: unpickle the reward function, say ready, then answer (index, response, example) calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    try:
        fn = pickle.loads(fn_bytes)
    except Exception as e:
        conn.send(("load_error", _describe(e)))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the trainer is gone
            return
        if message is None:
            return
        index, response, example = message
        conn.send((index, *_call(fn, response, example)))


@dataclass
class RewardStats:
    """Counts for one batch (or, as `RewardPool.stats`, all batches); `time_s` is wall time."""

    num_calls: int = 0
    num_errors: int = 0  # raised, returned a non-number, or killed its worker
    num_timeouts: int = 0
    time_s: float = 0.0

    def __add__(self, other: RewardStats) -> RewardStats:
        return RewardStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class _Worker:
    """One worker process, its pipe, and the call it runs: (index, deadline) or None."""

    def __init__(self, ctx: mp.context.BaseContext, fn_bytes: bytes):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(fn_bytes, child_conn), daemon=True, name="reward-worker")
        self.process.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        self.started = time.monotonic()
        self.ready = False
        self.task: Optional[tuple[int, float]] = None

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self, timeout_s: float = 1.0) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already dead
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()
        self.conn.close()


class _Batch:
    """Results of one `compute` call as they arrive: rewards by index and the failures."""

    def __init__(self, n: int):
        self.rewards = [0.0] * n
        self.errors: dict[int, str] = {}
        self.timeouts: dict[int, str] = {}

    def first_failure(self) -> str:
        failures = {**self.errors, **self.timeouts}
        index = min(failures)
        return f"example {index}: {failures[index]}"


class RewardPool:
    """Computes rewards in worker processes, each call bounded by `timeout_s` (see the module docstring)."""

    def __init__(self, reward_fn: RewardFn, num_workers: int = 4, timeout_s: float = 10.0):
        if num_workers < 0 or timeout_s <= 0:
            raise UserError(f"RewardPool needs num_workers >= 0 and timeout_s > 0, got {num_workers} and {timeout_s}")
        self.reward_fn, self.num_workers, self.timeout_s = reward_fn, num_workers, timeout_s
        self.stats = RewardStats()  # totals over all batches
        self._workers: list[_Worker] = []
        if num_workers > 0:
            try:
                self._fn_bytes = pickle.dumps(reward_fn)
            except Exception as e:
                raise UserError(
                    f"reward function {reward_fn!r} cannot be sent to worker processes (define it at module level): {_describe(e)}"
                ) from e
            self._ctx = mp.get_context("forkserver")
            # The server imports the built-in rewards (sympy, math-verify: ~1 s) once, so a worker replaced
            # after a timeout starts in milliseconds; no effect if this process's server already runs.
            self._ctx.set_forkserver_preload(["megatron_tlt.rl.rewards"])
            self._workers = [_Worker(self._ctx, self._fn_bytes) for _ in range(num_workers)]

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (killing any that do not exit within a second). Idempotent."""
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def compute(self, responses: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> tuple[list[float], RewardStats]:
        """Rewards for (responses[i], examples[i]) in input order, and this batch's stats."""
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
        t0 = time.perf_counter()
        batch = _Batch(len(responses))
        if self.num_workers == 0:
            for i, (response, example) in enumerate(zip(responses, examples)):
                batch.rewards[i], error, timed_out = _call(self.reward_fn, response, example)
                if error is not None:
                    (batch.timeouts if timed_out else batch.errors)[i] = error
        else:
            if not self._workers:
                raise RuntimeError("RewardPool is closed")
            self._run(batch, responses, examples)
        stats = RewardStats(len(responses), len(batch.errors), len(batch.timeouts), time.perf_counter() - t0)
        self.stats = self.stats + stats
        if batch.errors or batch.timeouts:
            log.warning(
                "rewards: %d of %d calls failed and score 0 (%d errors, %d timeouts > %gs); first: %s",
                len(batch.errors) + len(batch.timeouts), len(responses), len(batch.errors), len(batch.timeouts),
                self.timeout_s, batch.first_failure(),
            )
        return batch.rewards, stats

    # The event loop: hand calls to idle workers, wait for a result, a death or the next deadline.

    def _run(self, batch: _Batch, responses: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> None:
        todo = deque(range(len(responses)))
        while todo or any(w.task for w in self._workers):
            for k in range(len(self._workers)):
                while todo and self._workers[k].ready and self._workers[k].task is None:
                    self._dispatch(k, todo.popleft(), responses, examples, batch)
            waitables = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
            readable = set(wait(waitables, self._wait_s()))
            for k, worker in enumerate(self._workers):
                if worker.conn in readable or worker.process.sentinel in readable:
                    self._receive(k, batch)
            self._enforce_deadlines(batch)

    def _dispatch(self, k: int, index: int, responses, examples, batch: _Batch) -> None:
        worker = self._workers[k]
        try:
            worker.conn.send((index, responses[index], examples[index]))
        except OSError:  # the worker died while idle
            batch.errors[index] = "reward worker died before the call"
            self._replace(k)
            return
        except Exception as e:  # the example cannot be pickled
            batch.errors[index] = f"cannot send the example to a worker: {_describe(e)}"
            return
        worker.task = (index, time.monotonic() + self.timeout_s)

    def _wait_s(self) -> float:
        deadlines = [w.task[1] if w.task else w.started + _STARTUP_TIMEOUT_S for w in self._workers if w.task or not w.ready]
        return max(0.0, min(deadlines) - time.monotonic())

    def _receive(self, k: int, batch: _Batch) -> None:
        worker = self._workers[k]
        try:
            message = worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            message = None
        if message is None:  # the process exited
            self._on_death(k, batch)
        elif message[0] == "ready":
            worker.ready = True
        elif message[0] == "load_error":
            self.close()
            raise UserError(f"reward function failed to load in a worker process: {message[1]}")
        else:
            index, reward, error, timed_out = message
            batch.rewards[index] = reward
            if error is not None:
                (batch.timeouts if timed_out else batch.errors)[index] = error
            worker.task = None

    def _on_death(self, k: int, batch: _Batch) -> None:
        worker = self._workers[k]
        worker.process.join(1.0)
        if not worker.ready:
            self.close()
            raise UserError(f"a reward worker exited during start-up (exit code {worker.process.exitcode})")
        if worker.task:
            batch.errors[worker.task[0]] = f"reward worker died (exit code {worker.process.exitcode})"
        self._replace(k)

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for k, worker in enumerate(self._workers):
            if worker.task and now >= worker.task[1]:
                batch.timeouts[worker.task[0]] = f"timed out after {self.timeout_s:g}s"
                self._replace(k)
            elif not worker.ready and now >= worker.started + _STARTUP_TIMEOUT_S:
                self.close()
                raise UserError(f"a reward worker did not start within {_STARTUP_TIMEOUT_S:g}s (does importing the reward hang?)")

    def _replace(self, k: int) -> None:
        self._workers[k].kill()
        self._workers[k] = _Worker(self._ctx, self._fn_bytes)
