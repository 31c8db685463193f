"""Drafter directories on disk: save / load (any TP degree) and export to the Hugging Face EAGLE layout.

What: `save_drafter` / `load_drafter` keep a trained drafter between runs (warm-up -> RL, and later with
every run checkpoint); `export_drafter` (`megatron-tlt export-drafter`) writes it for EAGLE-style serving.

Why: the drafter is a small model of its own that only makes sense next to its policy, so its directory
holds just its weights, as full (unsharded) tensors that load at any TP degree, plus the policy config
they were trained for; loading checks both against the policy at hand before touching any weight.

Layout of a drafter directory (published atomically by `checkpoint.publish`, like run checkpoints:
written beside DRAFTER_DIR, COMPLETE last, renamed in):

    DRAFTER_DIR/
      drafter.safetensors   full tensors, Drafter parameter names (`fc.weight`, `layer.mlp.up_proj.weight`, ...)
      drafter_config.json   {"format": "megatron_tlt-drafter/1", "policy_config": {ModelConfig fields},
                             "num_layers": 1, "dtype": "float32"}
      meta.json             caller's metadata (optional)
      COMPLETE              written last: {"format": "megatron_tlt-drafter/1", "saved_at": ...}

HF EAGLE export (`config.json` + `model.safetensors`, published the same way but without a COMPLETE
marker, which HF readers do not know), as SGLang's and vLLM's `LlamaForCausalLMEagle`
and EAGLE's own checkpoints name an EAGLE-1/2 head: tensors unprefixed, the one decoder layer as
`layers.0`, no `embed_tokens` / `lm_head` (shared with the base model; config.json says
`"tie_to_base_model": true`). Name mapping, megatron_tlt -> EAGLE:

    fc.weight [H, 2H]                   fc.weight         input [embed(x_{t+1}); f_t], EAGLE's order; no bias
    layer.input_layernorm.weight        layers.0.input_layernorm.weight
    layer.self_attn.{q,k,v,o}_proj.*    layers.0.self_attn.{q,k,v,o}_proj.*   (+ q/k/v `.bias` for qwen2)
    layer.self_attn.{q,k}_norm.weight   layers.0.self_attn.{q,k}_norm.weight  (qwen3 only)
    layer.post_attention_layernorm.*    layers.0.post_attention_layernorm.*
    layer.mlp.{gate,up,down}_proj.*     layers.0.mlp.{gate,up,down}_proj.*
    norm.weight                         norm.weight

Two differences from EAGLE-1 that a serving loader must honour (config.json's `eagle_config` states
them): layer 0 keeps its input RMSNorm (EAGLE-1 replaces it by the identity), and the head ends with its
own RMSNorm (`norm.weight`; EAGLE-1 has none) because this drafter regresses the policy's final *normed*
hidden state (drafter/model.py). Tensors are written in the dtype the drafter was saved in.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from megatron_tlt.checkpoint.publish import claim_empty_output, on_rank0, require_complete, staged, verify_files, write_durable
from megatron_tlt.config.dtypes import dtype_name
from megatron_tlt.config.schema import ModelConfig, RopeScalingConfig
from megatron_tlt.drafter.model import Drafter
from megatron_tlt.errors import CheckpointError
from megatron_tlt.models.hf import hf_config_from_model_config, load_safetensors, write_hf_dir
from megatron_tlt.parallel.sharding import full_shape, gather_full_state_dict, load_full_state_dict

FORMAT = "megatron_tlt-drafter/1"
WHAT = "drafter directory"  # how errors name one
WEIGHTS_FILE = "drafter.safetensors"
CONFIG_FILE = "drafter_config.json"
META_FILE = "meta.json"
EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle"
# Config fields that change the drafter's maths without changing any of its tensor shapes.
_MATH_FIELDS = ("vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps")

PathLike = Union[str, Path]


# ---- save ----
def _write_drafter_dir(path: Path, full: dict[str, torch.Tensor], cfg: ModelConfig, meta: Optional[dict]) -> None:
    """Write into a sibling temporary directory, then publish it as `path` (fsync, COMPLETE last, a rename)."""
    with staged(path, FORMAT, what=WHAT) as tmp:
        save_file({name: t.contiguous() for name, t in full.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        dtype = dtype_name(next(iter(full.values())).dtype)
        config = {"format": FORMAT, "policy_config": dataclasses.asdict(cfg), "num_layers": 1, "dtype": dtype}
        write_durable(tmp / CONFIG_FILE, json.dumps(config, indent=1))
        if meta is not None:
            write_durable(tmp / META_FILE, json.dumps(meta, indent=1))


def save_drafter(path: PathLike, drafter: Drafter, meta: Optional[dict] = None) -> Path:
    """Write `drafter` (possibly TP-sharded) to `path` as full tensors, atomically; returns `path`.

    Every rank must call this (the shards are gathered over the drafter's TP group, then rank 0 writes and
    every rank learns whether it succeeded). An existing (complete) drafter directory at `path` is replaced;
    anything else there is refused. Only parameters are saved (megatron's `_extra_state` entries are None here).
    """
    path = Path(path)
    full = {name: t.cpu() for name, t in gather_full_state_dict(drafter, drafter.tp_group).items()}
    on_rank0(_write_drafter_dir, path, full, drafter.cfg, meta)
    return path


# ---- load ----
def read_drafter_config(path: PathLike) -> ModelConfig:
    """The policy ModelConfig a (complete) drafter directory was trained for."""
    path = require_complete(path, FORMAT, WHAT)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        fields = dict(config["policy_config"])
        scaling = fields.pop("rope_scaling")
        cfg = ModelConfig(**fields, rope_scaling=None if scaling is None else RopeScalingConfig(**scaling))
    except OSError as e:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid drafter config: {e}") from None
    return cfg


def read_drafter_weights(path: PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(policy ModelConfig, full tensors by Drafter parameter name) of a drafter directory, read in this process
    after its files are checked against the checksums written at save."""
    path = Path(path)
    cfg = read_drafter_config(path)
    verify_files(path)
    return cfg, load_safetensors(path / WEIGHTS_FILE)


def _check_fits(path: Path, drafter: Drafter, saved_cfg: ModelConfig, full: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming every tensor that is missing, unexpected or of another shape, then every
    maths-only config field that differs from the policy's."""
    want = {name: full_shape(p, drafter.tp_size) for name, p in drafter.named_parameters()}
    problems = [f"'{n}' is not in the drafter file" for n in want if n not in full]
    problems += [f"'{n}' is in the drafter file but not in the drafter" for n in full if n not in want]
    problems += [
        f"'{n}' has shape {tuple(full[n].shape)} in the drafter file but {s} for this policy"
        for n, s in want.items() if n in full and tuple(full[n].shape) != s
    ]
    problems += [
        f"{f}={getattr(saved_cfg, f)!r} in the drafter but {getattr(drafter.cfg, f)!r} in the policy"
        for f in _MATH_FIELDS if getattr(saved_cfg, f) != getattr(drafter.cfg, f)
    ]
    if problems:
        raise CheckpointError(f"drafter {path} does not fit this policy: " + "; ".join(problems))


def load_drafter(path: PathLike, policy) -> Drafter:
    """The drafter saved at `path`, built over `policy` (at the policy's TP degree, dtype and device)."""
    path = Path(path)
    saved_cfg, full = read_drafter_weights(path)
    drafter = Drafter(policy, init_weights=False)
    _check_fits(path, drafter, saved_cfg, full)
    load_full_state_dict(drafter, full, drafter.tp_group)
    return drafter.to(next(policy.parameters()).device)


# ---- HF EAGLE export ----
def drafter_to_eagle_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drafter parameter names -> EAGLE names (the module docstring's table); tensors are not copied."""
    return {("layers.0." + name[len("layer."):] if name.startswith("layer.") else name): t for name, t in full.items()}


def eagle_to_drafter_state_dict(eagle: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `drafter_to_eagle_state_dict`."""
    return {("layer." + name[len("layers.0."):] if name.startswith("layers.0.") else name): t for name, t in eagle.items()}


def eagle_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of the exported head: the base model's HF config with one layer, plus EAGLE keys."""
    hf_config = hf_config_from_model_config(dataclasses.replace(cfg, params_dtype=dtype))
    hf_config.update({
        "architectures": [EAGLE_ARCHITECTURE],
        "num_hidden_layers": 1,
        "bias": False,  # EAGLE's key for a bias on fc
        "tie_to_base_model": True,  # embed_tokens and lm_head are the base model's; not in this directory
        "eagle_config": {
            "source_format": FORMAT,
            "base_architecture": cfg.arch,
            "fc_input": ["embed_tokens(x_{t+1})", "base_final_normed_hidden(t)"],
            "layer0_input_layernorm": True,
            "final_norm": True,
            "qkv_bias": cfg.qkv_bias,
            "qk_norm": cfg.qk_norm,
        },
    })
    return hf_config


def export_drafter(drafter_dir: PathLike, out_dir: PathLike) -> Path:
    """Write the drafter at `drafter_dir` as an HF EAGLE directory at `out_dir` (refused if not empty), atomically."""
    out_dir = Path(out_dir)
    cfg, full = read_drafter_weights(drafter_dir)
    claim_empty_output(out_dir)
    dtype = dtype_name(next(iter(full.values())).dtype)
    with staged(out_dir) as tmp:
        write_hf_dir(tmp, eagle_config(cfg, dtype), drafter_to_eagle_state_dict(full))
    return out_dir
