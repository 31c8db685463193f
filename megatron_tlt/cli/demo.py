"""`megatron-tlt demo`: the whole RL pipeline with TLT on CPU in a few minutes, with no downloads.

It starts two data-parallel ranks on this machine (gloo), builds a tokenizer and a small policy (the
settings below on top of the schema defaults), warms the policy up with a short supervised phase on
the built-in arithmetic task and an EAGLE drafter on the policy's own samples, measures greedy
held-out accuracy, and runs GRPO steps with speculative rollouts (adaptive draft selector) while the
rank that finishes its rollout first trains the drafter until the other is done (TLT). It prints
accuracy before and after and the drafter's mean accepted length, checkpoints, and writes metrics
and plots to the run directory it names at the end.

    megatron-tlt demo                              # embedded default
    megatron-tlt demo run.steps=40 rollout.n=16     # any config override
    megatron-tlt demo examples/configs/tiny.yaml    # a preset instead of the embedded default
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.multiprocessing as mp

from megatron_tlt.cli.logs import setup_logging
from megatron_tlt.config import Config, load_config
from megatron_tlt.parallel.state import free_port, set_local_rank_env
from megatron_tlt.plot import plot_run

# The embedded default: a few minutes on 2 CPU cores. A 4-layer model learns 3-term sums in a
# supervised warm-up (~70% held-out accuracy), then 60 GRPO steps of 32 prompts x 8 samples raise it.
DEMO_SETTINGS = (
    "run.dir=runs/demo", "run.overwrite=true",  # each demo is a fresh run
    "model.hidden_size=128", "model.intermediate_size=352", "model.num_layers=4",
    "data.task=arithmetic", "data.task_args={max_terms: 3, max_value: 9}", "data.eval_examples=128",
    "run.sft_steps=300", "run.sft_lr=2e-3", "run.steps=60", "run.eval_every=20", "run.prompts_per_step=32",
    "rollout.n=8", "rollout.max_new_tokens=32", "optim.lr=1e-4",
    "rollout.spec=adaptive", "drafter.online=true", "drafter.warmup_steps=200", "drafter.lr=3e-4",
    "drafter.micro_batch_tokens=512",  # short drafter steps: more of them fit the idle time (CPU)
)
DEMO_RANKS = 2


def _worker(rank: int, cfg: Config, world_size: int, port: int) -> None:
    set_local_rank_env(rank, world_size, port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    setup_logging()
    from megatron_tlt.train import train

    train(cfg)


def train_on_local_ranks(cfg: Config, ranks: int) -> None:
    """`train(cfg)` on `ranks` data-parallel processes of this machine (gloo), like a one-node torchrun; they exit
    when this process does (`parallel.state.exit_with_parent`)."""
    mp.start_processes(_worker, args=(cfg, ranks, free_port()), nprocs=ranks, join=True, start_method="spawn")


def run_demo(config_path: Optional[str] = None, overrides: Sequence[str] = (), ranks: int = DEMO_RANKS) -> Path:
    t0 = time.perf_counter()
    settings = [] if config_path is not None else list(DEMO_SETTINGS)  # a preset replaces the embedded default
    cfg = load_config(config_path, [*settings, *overrides])  # bad settings fail here, before any process starts
    train_on_local_ranks(cfg, ranks)
    run_dir = Path(cfg.run.dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if "spec_row_steps" in rows[0]:
        half = len(rows) // 2

        def accept(part):
            steps = sum(r["spec_row_steps"] for r in part)
            return sum(r["accepted_drafts"] for r in part) / steps if steps else float("nan")

        print(f"[demo] speculative rollouts: mean accepted draft tokens per speculative step {accept(rows[:half]):.2f} "
              f"(first half) -> {accept(rows[half:]):.2f} (second half); drafter steps on idle ranks: "
              f"{sum(r.get('drafter_steps', 0) for r in rows):.0f}")
    for path in plot_run(run_dir):
        print(f"[demo] plot: {path}")
    print(f"[demo] finished in {time.perf_counter() - t0:.0f}s on {ranks} data-parallel ranks; run directory: {run_dir.resolve()}")
    return run_dir
