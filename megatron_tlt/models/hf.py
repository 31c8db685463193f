"""Hugging Face <-> megatron_tlt: model configs, parameter names and safetensors directories.

Why: a policy starts from an HF checkpoint and ends as one, and DESIGN invariant 3 asks for the same
logits as `transformers` and a bit-exact round trip. So this module only maps; it never re-implements
modeling code, and any HF setting that would change the math but that the Policy does not implement
(another RoPE type, a sliding window, mlp/o_proj biases, another activation) is refused by name
instead of being dropped silently.

How:
    hf_config, hf_sd = read_hf_dir("/models/Qwen2.5-7B")        # config.json + (sharded) safetensors
    cfg = model_config_from_hf(hf_config)                        # -> ModelConfig
    sd = hf_to_tlt_state_dict(hf_sd, cfg)                        # strip `model.`, pad vocab rows
    ...
    write_hf_dir(out, hf_config_from_model_config(cfg), tlt_to_hf_state_dict(sd, cfg))

Names differ only by HF's `model.` prefix (`model.layers.0.mlp.up_proj.weight` <->
`layers.0.mlp.up_proj.weight`; `lm_head.weight` is the same). The embedding and LM head carry
`cfg.padded_vocab_size` rows here and `cfg.vocab_size` rows in HF: padding rows are zeros.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_tlt.config.schema import DTYPES, ModelConfig, RopeScalingConfig
from megatron_tlt.errors import CheckpointError

SUPPORTED_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_HF_ARCHITECTURE = {arch: name for name, arch in SUPPORTED_HF_ARCHITECTURES.items()}
# What each family fixes: (qkv_bias, qk_norm). Qwen2 always has q/k/v biases; Llama's and Qwen3's
# `attention_bias` would also add an o_proj bias, which the Policy does not have.
_ARCH_FEATURES = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # tlt names of the tensors padded to padded_vocab_size

PathLike = Union[str, Path]


# ---- configs ----
def _rope(hf_config: dict) -> tuple[float, Optional[RopeScalingConfig]]:
    """(rope_theta, scaling) from either layout: transformers 4 (`rope_theta` + `rope_scaling`) or
    transformers 5 (`rope_parameters` holding both)."""
    params = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        key = "rope_parameters" if "rope_parameters" in hf_config else "rope_scaling"
        raise CheckpointError(f"{key}.rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if f not in params]
    if missing:
        raise CheckpointError(f"llama3 rope scaling lacks {missing}")
    return theta, RopeScalingConfig(rope_type="llama3", **{f: params[f] for f in fields})


def _reject_unsupported(hf_config: dict, arch: str) -> None:
    """Refuse, by key, HF settings that change the math in ways the Policy does not implement."""
    if hf_config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf_config['hidden_act']!r} is not supported (supported: 'silu')")
    if hf_config.get("mlp_bias"):
        raise CheckpointError("mlp_bias=true is not supported (the MLP projections have no bias)")
    if arch != "qwen2" and hf_config.get("attention_bias"):
        raise CheckpointError("attention_bias=true is not supported for this architecture (o_proj has no bias)")
    # transformers 5 lists layer_types; older Qwen configs imply them (layers from max_window_layers on slide).
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window") else None
    layer_types = hf_config.get("layer_types") or [
        "sliding_attention" if window and i >= hf_config.get("max_window_layers", 0) else "full_attention"
        for i in range(hf_config.get("num_hidden_layers", 0))
    ]
    if any(t != "full_attention" for t in layer_types):
        raise CheckpointError(
            f"sliding-window attention is not supported (use_sliding_window / layer_types={sorted(set(layer_types))})"
        )


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """The ModelConfig of an HF `config.json` dict; unsupported architectures or features raise CheckpointError."""
    archs = hf_config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_HF_ARCHITECTURES:
        raise CheckpointError(f"architectures={archs!r} is not supported; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}")
    arch = SUPPORTED_HF_ARCHITECTURES[archs[0]]
    _reject_unsupported(hf_config, arch)
    theta, scaling = _rope(hf_config)
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    qkv_bias, qk_norm = _ARCH_FEATURES[arch]
    try:
        heads = hf_config["num_attention_heads"]
        return ModelConfig(
            arch=arch,
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or heads,
            # Qwen3's config class defaults head_dim to 128; the others derive it from hidden_size.
            head_dim=hf_config.get("head_dim") or (128 if arch == "qwen3" else None),
            max_position_embeddings=hf_config["max_position_embeddings"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            params_dtype=dtype,
        )
    except KeyError as e:
        raise CheckpointError(f"the HF config lacks the required key {e.args[0]!r}") from None
    except ValueError as e:  # ModelConfig's cross-field checks
        raise CheckpointError(f"the HF config is inconsistent: {e}") from None


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """An HF `config.json` dict that `transformers` loads into the same model (legacy rope keys, which
    transformers 4 and 5 both read)."""
    if (cfg.qkv_bias, cfg.qk_norm) != _ARCH_FEATURES[cfg.arch]:
        raise CheckpointError(
            f"a {cfg.arch} model with qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm} has no Hugging Face equivalent "
            f"({_HF_ARCHITECTURE[cfg.arch]} has qkv_bias={_ARCH_FEATURES[cfg.arch][0]}, qk_norm={_ARCH_FEATURES[cfg.arch][1]})"
        )
    hf_config = {
        "architectures": [_HF_ARCHITECTURE[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": cfg.params_dtype,
        "torch_dtype": cfg.params_dtype,  # the name transformers 4 reads
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf_config["rope_scaling"] = {
            "rope_type": s.rope_type,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    if cfg.arch != "qwen2":
        hf_config["attention_bias"] = False
    if cfg.arch != "llama":
        hf_config["use_sliding_window"] = False
    return hf_config


# ---- state dicts ----
def _pad_vocab_rows(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[vocab_size, H] -> [padded_vocab_size, H], zero rows appended."""
    if t.dim() != 2 or t.shape[0] != cfg.vocab_size:
        want = (cfg.vocab_size, cfg.hidden_size)
        raise CheckpointError(f"tensor '{name}' has shape {tuple(t.shape)}, but the config expects {want}")
    return torch.cat([t, t.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, t.shape[1])])


