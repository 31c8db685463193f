"""Hugging Face model directory <-> megatron_tlt checkpoint, lossless in both directions.

Why: training starts from an HF model and hands its result back to HF tools (transformers, vLLM);
DESIGN invariant 3 asks that HF -> tlt -> HF returns every tensor bit-exact, in its dtype.

How (or `megatron-tlt convert hf-to-tlt|tlt-to-hf --input IN --output OUT`):
    init_parallel()                                   # hf_to_tlt loads the model at the state's TP degree
    hf_to_tlt("/models/Qwen2.5-0.5B", "ckpt/qwen")    # load_model + save_checkpoint
    tlt_to_hf("ckpt/qwen", "export/qwen")             # full tensors from the checkpoint -> safetensors + config.json

Tokenizer files (`TOKENIZER_FILES`, generation_config.json included) travel along. Both directions
refuse a non-empty output directory and publish the result atomically (`checkpoint.publish`): the
output appears whole or not at all. The HF directory gets no COMPLETE marker (HF readers do not know one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint, read_model_config, save_checkpoint
from megatron_tlt.checkpoint.loading import load_model
from megatron_tlt.checkpoint.publish import claim_empty_output, copy_durable, staged
from megatron_tlt.data.tokenizer import TOKENIZER_FILES
from megatron_tlt.models.hf import hf_config_from_model_config, tlt_to_hf_state_dict, write_hf_dir

PathLike = Union[str, Path]


def _tokenizer_files(src: Path) -> dict[str, Path]:
    """name -> path of the tokenizer files present in `src`."""
    return {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}


def hf_to_tlt(hf_dir: PathLike, out_dir: PathLike) -> Path:
    """Convert an HF model directory (config.json + safetensors) into a megatron_tlt checkpoint at `out_dir`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    claim_empty_output(out_dir)
    model = load_model(hf_dir, device="cpu")
    meta = {"source": "hf", "hf_dir": str(hf_dir.resolve())}
    # save_checkpoint writes beside out_dir and renames: atomic on its own.
    return save_checkpoint(out_dir, model, model.cfg, tp_group=model.tp_group, meta=meta, files=_tokenizer_files(hf_dir))


def tlt_to_hf(ckpt_dir: PathLike, out_dir: PathLike) -> Path:
    """Convert a megatron_tlt checkpoint into an HF model directory at `out_dir` (safetensors, 5 GiB shards)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    claim_empty_output(out_dir)
    cfg = read_model_config(ckpt_dir)
    hf_config = hf_config_from_model_config(cfg)
    state_dict = tlt_to_hf_state_dict(load_full_state_dict_from_checkpoint(ckpt_dir), cfg)
    with staged(out_dir) as tmp:
        write_hf_dir(tmp, hf_config, state_dict)
        for name, src in _tokenizer_files(ckpt_dir).items():
            copy_durable(src, tmp / name)
    return out_dir
