"""Drafter directories on disk: save / load (any TP degree) and export to the layout SGLang and vLLM serve.

What: `save_drafter` / `load_drafter` keep a trained drafter between runs (warm-up -> RL, and later with
every run checkpoint); `export_drafter` (`megatron-tlt export-drafter`) writes an EAGLE-3 drafter
(drafter/eagle3.py) as the Hugging Face directory SGLang's and vLLM's EAGLE-3 loaders read, as is.

Why: the drafter is a small model of its own that only makes sense next to its policy, so its directory
holds just its weights, as full (unsharded) tensors that load at any TP degree, plus the policy config
they were trained for; loading checks both against the policy at hand before touching any weight.

Layout of a drafter directory (published atomically by `checkpoint.publish`, like run checkpoints:
written beside DRAFTER_DIR, COMPLETE last, renamed in):

    DRAFTER_DIR/
      drafter.safetensors   full tensors, the drafter's parameter names (`fc.weight`, `midlayer.mlp.up_proj.weight`, ...)
      drafter_config.json   {"format": "megatron_tlt-drafter/1", "policy_config": {ModelConfig fields},
                             "num_layers": 1, "dtype": "float32", "arch": "eagle3" | "eagle",
                             "feature_layers": [l, m, h], "draft_vocab": [target ids] (eagle3, optional)}
                            (no "arch": an eagle drafter, written before eagle3)
      meta.json             caller's metadata (optional)
      COMPLETE              written last: {"format": "megatron_tlt-drafter/1", "saved_at": ...}

Serving export (`config.json` + `model.safetensors`, published the same way but without a COMPLETE marker,
which HF readers do not know). Read from, and encoded in tests/test_drafter_eagle3.py:
  SGLang  python/sglang/srt/models/llama_eagle3.py @ 03d5a77 (`LlamaForCausalLMEagle3`), models/llama.py @ 0023954
          (`set_eagle3_layers_to_capture`), model_executor/model_runner.py (reads the draft config's `eagle_config`)
  vLLM    vllm/model_executor/models/llama_eagle3.py @ 00bd149 (`Eagle3LlamaForCausalLM`, registered under the
          architecture name `LlamaForCausalLMEagle3`), v1/worker/gpu_model_runner.py (aux layer ids)
  EAGLE   SafeAILab/EAGLE eagle/traineagle3/cnets.py @ cb7e084; SpecForge configs/*-eagle3.json and
          specforge/algorithms/eagle3/model.py @ a6b6b02 (TTT, d2t / t2d)
What they expect:
  - architectures ["LlamaForCausalLMEagle3"], model_type "llama", num_hidden_layers 1: one plain Llama layer
    (SGLang builds q/k/v with bias=False over 2H and no q/k norm, so a Qwen2/3 policy's drafter is a Llama
    layer too: drafter/eagle3.py builds it so); `target_hidden_size` (fc's input is 3 x it); `draft_vocab_size`
    (SGLang: None with untied embeddings means the target's head is loaded; vLLM: None means vocab_size);
    fc has a bias only if config "bias" is true (SGLang; vLLM never has one): we write "bias": false and no bias.
  - tensors, unprefixed (both add `model.` to all but `lm_head`): fc.weight [H, 3H]; midlayer.input_layernorm
    (on the embedding), midlayer.hidden_norm (on the fused hidden), midlayer.self_attn.{q,k,v}_proj.weight
    [*, 2H], o_proj, midlayer.post_attention_layernorm, midlayer.mlp.{gate,up,down}_proj; norm.weight; lm_head.weight
    [draft_vocab_size, H]; embed_tokens.weight (optional in both: shared from the target when absent; we write
    it, the policy's, so every parameter loads from the directory). SGLang names the layer `midlayer` and only
    that; vLLM renames `midlayer.` to `layers.0.`: `midlayer.*` is read by both.
  - attention input [input_layernorm(embed); hidden_norm(h)] in that order, residual = h (vLLM's default
    `norm_before_residual: false`), the final norm's input (pre-norm) fed back to the next draft step.
  - d2t [draft_vocab_size] int64 with target_id = draft_id + d2t[draft_id], t2d [vocab_size] bool (SGLang turns
    d2t into `hot_token_id`, vLLM into `draft_id_to_target_id`; both skip t2d): only with a reduced draft
    vocabulary (`Eagle3Drafter(draft_vocab=...)`, its own lm_head [Vd, H]). With the policy's whole vocabulary
    (draft_vocab_size = vocab_size, lm_head = the policy's) neither is written and both servers map draft ids to
    target ids as the identity.
  - aux layers: both capture the residual stream at the INPUT of decoder layers; by default (2, N // 2, N - 3),
    i.e. the outputs of (1, N // 2 - 1, N - 4) (`eagle3.default_feature_layers`). Explicit ids disagree between
    the two: SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids` as layer OUTPUTS (it adds 1), vLLM reads
    the top-level `eagle_aux_hidden_state_layer_ids` as layer INPUTS. We write both, each in its server's
    convention, from `feature_layers` (outputs of those layers).
An EAGLE (arch "eagle") drafter is refused: no stock loader has its layer-0 input norm and final norm.
Tensors are written in the dtype the drafter was saved in.
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
from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.drafter.model import Drafter, build_drafter
from megatron_tlt.errors import CheckpointError, UserError
from megatron_tlt.models.hf import hf_config_from_model_config, load_safetensors, write_hf_dir
from megatron_tlt.parallel.sharding import full_shape, gather_full_state_dict, load_full_state_dict

FORMAT = "megatron_tlt-drafter/1"
WHAT = "drafter directory"  # how errors name one
WEIGHTS_FILE = "drafter.safetensors"
CONFIG_FILE = "drafter_config.json"
META_FILE = "meta.json"
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
# Config fields that change the drafter's maths without changing any of its tensor shapes.
_MATH_FIELDS = ("vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps")

PathLike = Union[str, Path]


# ---- save ----
def _write_drafter_dir(path: Path, full: dict[str, torch.Tensor], cfg: ModelConfig, arch: dict, meta: Optional[dict]) -> None:
    """Write into a sibling temporary directory, then publish it as `path` (fsync, COMPLETE last, a rename)."""
    with staged(path, FORMAT, what=WHAT) as tmp:
        save_file({name: t.contiguous() for name, t in full.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        dtype = dtype_name(next(iter(full.values())).dtype)
        config = {"format": FORMAT, "policy_config": dataclasses.asdict(cfg), "num_layers": 1, "dtype": dtype, **arch}
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
    head = {"arch": drafter.arch}
    if drafter.feature_layers is not None:
        head["feature_layers"] = list(drafter.feature_layers)
    if drafter.draft_ids is not None:
        head["draft_vocab"] = drafter.draft_ids.tolist()
    on_rank0(_write_drafter_dir, path, full, drafter.policy.cfg, head, meta)
    return path


# ---- load ----
def read_drafter_config(path: PathLike) -> tuple[ModelConfig, dict]:
    """(the policy ModelConfig a (complete) drafter directory was trained for, its head: `build_drafter`'s arch,
    feature_layers, draft_vocab)."""
    path = require_complete(path, FORMAT, WHAT)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        fields = dict(config["policy_config"])
        scaling = fields.pop("rope_scaling")
        cfg = ModelConfig(**fields, rope_scaling=None if scaling is None else RopeScalingConfig(**scaling))
        layers = config.get("feature_layers")
        head = {"arch": config.get("arch", "eagle"), "feature_layers": None if layers is None else tuple(layers),
                "draft_vocab": config.get("draft_vocab")}
    except OSError as e:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid drafter config: {e}") from None
    return cfg, head


def read_drafter_weights(path: PathLike) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """(policy ModelConfig, head (`read_drafter_config`), full tensors by the drafter's parameter names) of a drafter
    directory, read in this process after its files are checked against the checksums written at save."""
    path = Path(path)
    cfg, head = read_drafter_config(path)
    verify_files(path)
    return cfg, head, load_safetensors(path / WEIGHTS_FILE)


def _check_fits(path: Path, drafter: "Drafter | Eagle3Drafter", saved_cfg: ModelConfig, full: dict[str, torch.Tensor]) -> None:
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
        f"{f}={getattr(saved_cfg, f)!r} in the drafter but {getattr(drafter.policy.cfg, f)!r} in the policy"
        for f in _MATH_FIELDS if getattr(saved_cfg, f) != getattr(drafter.policy.cfg, f)
    ]
    if problems:
        raise CheckpointError(f"drafter {path} does not fit this policy: " + "; ".join(problems))


def load_drafter(path: PathLike, policy) -> "Drafter | Eagle3Drafter":
    """The drafter saved at `path`, built over `policy` (at the policy's TP degree, dtype and device)."""
    path = Path(path)
    saved_cfg, head, full = read_drafter_weights(path)
    drafter = build_drafter(policy, **head, init_weights=False)
    _check_fits(path, drafter, saved_cfg, full)
    load_full_state_dict(drafter, full, drafter.tp_group)
    return drafter.to(next(policy.parameters()).device)


# ---- serving export (EAGLE-3) ----
def eagle3_config(cfg: ModelConfig, feature_layers: tuple[int, ...], draft_vocab_size: int, dtype: str) -> dict:
    """config.json of the exported head (module docstring): a one-layer Llama config plus the EAGLE-3 keys."""
    layer = dataclasses.replace(cfg, arch="llama", qkv_bias=False, qk_norm=False, num_layers=1, tie_word_embeddings=False,
                                params_dtype=dtype)
    hf_config = hf_config_from_model_config(layer)
    hf_config.update({
        "architectures": [EAGLE3_ARCHITECTURE],
        "target_hidden_size": cfg.hidden_size,
        "draft_vocab_size": draft_vocab_size,
        "bias": False,
        "attention_bias": False,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in feature_layers],  # vLLM: inputs of these layers
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(feature_layers),  # SGLang: outputs of these layers
            "use_aux_hidden_state": True,
            "source_format": FORMAT,
            "target_architecture": cfg.arch,
        },
    })
    return hf_config


