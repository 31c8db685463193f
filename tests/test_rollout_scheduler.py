"""The long-tail-aware scheduler in a run (coordinator.*): groups placed by predicted makespan and admitted longest
first give the same samples as round-robin in order (2 DP ranks; scheduling is lossless), every group lands on one
rank once, the length predictions move the placement, and they survive a resume (the resumed steps are placed and
sampled as in the uninterrupted run)."""
import json
import shutil
from types import SimpleNamespace

import pytest

from test_save_rollouts import PROMPTS, STEPS, N, _cfg as tiny_run_config, _rows

from megatron_tlt.cli.demo import train_on_local_ranks
from megatron_tlt.config.schema import CoordinatorConfig
from megatron_tlt.coordinator.assignment import RolloutScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(run_dir, *extra):
    # test_save_rollouts' tiny 2-rank run, with 6 training prompts: each recurs every 1-2 steps, so the predictions
    # have a history; 2 KV slots per rank; lr 1e-12: the updates leave the fp32 weights as they are whatever rank
    # holds which sample (the gradient sums' order then cannot matter)
    return tiny_run_config(run_dir, "rollout.max_new_tokens=12", "data.num_examples=6", "optim.lr=1e-12",
                           "rollout.kv_cache_gb=0.0001", *extra)


def _samples(rows: dict[int, list[dict]]) -> dict[tuple, list[int]]:
    """(step, group, sample) -> response ids, whichever rank rolled it out (each exactly once)."""
    out = {}
    for rank_rows in rows.values():
        for row in rank_rows:
            key = (row["step"], row["group"], row["sample"])
            assert key not in out, f"{key} rolled out twice"
            out[key] = row["response_ids"]
    return out


def test_balanced_longest_first_is_lossless_and_its_predictions_resume(tmp_path):
    plain_dir, sched_dir = tmp_path / "round_robin", tmp_path / "balanced"
    train_on_local_ranks(_cfg(plain_dir), 2)
    sched = ("coordinator.assignment=balanced", "coordinator.admission=longest_first")
    train_on_local_ranks(_cfg(sched_dir, *sched), 2)
    plain, first = _rows(plain_dir), _rows(sched_dir)
    assert _samples(first) == _samples(plain)  # the same samples, token for token
    assert len(_samples(first)) == STEPS * PROMPTS * N
    placed = {(row["step"], row["group"]): rank for rank, rows in first.items() for row in rows}
    assert any(placed[(s, g)] != g % 2 for s in range(1, STEPS) for g in range(PROMPTS))  # predictions moved groups
    metrics = [json.loads(line) for line in (sched_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["sched_predicted_makespan"] > 0 and m["sched_actual_makespan"] > 0 and m["rollout_imbalance"] >= 1 for m in metrics)

    # resume after step 2: the placement of steps 2 and 3 needs the predictor of steps 0 and 1 (saved, restored)
    shutil.rmtree(sched_dir / "checkpoints" / "step_4")
    train_on_local_ranks(_cfg(sched_dir, *sched, "run.resume=true"), 2)
    assert _rows(sched_dir) == first  # each row on the same rank, in the same order, with the same tokens


def test_every_group_goes_to_one_rank_in_admission_order():
    cfg = CoordinatorConfig(assignment="balanced", admission="longest_first")
    ranks = [RolloutScheduler(cfg, SimpleNamespace(dp_size=3, dp_rank=r), slots=2, n=2, default_length=8.0) for r in range(3)]
    history = {10: [30, 2], 11: [5, 4], 12: [1, 1], 13: [40, 38], 14: [3, 9]}
    for s in ranks:
        for index, lengths in history.items():
            s.predictor.update(index, lengths)
    drawn = [10, 11, 12, 13, 14, 15]  # 15: never seen (the population's prediction)
    mine = [s.assign(drawn, first_group=100) for s in ranks]
    assert sorted(g for m in mine for g in m) == list(range(100, 106))
    assert all(m[g] == drawn[g - 100] for m in mine for g in m)
    for m, s in zip(mine, ranks):  # longest predicted first
        longest = [max(s.predictor.predict(i, 2)) for i in m.values()]
        assert longest == sorted(longest, reverse=True)
    plain = [RolloutScheduler(CoordinatorConfig(), SimpleNamespace(dp_size=3, dp_rank=r), 2, 2, 8.0).assign(drawn, 100) for r in range(3)]
    assert plain == [{100 + k: drawn[k] for k in range(6) if k % 3 == r} for r in range(3)]  # round-robin, in order
