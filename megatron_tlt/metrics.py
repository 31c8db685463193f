"""Per-step metrics: `RUN_DIR/metrics.jsonl` (one JSON object per step), TensorBoard, wandb, progress bar.

Only the main rank writes. On resume the jsonl keeps the steps before the resumed one and drops
later ones (they belong to the run that crashed), so a resumed run's log reads as one run.
Response lengths of every step go to `RUN_DIR/response_lengths.jsonl` for the long-tail plot.

With `run.save_rollouts`, every rollout-DP rank also appends the samples it rolled out to
`RUN_DIR/rollouts/rank{R}.jsonl` (`RolloutLog`, truncated on resume the same way): one JSON object per
sample, named by step, group id, dataset index and index within its group, so runs can be compared
sample by sample (e.g. SD on vs off, which sample the same tokens).

Always, every rollout-DP rank (TP rank 0) appends one row per RL step to `RUN_DIR/timeline/rank{R}.jsonl`
(`TimelineLog`, truncated on resume the same way): `{"step": s, "step_s": this rank's step time, "spans":
[[name, start_s, end_s], ...]}` in seconds from this rank's step start, for `megatron-tlt plot`'s timeline.png.
Each rank's times count from its own step start and the plot aligns the ranks there, on one machine or many.
The ranks leave a step together (its metrics' all-reduce), start the next one apart by what a rank does alone in
between (the main rank's logging and checkpoint writing: milliseconds, usually), and meet again just before each
rollout (`num_groups`' sum over DP), so the rollout spans start together to within a collective's latency.

    with MetricsLogger(run_dir, total_steps=100, start_step=0, enabled=ps.is_main) as logger:
        logger.log(step, {"reward_mean": 0.3, ...}, response_lengths=[...])
    rollouts = RolloutLog(run_dir, rps.dp_rank, start_step=0, enabled=cfg.run.save_rollouts and rps.tp_rank == 0)
    rollouts.write(step, samples, {group id: dataset index})
    timeline = TimelineLog(run_dir, rps.dp_rank, start_step=0, enabled=rps.tp_rank == 0)
    timeline.start(time.perf_counter())         # at the step's start
    with timeline.span("rollout"): ...
    timeline.write(step, step_s)
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LENGTHS_FILE = "response_lengths.jsonl"
ROLLOUTS_DIR = "rollouts"
TIMELINE_DIR = "timeline"


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """mean / p50 / p90 / max of response lengths (nearest-rank percentiles)."""
    if not lengths:
        return {"response_len_mean": 0.0, "response_len_p50": 0.0, "response_len_p90": 0.0, "response_len_max": 0.0}
    xs = sorted(lengths)

    def pct(q: float) -> float:
        return float(xs[max(0, math.ceil(q * len(xs)) - 1)])

    return {
        "response_len_mean": sum(xs) / len(xs),
        "response_len_p50": pct(0.5),
        "response_len_p90": pct(0.9),
        "response_len_max": float(xs[-1]),
    }


def _truncate_from(path: Path, step: int) -> None:
    """Keep the rows of steps before `step`. A row that is not a JSON object with a step (a line cut short by
    a crash mid-write, say) is dropped with one warning naming its line numbers."""
    if not path.is_file():
        return
    kept, bad = [], []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            bad.append(line_no)
            continue
        if row_step < step:
            kept.append(line)
    if bad:
        log.warning("%s: dropped %d unreadable row(s) on resume (lines %s)", path, len(bad), ", ".join(map(str, bad[:10])))
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, run_dir, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, LENGTHS_FILE):
            _truncate_from(self.run_dir / name, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step)
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", METRICS_FILE)
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config, resume="allow")
            except ImportError:
                log.warning("run.wandb_project is set but wandb is not installed: not logging to wandb")
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="rl steps", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], response_lengths: Optional[Sequence[int]] = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if response_lengths is not None:
            with open(self.run_dir / LENGTHS_FILE, "a") as f:
                f.write(json.dumps({"step": step, "lengths": list(map(int, response_lengths))}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        self._bar.update(1)
        shown = {k: metrics[k] for k in ("reward_mean", "response_len_mean", "accept_len", "step_time_s") if k in metrics}
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def close(self) -> None:
        for h in (self._bar, self._tb):
            if h is not None:
                h.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RolloutLog:
    """Appends this rank's rolled-out samples (`rl.sample.Sample`s, after scoring) to
    `RUN_DIR/rollouts/rank{R}.jsonl`; on resume it first drops the rows of steps >= `start_step`."""

    def __init__(self, run_dir, rank: int, start_step: int = 0, enabled: bool = True):
        self.path = Path(run_dir) / ROLLOUTS_DIR / f"rank{rank}.jsonl" if enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_from(self.path, start_step)

    def write(self, step: int, samples, dataset_index: dict[int, int]) -> None:
        """One row per sample. `samples` come as the rollout made them (a group's samples together, in order),
        `dataset_index` maps their group ids to the prompts' dataset indices."""
        if self.path is None:
            return
        seen: dict[int, int] = {}
        rows = []
        for s in samples:
            k = seen[s.group] = seen.get(s.group, -1) + 1
            rows.append(json.dumps({
                "step": step, "group": s.group, "prompt": dataset_index[s.group], "sample": k, "response_ids": s.response_ids,
                "reward": s.reward, "finish_reason": s.finish_reason,
            }))
        with open(self.path, "a") as f:
            f.write("".join(row + "\n" for row in rows))


class TimelineLog:
    """Appends this rank's spans of each RL step (named stages: rollout, reward, drafter, merge, update; the gaps
    are everything else) to `RUN_DIR/timeline/rank{R}.jsonl`; on resume it first drops the rows of steps >=
    `start_step`. Without online drafter training the drafter and merge spans time the hooks' no-ops (microseconds).
    Disabled, `span` still runs its block and records nothing."""

    def __init__(self, run_dir, rank: int, start_step: int = 0, enabled: bool = True):
        self.path = Path(run_dir) / TIMELINE_DIR / f"rank{rank}.jsonl" if enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_from(self.path, start_step)
        self._t0, self._spans = 0.0, []

    def start(self, t0: float) -> None:
        """A new step began at `t0` (time.perf_counter())."""
        self._t0, self._spans = t0, []

    @contextmanager
    def span(self, name: str):
        """Times the block as one span of the current step (also when it raises)."""
        begin = time.perf_counter() - self._t0
        try:
            yield
        finally:
            self._spans.append([name, begin, time.perf_counter() - self._t0])

    def write(self, step: int, step_s: float) -> None:
        """The current step's row; `step_s`: its time on this rank (the metrics' step_time_s on the main rank)."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "step_s": step_s, "spans": self._spans}) + "\n")


def read_jsonl(path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