def vocab_maps(draft_ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """EAGLE-3's maps of a draft vocabulary (target ids [Vd], sorted): d2t [Vd] int64 (target = draft + d2t[draft])
    and t2d [vocab_size] bool (the target ids kept)."""
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return {"d2t": draft_ids - torch.arange(len(draft_ids)), "t2d": t2d}


def export_drafter(drafter_dir: PathLike, out_dir: PathLike, policy) -> Path:
    """Write the EAGLE-3 drafter at `drafter_dir` with `policy`'s embedding (and LM head, unless the drafter has a
    draft vocabulary and its own) as the serving directory `out_dir` (refused if not empty), atomically. `policy`:
    the one it was trained with, a whole `Policy` at TP = 1."""
    out_dir = Path(out_dir)
    cfg, head, full = read_drafter_weights(drafter_dir)
    if head["arch"] != "eagle3":
        raise UserError(f"{drafter_dir} holds an {head['arch']} drafter, which no serving engine loads as is (its layer-0 "
                        "input norm and final norm have no place in their EAGLE heads): train one with drafter.arch=eagle3")
    if policy.tp_size != 1 or not (policy.pre_process and policy.post_process):
        raise ValueError("export_drafter needs the whole policy at TP = 1 for its embedding and LM head")
    _check_fits(Path(drafter_dir), build_drafter(policy, **head, init_weights=False), cfg, full)
    dtype = next(iter(full.values())).dtype
    V = cfg.vocab_size
    tensors = {**full, "embed_tokens.weight": policy.embed_tokens.weight.detach()[:V].to("cpu", dtype)}
    if head["draft_vocab"] is None:  # the policy's head
        tensors["lm_head.weight"] = policy.output_weight().detach()[:V].to("cpu", dtype)
    else:
        tensors.update(vocab_maps(torch.tensor(head["draft_vocab"], dtype=torch.long), V))
    draft_vocab_size = V if head["draft_vocab"] is None else len(head["draft_vocab"])
    claim_empty_output(out_dir)
    with staged(out_dir) as tmp:
        write_hf_dir(tmp, eagle3_config(cfg, head["feature_layers"], draft_vocab_size, dtype_name(dtype)), tensors)
    return out_dir
