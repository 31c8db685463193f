"""`load_model`: one call from a directory on disk to a ready Policy.

Why: evaluation scripts, the rollout engine and tests should not care whether weights come from a
Hugging Face model directory or from a megatron_tlt checkpoint, nor set up process groups by hand.

How:
    model = load_model("/models/Qwen2.5-0.5B")       # HF dir: config.json + (sharded) safetensors
    model = load_model("runs/demo/step_30")          # megatron_tlt checkpoint
    logits = model(tokens)                           # tokens [B, S] -> logits [B, S, vocab_size]
    tok = load_tokenizer(path)                       # megatron_tlt.data.tokenizer, same directory

Without a `tp_group`, the model uses the current parallel state's TP group, and a single-process
state is started if there is none. A tlt checkpoint is read shard-wise by `load_checkpoint`; an HF
directory is read full and each rank keeps its shards.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch

from megatron_tlt.checkpoint.dcp import is_tlt_checkpoint, load_checkpoint, read_model_config
from megatron_tlt.config.dtypes import TORCH_DTYPES, dtype_name
from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.errors import CheckpointError
from megatron_tlt.models.hf import CONFIG_NAME, hf_to_tlt_state_dict, model_config_from_hf, read_hf_dir
from megatron_tlt.parallel.sharding import load_full_state_dict
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.state import ParallelState, get_parallel_state, init_parallel


def current_or_single_process_state() -> ParallelState:
    """The initialised parallel state, or a fresh single-process one (TP = PP = DP = 1)."""
    try:
        return get_parallel_state()
    except RuntimeError:
        return init_parallel()


def _with_dtype(cfg: ModelConfig, dtype: Union[None, str, torch.dtype]) -> ModelConfig:
    if dtype is None:
        return cfg
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(TORCH_DTYPES)} (or the torch dtype)")
    return dataclasses.replace(cfg, params_dtype=name)


def load_model(
    path: Union[str, Path],
    *,
    tp_group=None,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
) -> Policy:
    """The Policy stored in `path` (an HF model directory or a megatron_tlt checkpoint), in eval mode.

    device: default the parallel state's device; dtype: default the stored one (HF's `dtype` /
    `torch_dtype`, or the checkpoint's params_dtype).
    """
    path = Path(path)
    state = current_or_single_process_state()
    tp_group = state.tp_group if tp_group is None else tp_group
    if is_tlt_checkpoint(path):
        model = Policy(_with_dtype(read_model_config(path), dtype), tp_group=tp_group, init_weights=False)
        load_checkpoint(path, model, tp_group=tp_group)
    elif (path / CONFIG_NAME).is_file():
        hf_config, hf_state_dict = read_hf_dir(path)
        cfg = _with_dtype(model_config_from_hf(hf_config), dtype)
        model = Policy(cfg, tp_group=tp_group, init_weights=False)
        state_dict = hf_to_tlt_state_dict(hf_state_dict, cfg)
        try:
            load_full_state_dict(model, state_dict, tp_group)
        except (KeyError, ValueError) as e:  # names the tensor that does not fit the config
            raise CheckpointError(f"{path}: {e.args[0]}") from None
    else:
        raise CheckpointError(
            f"{path} is neither a megatron_tlt checkpoint nor a Hugging Face model directory "
            f"(looked for a checkpoint written by megatron_tlt.checkpoint.dcp.save_checkpoint, and for {CONFIG_NAME})"
        )
    return model.to(device if device is not None else state.device).eval()
