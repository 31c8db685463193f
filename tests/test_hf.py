"""HF equivalence and conversion (DESIGN invariant 3), on CPU with tiny random-init models.

- `load_model` on a `transformers` save gives the same logits as `transformers` (fp32, tight tolerance),
  for Llama (GQA, llama3 RoPE scaling, tied / untied), Qwen2 (qkv bias) and Qwen3 (q/k norm, head_dim !=
  hidden / heads), with vocab sizes that are not multiples of 128 (padded rows); also through a tlt checkpoint.
- HF -> tlt -> HF is bit-exact for every tensor and dtype (bf16 included), tokenizer files travel along,
  and `transformers` loads the result (also when sharded).
- Bad inputs raise CheckpointError naming what is wrong; the CLI turns them into exit code 2.
- `load_model` never starts a process group: tests that load get the `single_process` fixture; the CLI
  starts (and tears down) its own.

    python -m pytest -q tests/test_hf.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from megatron_tlt import load_model
from megatron_tlt.checkpoint.convert import hf_to_tlt, tlt_to_hf
from megatron_tlt.cli import main
from megatron_tlt.config.schema import ModelConfig, RopeScalingConfig
from megatron_tlt.data.tokenizer import TOKENIZER_FILES, build_test_tokenizer
from megatron_tlt.errors import CheckpointError
from megatron_tlt.models.hf import (
    hf_config_from_model_config,
    model_config_from_hf,
    read_hf_dir,
    write_hf_dir,
)
from megatron_tlt.parallel import destroy_parallel, get_parallel_state, init_parallel

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
# name -> (HF config class, its kwargs, dtype)
CASES = {
    "llama_gqa_llama3rope": (
        LlamaConfig, dict(SMALL, vocab_size=200, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), torch.float32
    ),
    "llama_tied_mha": (LlamaConfig, dict(SMALL, vocab_size=131, num_key_value_heads=4, tie_word_embeddings=True), torch.float32),
    "qwen2_qkvbias_tied": (Qwen2Config, dict(SMALL, vocab_size=300, num_key_value_heads=2, tie_word_embeddings=True), torch.float32),
    "qwen3_qknorm_headdim": (Qwen3Config, dict(SMALL, vocab_size=257, num_key_value_heads=2, head_dim=16), torch.float32),
    "qwen2_bf16": (Qwen2Config, dict(SMALL, vocab_size=150, num_key_value_heads=2), torch.bfloat16),
}
FP32_CASES = [name for name, (_, _, dtype) in CASES.items() if dtype == torch.float32]
SEQ_LEN = 24  # > original_max_position_embeddings, so the llama3 scaling matters


@pytest.fixture
def single_process():
    """A single-process parallel state for `load_model` (which never starts one), torn down after."""
    yield init_parallel()
    destroy_parallel()


@pytest.fixture(scope="module")
def hf_case(request, tmp_path_factory):
    """(HF dir with weights + tokenizer, the transformers model, tokens [2, SEQ_LEN]) for CASES[request.param]."""
    config_cls, kwargs, dtype = CASES[request.param]
    torch.manual_seed(0)
    config = config_cls(**kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    # Re-initialise so that attention is far from uniform and biases / norm weights are not trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]) if "embed" not in name else 1.0)
    model.to(dtype)
    hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(hf_dir)
    build_test_tokenizer(hf_dir, vocab_size=min(config.vocab_size, 256))
    tokens = torch.randint(0, config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return hf_dir, model, tokens


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits  # [B, S, vocab_size]


def _from_pretrained(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()


def _tlt_logits(path, tokens):
    with torch.no_grad():
        return load_model(path, device="cpu")(tokens)  # [B, S, vocab_size]


def _assert_same_tensors(a: Path, b: Path):
    sa, sb = read_hf_dir(a)[1], read_hf_dir(b)[1]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("hf_case", FP32_CASES, indirect=True)
def test_logits_match_transformers(hf_case, single_process, tmp_path):
    hf_dir, model, tokens = hf_case
    ref = _hf_logits(model, tokens)
    ours = _tlt_logits(hf_dir, tokens)
    assert ours.shape == ref.shape
    # Same fp32 math in a different order (SDPA vs eager softmax): rounding-level differences only.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    hf_to_tlt(hf_dir, tmp_path / "ckpt")
    assert torch.equal(_tlt_logits(tmp_path / "ckpt", tokens), ours)


@pytest.mark.parametrize("hf_case", list(CASES), indirect=True)
def test_round_trip_is_bit_exact(hf_case, single_process, tmp_path):
    hf_dir, model, tokens = hf_case
    hf_to_tlt(hf_dir, tmp_path / "ckpt")
    tlt_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    _assert_same_tensors(hf_dir, tmp_path / "hf")
    carried = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    assert "tokenizer.json" in carried and "generation_config.json" in carried
    for name in carried:
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    back = _from_pretrained(tmp_path / "hf")
    assert back.dtype == model.dtype
    # Both loaded by transformers (a model cast with .to(bf16) also casts its RoPE buffer; a loaded one does not).
    assert torch.equal(_hf_logits(back, tokens), _hf_logits(_from_pretrained(hf_dir), tokens))


@pytest.mark.parametrize("hf_case", ["qwen2_qkvbias_tied"], indirect=True)
def test_sharded_hf_dir(hf_case, single_process, tmp_path):
    hf_dir, model, tokens = hf_case
    hf_config, state_dict = read_hf_dir(hf_dir)
    write_hf_dir(tmp_path, hf_config, state_dict, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_tensors(hf_dir, tmp_path)
    assert torch.equal(_hf_logits(_from_pretrained(tmp_path), tokens), _hf_logits(model, tokens))
    assert torch.equal(_tlt_logits(tmp_path, tokens), _tlt_logits(hf_dir, tokens))


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="llama", vocab_size=131, rope_theta=5e5, rope_scaling=RopeScalingConfig(factor=8.0), tie_word_embeddings=True),
        ModelConfig(arch="qwen2", qkv_bias=True, params_dtype="bfloat16", rms_norm_eps=1e-5),
        ModelConfig(arch="qwen3", qk_norm=True, head_dim=32, max_position_embeddings=40960),
    ],
)
def test_model_config_round_trip(cfg):
    assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg


@pytest.fixture
def hf_case_llama(tmp_path_factory):
    """A small HF dir (Llama, tied) that tests may break."""
    config = LlamaConfig(**SMALL, vocab_size=131, num_key_value_heads=2, tie_word_embeddings=True)
    hf_dir = tmp_path_factory.mktemp("llama") / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    build_test_tokenizer(hf_dir, vocab_size=131)
    return hf_dir


def test_cli_convert(hf_case_llama, tmp_path, capsys):
    hf_dir = hf_case_llama
    assert main(["convert", "hf-to-tlt", "--input", str(hf_dir), "--output", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "tlt-to-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    _assert_same_tensors(hf_dir, tmp_path / "hf")
    capsys.readouterr()
    # an existing, non-empty output is refused, as one line on stderr
    assert main(["convert", "tlt-to-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err


def test_load_model_needs_a_parallel_state_and_the_cli_starts_its_own(hf_case_llama, tmp_path):
    with pytest.raises(RuntimeError, match=r"init_parallel\(\) first"):
        load_model(hf_case_llama)
    with pytest.raises(RuntimeError, match="not initialised"):  # load_model started none
        get_parallel_state()
    assert main(["convert", "hf-to-tlt", "--input", str(hf_case_llama), "--output", str(tmp_path / "ckpt")]) == 0
    with pytest.raises(RuntimeError, match="not initialised"):  # the CLI tore down the state it started
        get_parallel_state()
    state = init_parallel()
    try:  # a caller's state is used, and left alone
        assert main(["convert", "hf-to-tlt", "--input", str(hf_case_llama), "--output", str(tmp_path / "ckpt2")]) == 0
        assert get_parallel_state() is state
    finally:
        destroy_parallel()


def _edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture(hf_case_llama, single_process):
    _edit_config(hf_case_llama, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model(hf_case_llama)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]}, "sliding"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, "sliding"),
        ({"dtype": "float64"}, "dtype"),
        ({"vocab_size": None}, "vocab_size"),  # None: the key is removed
    ],
)
def test_unsupported_features_are_named(changes, key):
    hf_config = hf_config_from_model_config(ModelConfig(arch="llama"))
    for k, v in changes.items():
        hf_config.pop(k) if v is None else hf_config.__setitem__(k, v)
    with pytest.raises(CheckpointError, match=key):
        model_config_from_hf(hf_config)


def test_truncated_safetensors(hf_case_llama, single_process, capsys):
    weights = hf_case_llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(hf_case_llama)
    assert main(["convert", "hf-to-tlt", "--input", str(hf_case_llama), "--output", str(hf_case_llama.parent / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err
    assert not (hf_case_llama.parent / "ckpt").exists()


def test_missing_config_and_neither(hf_case_llama, single_process, tmp_path):
    (hf_case_llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_dir(hf_case_llama)
    with pytest.raises(CheckpointError, match="neither"):
        load_model(hf_case_llama)
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "does_not_exist")


def test_shape_mismatch_names_the_tensor(hf_case_llama, single_process):
    _edit_config(hf_case_llama, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.\w+_proj\.weight"):
        load_model(hf_case_llama)
