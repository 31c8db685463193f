"""`megatron-tlt demo`: the whole RL pipeline on CPU in a few minutes, with no downloads.

It builds a tokenizer and a tiny policy (the config schema's defaults are this demo), warms the
policy up with a short supervised phase on the built-in arithmetic task, measures greedy held-out
accuracy, runs GRPO steps (rollout -> rewards -> advantages -> packed update), measures accuracy
again, checkpoints, and writes metrics and plots to the run directory it names at the end.

    megatron-tlt demo                           # embedded default
    megatron-tlt demo run.steps=40 rollout.n=16  # any config override
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_tlt.config import load_config
from megatron_tlt.plot import plot_run
from megatron_tlt.train import train


def run_demo(config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Path:
    t0 = time.perf_counter()
    run_dir = train(load_config(config_path, overrides))
    for path in plot_run(run_dir):
        print(f"[demo] plot: {path}")
    print(f"[demo] finished in {time.perf_counter() - t0:.0f}s; run directory: {run_dir.resolve()}")
    return run_dir
