"""run.save_rollouts: every rolled-out sample of every step in RUN_DIR/rollouts/rank{R}.jsonl (2 DP ranks), named by
its prompt's dataset index and its index in the group; a resume drops the later steps' rows and writes them again."""
import json
import shutil
from collections import Counter

import pytest

from megatron_tlt.cli.demo import train_on_local_ranks
from megatron_tlt.config import load_config
from megatron_tlt.data.datasets import PromptSampler
from megatron_tlt.data.tokenizer import load_tokenizer
from megatron_tlt.step.setup import build_datasets

STEPS, PROMPTS, N = 4, 4, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(run_dir, *extra):
    return load_config(None, [
        f"run.dir={run_dir}", f"run.steps={STEPS}", f"run.prompts_per_step={PROMPTS}", f"rollout.n={N}",
        "rollout.max_new_tokens=8", "rollout.temperature=1.0", "data.num_examples=32", "data.eval_examples=4",
        "reward.num_workers=0", "run.tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=1", "run.save_every=2", "run.save_rollouts=true", *extra,
    ])


def _rows(run_dir) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (run_dir / "rollouts" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


def test_rollouts_hold_every_sample_and_resume_rewrites_later_steps(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir)
    train_on_local_ranks(cfg, 2)
    first = _rows(run_dir)

    # every sample of every step once, on the rank that rolled its group out (round-robin), with the drawn prompt
    train_ds, _ = build_datasets(cfg, load_tokenizer(run_dir / "tokenizer"))
    sampler = PromptSampler(len(train_ds), seed=cfg.run.seed)
    lengths = {row["step"]: row["lengths"] for row in map(json.loads, (run_dir / "response_lengths.jsonl").read_text().splitlines())}
    for step in range(STEPS):
        drawn = sampler.take(PROMPTS)
        rows = [(rank, row) for rank in (0, 1) for row in first[rank] if row["step"] == step]
        assert sorted((row["group"], row["sample"]) for _, row in rows) == [(g, k) for g in range(PROMPTS) for k in range(N)]
        assert all(rank == row["group"] % 2 and row["prompt"] == drawn[row["group"]] for rank, row in rows)
        # the tokens the update trained on: the same response lengths
        assert Counter(len(row["response_ids"]) for _, row in rows) == Counter(lengths[step])
        assert all(row["finish_reason"] in ("stop", "length") and isinstance(row["reward"], float) for _, row in rows)

    # resume after step 2: the rows of steps 0 and 1 are kept (marked here), those of steps 2 and 3 dropped and
    # rolled out again, to the same tokens (resume is bit-exact)
    for rank, rows in first.items():
        (run_dir / "rollouts" / f"rank{rank}.jsonl").write_text("".join(json.dumps({**row, "kept": 1}) + "\n" for row in rows))
    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    train_on_local_ranks(_cfg(run_dir, "run.resume=true"), 2)
    resumed = _rows(run_dir)
    assert all(("kept" in row) == (row["step"] < 2) for rows in resumed.values() for row in rows)
    assert {r: [{k: v for k, v in row.items() if k != "kept"} for row in rows] for r, rows in resumed.items()} == first
