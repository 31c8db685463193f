"""`load_model`: one call from a directory on disk to a ready Policy.

Why: evaluation scripts, the rollout engine and tests should not care whether weights come from a
Hugging Face model directory or from a megatron_tlt checkpoint. It lives in checkpoint/ (not models/)
because it reads checkpoints: models/ stays below checkpoint/, with no import cycle between the two.

How:
    init_parallel()                                  # megatron_tlt.parallel: once per process, by the caller
    model = load_model("/models/Qwen2.5-0.5B")       # HF dir: config.json + (sharded) safetensors
    model = load_model("runs/demo/step_30")          # megatron_tlt checkpoint
    logits = model(tokens)                           # tokens [B, S] -> logits [B, S, vocab_size]
    tok = load_tokenizer(path)                       # megatron_tlt.data.tokenizer, same directory

The model is sharded over the given `tp_group`, else over the initialised parallel state's TP group;
`load_model` never starts process groups itself (that is the caller's job, with its own layout and
teardown), so without either it raises. A tlt checkpoint is read shard-wise by `load_checkpoint`; an
HF directory is read full and each rank keeps its shards.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_tlt.checkpoint.dcp import is_tlt_checkpoint, load_checkpoint, read_model_config
from megatron_tlt.config.dtypes import TORCH_DTYPES, dtype_name
from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.errors import CheckpointError
from megatron_tlt.models.hf import CONFIG_NAME, hf_to_tlt_state_dict, model_config_from_hf, read_hf_dir
from megatron_tlt.models.pipeline import PolicyStage, build_stage
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.sharding import load_full_state_dict
from megatron_tlt.parallel.state import ParallelState, get_parallel_state


def _parallel_state_or_none() -> Optional[ParallelState]:
    try:
        return get_parallel_state()
    except RuntimeError:
        return None


def _with_runtime(cfg: ModelConfig, dtype: Union[None, str, torch.dtype], attention_backend: str) -> ModelConfig:
    """`cfg` with the caller's dtype (where given) and attention backend: settings the stored weights do not fix."""
    if dtype is not None:
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
        if name not in TORCH_DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(TORCH_DTYPES)} (or the torch dtype)")
        cfg = dataclasses.replace(cfg, params_dtype=name)
    return dataclasses.replace(cfg, attention_backend=attention_backend)  # validated by ModelConfig


def load_model(
    path: Union[str, Path],
    *,
    tp_group=None,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
    attention_backend: str = "auto",
    pipeline: tuple[int, int, int, Optional[list[int]]] = (0, 1, 1, None),
    sequence_parallel: bool = False,
) -> Union[Policy, PolicyStage]:
    """The Policy stored in `path` (an HF model directory or a megatron_tlt checkpoint), in eval mode.

    tp_group: default the initialised parallel state's TP group (RuntimeError if there is neither);
    device: default the parallel state's device (CPU without one); dtype: default the stored one (HF's
    `dtype` / `torch_dtype`, or the checkpoint's params_dtype); attention_backend: a name of
    config.schema.ATTENTION_BACKENDS, "auto" by default (a choice for this machine: the one a checkpoint
    was trained with is not reused); pipeline: (pp_rank, pp, vpp, layout) -- with pp > 1 the
    `models.pipeline.PolicyStage` of that pipeline rank (the stored tensors are whole-model and named
    globally, so any TP x PP can load any checkpoint); sequence_parallel: as `Policy`'s.
    """
    path = Path(path)
    state = _parallel_state_or_none()
    if tp_group is None:
        if state is None:
            raise RuntimeError(
                "load_model needs a tensor-parallel group: call megatron_tlt.parallel.init_parallel() first "
                "(or pass tp_group=)"
            )
        tp_group = state.tp_group
    if device is None:
        device = state.device if state is not None else torch.device("cpu")
    pp_rank, pp, vpp, layout = pipeline

    def build(cfg: ModelConfig):
        if pp == 1:
            return Policy(cfg, tp_group=tp_group, init_weights=False, sequence_parallel=sequence_parallel).to(device)
        return build_stage(cfg, tp_group, pp_rank, pp, vpp, layout, device=device, init_weights=False,
                           sequence_parallel=sequence_parallel)

    if is_tlt_checkpoint(path):
        model = build(_with_runtime(read_model_config(path), dtype, attention_backend))
        load_checkpoint(path, model, tp_group=tp_group)
    elif (path / CONFIG_NAME).is_file():
        hf_config, hf_state_dict = read_hf_dir(path)
        cfg = _with_runtime(model_config_from_hf(hf_config), dtype, attention_backend)
        model = build(cfg)
        state_dict = hf_to_tlt_state_dict(hf_state_dict, cfg)
        if pp > 1:  # this stage's tensors (a missing one is still an error)
            names = dict(model.named_parameters())
            state_dict = {n: t for n, t in state_dict.items() if n in names}
        try:
            load_full_state_dict(model, state_dict, tp_group)
        except (KeyError, ValueError) as e:  # names the tensor that does not fit the config
            raise CheckpointError(f"{path}: {e.args[0]}") from None
    else:
        raise CheckpointError(
            f"{path} is neither a megatron_tlt checkpoint nor a Hugging Face model directory "
            f"(looked for a checkpoint written by megatron_tlt.checkpoint.dcp.save_checkpoint, and for {CONFIG_NAME})"
        )
    return model.to(device).eval()
