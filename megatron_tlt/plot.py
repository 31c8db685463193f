"""`megatron-tlt plot RUN_DIR`: PNGs of a run from its metrics.jsonl and response_lengths.jsonl.

- reward.png        reward mean (and held-out accuracy when evaluated) per step
- lengths.png       response-length distribution per step (box plots: the long tail)
- time.png          time breakdown per step (rollout / reward / train / other)
- timeline.png      where each rank's step time went (RUN_DIR/timeline/, `metrics.TimelineLog`): one bar per
                    rank, a segment per span (rollout, reward, drafter training or waiting, merge, update) and
                    gray for the rest (idle, waiting in collectives, advantages, the exchange), seconds from
                    each rank's own step start. Two steps at most: the one whose ranks' rollout times differ
                    most (the long tail that TLT fills) and the last one.
"""
from __future__ import annotations

from pathlib import Path

from megatron_tlt.errors import UserError
from megatron_tlt.metrics import LENGTHS_FILE, METRICS_FILE, TIMELINE_DIR, read_jsonl


def plot_run(run_dir) -> list[Path]:
    run = Path(run_dir)
    rows = read_jsonl(run / METRICS_FILE)
    if not rows:
        raise UserError(f"no {METRICS_FILE} with any step in {run}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.get("reward_mean", float("nan")) for r in rows], marker="o", label="reward mean")
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if evals:
        ax.plot(*zip(*evals), marker="s", label="held-out accuracy")
    ax.set_xlabel("RL step")
    ax.set_title("reward")
    ax.legend()
    written.append(_save(fig, run / "reward.png"))

    lengths = read_jsonl(run / LENGTHS_FILE)
    if lengths:
        fig, ax = plt.subplots(figsize=(max(7, len(lengths) * 0.35), 4))
        ax.boxplot([r["lengths"] or [0] for r in lengths], positions=[r["step"] for r in lengths], whis=(0, 100))
        ax.set_xlabel("RL step")
        ax.set_ylabel("response tokens")
        ax.set_title("response length per step (whiskers: min-max)")
        written.append(_save(fig, run / "lengths.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    parts = ["rollout_time_s", "reward_time_s", "train_time_s"]
    bottom = [0.0] * len(rows)
    for key in parts:
        vals = [r.get(key, 0.0) for r in rows]
        ax.bar(steps, vals, bottom=bottom, label=key.removesuffix("_time_s"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [max(r.get("step_time_s", 0.0) - b, 0.0) for r, b in zip(rows, bottom)]
    ax.bar(steps, other, bottom=bottom, label="other")
    ax.set_xlabel("RL step")
    ax.set_ylabel("seconds")
    ax.set_title("time per step")
    ax.legend()
    written.append(_save(fig, run / "time.png"))

    timelines = {int(p.stem.removeprefix("rank")): {r["step"]: r for r in read_jsonl(p)}
                 for p in (run / TIMELINE_DIR).glob("rank*.jsonl")}
    if any(timelines.values()):
        written.append(_save(_timeline_figure(plt, timelines), run / "timeline.png"))
    return written


# span name -> (color, legend label); the gray background is the rest of the rank's step
SPANS = {
    "rollout": ("tab:blue", "rollout"),
    "reward": ("tab:orange", "reward"),
    "drafter": ("tab:green", "drafter training / waiting for the slowest rank"),
    "merge": ("tab:purple", "drafter merge"),
    "update": ("tab:red", "policy update"),
}


def _timeline_figure(plt, timelines: dict[int, dict[int, dict]]):
    """`timelines`: {rank: {step: TimelineLog row}} -> the figure of timeline.png (see the module docstring)."""
    from matplotlib.patches import Patch

    ranks = sorted(timelines)
    steps = sorted(set().union(*timelines.values()))

    def rollout_spread(step: int) -> float:  # max - min over ranks of the step's rollout seconds
        per_rank = [sum(b - a for name, a, b in t[step]["spans"] if name == "rollout")
                    for t in timelines.values() if step in t]
        return max(per_rank) - min(per_rank)

    widest = max(steps, key=rollout_spread)
    shown = [(steps[-1], "last step")]
    if widest != steps[-1] and rollout_spread(widest) > 0:
        shown.insert(0, (widest, f"largest rollout imbalance across ranks: {rollout_spread(widest):.2f}s"))
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.8 + len(shown) * (1.3 + 0.3 * len(ranks))), squeeze=False)
    for ax, (step, why) in zip(axes[:, 0], shown):
        for y, rank in enumerate(ranks):
            row = timelines[rank].get(step)
            if row is None:  # this rank did not log the step (it crashed, say)
                continue
            ax.barh(y, row["step_s"], color="0.88")
            for name, a, b in row["spans"]:
                ax.barh(y, b - a, left=a, color=SPANS[name][0])
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
        ax.invert_yaxis()
        ax.set_xlabel("seconds from the rank's step start")
        ax.set_title(f"RL step {step} ({why})")
    handles = [Patch(color=c, label=label) for c, label in SPANS.values()]
    handles.append(Patch(color="0.88", label="other (idle, collectives)"))
    axes[-1, 0].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize="small",
                       frameon=False)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
