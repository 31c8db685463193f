"""`megatron-tlt plan CONFIG [key=value ...] [--device-gb 80] [--world-size N]`: the memory plan of a run.

Prints `megatron_tlt.plan.format_plan` for the config on `--world-size` devices (default: one DP replica,
TP x PP). The model is the config's `model`, or read from `run.model_path` when that is a directory (its
`config.json` for a Hugging Face model, `model_config.yaml` for a megatron_tlt checkpoint: no weights are
read), as `step.setup.build_policy` does. Exit code 0 when both phases fit on every rank, 1 when not.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_tlt.checkpoint.dcp import read_model_config
from megatron_tlt.config import load_config
from megatron_tlt.errors import UserError
from megatron_tlt.models.hf import model_config_from_hf
from megatron_tlt.parallel import get_parallel_state
from megatron_tlt.plan import GB, format_plan, memory_plan


def run_plan(config, overrides, device_gb: float, world_size) -> int:
    cfg = load_config(config, overrides)
    path = Path(cfg.run.model_path) if cfg.run.model_path else None
    if path is not None and path.is_dir():
        hf = path / "config.json"
        model = model_config_from_hf(json.loads(hf.read_text())) if hf.is_file() else read_model_config(path)
        model.attention_backend = cfg.model.attention_backend
        cfg.model = model
    p = cfg.parallel
    try:
        plan = memory_plan(cfg, world_size or p.tensor_parallel_size * p.pipeline_parallel_size, get_parallel_state().tp_group)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(format_plan(plan, device_gb))
    limit = device_gb * GB
    return 0 if all(max(r.training_bytes, r.rollout_bytes) <= limit for r in plan.ranks) else 1
