"""`megatron-tlt plot RUN_DIR`: PNGs of a run from its metrics.jsonl and response_lengths.jsonl.

- reward.png        reward mean (and held-out accuracy when evaluated) per step
- lengths.png       response-length distribution per step (box plots: the long tail)
- time.png          time breakdown per step (rollout / reward / train / other)
"""
from __future__ import annotations

from pathlib import Path

from megatron_tlt.errors import UserError
from megatron_tlt.metrics import LENGTHS_FILE, METRICS_FILE, read_jsonl


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
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