def hf_to_tlt_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names and [vocab_size, H] vocab tensors -> Policy names and [padded_vocab_size, H]; tensors are not copied
    otherwise. A tied model's `lm_head.weight`, if present, is dropped (the embedding is the head)."""
    sd = {}
    for hf_name, t in hf_sd.items():
        if hf_name == "lm_head.weight":
            name = hf_name
            if cfg.tie_word_embeddings:
                continue
        elif hf_name.startswith("model."):
            name = hf_name[len("model."):]
        else:
            raise CheckpointError(f"unexpected tensor '{hf_name}' (expected 'model.*' or 'lm_head.weight')")
        sd[name] = _pad_vocab_rows(hf_name, t, cfg) if name in _VOCAB_ROWS else t
    return sd


def tlt_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_tlt_state_dict`: add `model.`, cut vocab tensors back to [vocab_size, H] (views)."""
    hf_sd = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                hf_sd[name] = t[: cfg.vocab_size]
        else:
            hf_sd[f"model.{name}"] = t[: cfg.vocab_size] if name in _VOCAB_ROWS else t
    return hf_sd


# ---- directories ----
def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; CheckpointError naming the file if it is missing or unreadable."""
    if not file.is_file():
        raise CheckpointError(f"weight file {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (is the file truncated or corrupt?)") from None


def read_hf_dir(path: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, full state dict with HF names) of an HF model directory with safetensors weights."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(
            f"{config_file} not found: an HF model directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"(or {WEIGHTS_INDEX_NAME} and its shards)"
        )
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    index_file = path / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file} is not a safetensors index (no valid 'weight_map'): {e}") from None
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(load_safetensors(path / shard))
        missing = sorted(weight_map.keys() - state_dict.keys())
        if missing:
            raise CheckpointError(f"{index_file} lists tensors that no shard holds: {missing[:8]}")
    elif (path / WEIGHTS_NAME).is_file():
        state_dict = load_safetensors(path / WEIGHTS_NAME)
    else:
        raise CheckpointError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path} (only safetensors weights are supported)")
    return hf_config, state_dict


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_hf_dir(
    path: PathLike,
    hf_config: dict,
    state_dict: dict[str, torch.Tensor],
    max_shard_bytes: int = 5 * 2**30,
    *,
    generation_config: Optional[dict] = None,
) -> None:
    """Write an HF model directory: config.json, safetensors (shards `model-0000i-of-0000n.safetensors` plus an
    index once the tensors exceed `max_shard_bytes`), and generation_config.json when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = [0]
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes.append(0)
        shards[-1][name] = t.contiguous()
        shard_bytes[-1] += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        _write_json(path / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": sum(shard_bytes)}, "weight_map": weight_map})
    _write_json(path / CONFIG_NAME, hf_config)
    if generation_config is not None:
        _write_json(path / GENERATION_CONFIG_NAME, generation_config)
