"""RUN_DIR/timeline/rank{R}.jsonl (metrics.TimelineLog): in a 2-DP-rank TLT run one row per step and rank, its spans
ordered, disjoint and within the step, and timeline.png; a resume (one rank, in this process: cheap) drops the later
steps' rows and writes them again."""
import json
import shutil

import pytest

from megatron_tlt.cli.demo import train_on_local_ranks
from megatron_tlt.config import load_config
from megatron_tlt.metrics import TimelineLog
from megatron_tlt.parallel import destroy_parallel
from megatron_tlt.plot import plot_run
from megatron_tlt.train import train

STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run.dir={run_dir}", f"run.steps={STEPS}", "run.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=8",
        "rollout.temperature=1.0", "data.num_examples=32", "data.eval_examples=4", "reward.num_workers=0",
        "run.tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
        *extra,
    ])


def _rows(run_dir, ranks=(0, 1)) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (run_dir / "timeline" / f"rank{r}.jsonl").read_text().splitlines()] for r in ranks}


def test_tlt_timeline_and_plot(tmp_path):
    run_dir = tmp_path / "run"
    train_on_local_ranks(_cfg(run_dir, "rollout.spec=adaptive", "drafter.online=true", "drafter.micro_batch_tokens=64",
                              "drafter.warmup_steps=2"), 2)
    first = _rows(run_dir)
    step_time = {m["step"]: m["step_time_s"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for rank, rows in first.items():
        assert [row["step"] for row in rows] == list(range(STEPS))
        for row in rows:
            names = [name for name, _, _ in row["spans"]]
            # one rollout round: its stages in the loop's order
            assert names == ["rollout", "reward", "drafter", "merge", "update"], names
            ends = [0.0] + [t for _, a, b in row["spans"] for t in (a, b)] + [row["step_s"]]
            assert ends == sorted(ends)  # each span after the previous one, all within this rank's step
            assert all(b > a for _, a, b in row["spans"])
    # the main rank's step time is the logged one
    assert {row["step"]: row["step_s"] for row in first[0]} == step_time

    assert {p.name for p in plot_run(run_dir)} == {"reward.png", "lengths.png", "time.png", "timeline.png"}


def test_resume_rewrites_later_steps(tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, "run.save_every=1"))
    # resume after step 1: the row of step 0 is kept (marked here), those of steps 1 and 2 dropped and written again
    rows = _rows(run_dir, ranks=(0,))[0]
    (run_dir / "timeline" / "rank0.jsonl").write_text("".join(json.dumps({**row, "kept": 1}) + "\n" for row in rows))
    for done in (2, 3):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{done}")
    destroy_parallel()
    train(_cfg(run_dir, "run.save_every=1", "run.resume=true"))
    assert [(row["step"], "kept" in row) for row in _rows(run_dir, ranks=(0,))[0]] == [(0, True), (1, False), (2, False)]


def test_disabled_timeline_runs_its_spans_and_writes_nothing(tmp_path):
    timeline = TimelineLog(tmp_path, rank=1, enabled=False)
    timeline.start(0.0)
    ran = []
    with timeline.span("rollout"):
        ran.append(1)
    timeline.write(0, 1.0)
    assert ran == [1] and not (tmp_path / "timeline").exists()
