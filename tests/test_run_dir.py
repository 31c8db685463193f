"""Issue 16 item 2: a run directory is never destroyed by another run. run.resume=auto (the default) continues
from the newest checkpoint that verifies; a fresh start refuses a directory that holds another run's checkpoints
or metrics (a one-line UserError naming the directory and the options) unless run.overwrite=true; a resume
whose newest checkpoint is corrupt falls back to the previous one."""
from __future__ import annotations

import json
import logging

import pytest

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config import load_config
from megatron_tlt.errors import UserError
from megatron_tlt.parallel import destroy_parallel
from megatron_tlt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["run.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=8", "data.num_examples=32", "data.eval_examples=4",
        "reward.num_workers=0", "run.tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=1", "optim.lr=1e-3", "run.save_every=1"]


def _train(run_dir, *extra):
    destroy_parallel()
    try:
        return train(load_config(None, [f"run.dir={run_dir}", *TINY, *extra]))
    finally:
        destroy_parallel()


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _markers(run_dir) -> dict:
    return {p.name: (p / "COMPLETE").read_text() for p in sorted((run_dir / "checkpoints").glob("step_*"))}


def test_a_fresh_run_refuses_another_runs_directory(tmp_path, capsys):
    run = tmp_path / "D"
    _train(run, "run.steps=3")
    assert _steps(run) == [0, 1, 2] and sorted(_markers(run)) == ["step_1", "step_2", "step_3"]
    before = (_markers(run), (run / "metrics.jsonl").read_text())

    with pytest.raises(UserError, match=rf"run directory {run} holds another run \(checkpoints step_3, step_2, step_1; "
                                        r"metrics.jsonl; response_lengths.jsonl\) and run.resume=false; set run.resume=true "
                                        r"\(or auto\) to continue it, run.overwrite=true to delete it and start over, or "
                                        r"choose another run.dir"):
        _train(run, "run.steps=2", "run.resume=false")
    with pytest.raises(UserError, match=rf"run directory {run} holds a run at step 3, past run.steps=2; set run.steps above 3"):
        _train(run, "run.steps=2")  # auto: the newest checkpoint is past the steps asked for
    capsys.readouterr()
    rc = cli_main(["train", f"run.dir={run}", *TINY, "run.steps=2", "run.resume=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"run directory {run} holds another run" in err
    assert (_markers(run), (run / "metrics.jsonl").read_text()) == before  # nothing was touched

    _train(run, "run.steps=3")  # auto: already complete -- resumes at step 3, trains nothing, keeps everything
    assert (_markers(run), (run / "metrics.jsonl").read_text()) == before

    _train(run, "run.steps=2", "run.overwrite=true")  # told to: the old run is deleted, a new one starts
    assert _steps(run) == [0, 1] and sorted(_markers(run)) == ["step_1", "step_2"]
    assert _markers(run)["step_1"] != before[0]["step_1"]


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    run = tmp_path / "D"
    _train(run, "run.steps=2")
    shard = max((run / "checkpoints" / "step_2" / "model").glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[100:116] = bytes(b ^ 0xFF for b in data[100:116])
    shard.write_bytes(bytes(data))
    _train(run, "run.steps=3", "run.resume=true")  # from step_1: steps 1 and 2 again, then 3
    assert _steps(run) == [0, 1, 2] and sorted(_markers(run)) == ["step_1", "step_2", "step_3"]
    assert (run / "checkpoints" / "skipped" / "step_2").is_dir()


def test_metrics_without_a_checkpoint_are_not_overwritten(tmp_path):
    run = tmp_path / "D"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.5}) + "\n")
    with pytest.raises(UserError, match=rf"run directory {run} holds another run \(metrics.jsonl\) but no checkpoint "
                                        r"to resume from; run.overwrite=true deletes it"):
        _train(run, "run.steps=1")
    with pytest.raises(UserError, match="no checkpoint that verifies"):
        _train(run, "run.steps=1", "run.resume=true")
    assert json.loads((run / "metrics.jsonl").read_text())["reward_mean"] == 0.5


def test_a_row_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, caplog):
    from megatron_tlt.metrics import METRICS_FILE, MetricsLogger

    rows = [json.dumps({"step": s, "reward_mean": 0.5}) for s in range(3)]
    (tmp_path / METRICS_FILE).write_text("\n".join(rows) + '\n{"step": 3, "rew')  # kill -9 mid-write
    with caplog.at_level(logging.WARNING), MetricsLogger(tmp_path, total_steps=5, start_step=2, tensorboard=False):
        pass
    assert [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [0, 1]
    assert "dropped 1 unreadable row(s) on resume (lines 4)" in caplog.text
