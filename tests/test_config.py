"""Strict configs: unknown keys and wrong types name the key (and the closest valid one); every enumerated
field is checked at load time against names defined in config/, which match the registries that implement
them; presets load; model.attention_backend reaches the packed attention and stays out of HF configs."""
import importlib.util
import inspect
from pathlib import Path

import pytest

from megatron_tlt.cli import main
from megatron_tlt.config import ConfigError, load_config
from megatron_tlt.config import schema

PRESETS = sorted((Path(__file__).parent.parent / "examples" / "configs").glob("*.yaml"))


def test_overrides_are_typed():
    cfg = load_config(None, ["model.num_layers=3", "optim.betas=[0.9,0.95]", "reward.fns=[{name: math, weight: 0.5}]"])
    assert cfg.model.num_layers == 3 and cfg.optim.betas == (0.9, 0.95) and cfg.reward.fns[0].weight == 0.5
    assert cfg.model.head_dim == cfg.model.hidden_size // cfg.model.num_attention_heads


@pytest.mark.parametrize("override, message", [
    ("model.num_layer=3", "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
    ("modle.hidden_size=3", "did you mean 'model'?"),
    ("reward.fns=[{nam: math}]", "unknown config key 'nam'; did you mean 'reward.fns[].name'?"),
    ("model.num_layers=abc", "bad value for config key 'model.num_layers'"),
    ("model.arch=gpt2", "supported: llama, qwen2, qwen3"),
    ("rollout.spec=fast", "rollout.spec='fast'"),
    ("rollout.cuda_graphs=fast", "rollout.cuda_graphs='fast'"),
    ("model.num_layers", "not of the form key=value"),
    ("parallel.seed=1", "unknown config key 'parallel.seed'"),  # removed: it was never read (run.seed is)
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("algo.advantage=ppo", "algo.advantage='ppo' is not supported; supported: grpo, drgrpo, rloo, reinforce_pp"),
    ("algo.aggregation=mean", "algo.aggregation='mean' is not supported; supported: token_mean, seq_mean_token_mean, "
                              "seq_mean_token_sum_norm"),
    ("algo.overlong=truncate", "algo.overlong='truncate' is not supported; supported: none, mask, penalty"),
    ("algo.dual_clip=1.0", "algo.dual_clip=1.0 is not supported; supported: a number > 1"),
    ("reward.fns=[{name: maths}]", "reward.fns[].name='maths' is not supported; supported: math, countdown, format or an import path"),
    ("reward.fns=[{name: 'my pkg:fn'}]", "reward.fns[].name='my pkg:fn' is not supported"),
    ("data.task=algebra", "data.task='algebra' is not supported; supported: arithmetic, countdown"),
    ("data.task_args={max_term: 3}", "data.task_args.max_term is not an argument of task 'arithmetic'; supported: max_terms, max_value"),
    ("model.attention_backend=flash", "model.attention_backend='flash' is not supported; supported: auto, flash_attn, "
                                      "torch_varlen, sdpa_segments"),
    ("model.rope_scaling={rope_type: yarn}", "model.rope_scaling.rope_type='yarn' is not supported; supported: llama3"),
    ("model.params_dtype=fp8", "model.params_dtype='fp8' is not supported; supported: float32, bfloat16, float16"),
    ("parallel.backend=mpi", "parallel.backend='mpi' is not supported; supported: auto, nccl, gloo"),
])
def test_enumerated_values_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_valid_enumerated_values_load():
    cfg = load_config(None, [
        "algo.advantage=reinforce_pp", "algo.aggregation=seq_mean_token_sum_norm", "algo.overlong=penalty", "algo.dual_clip=3",
        "reward.fns=[{name: format}, {name: 'my_pkg.rewards:score'}, {name: my_pkg.rewards.score}]",
        "data.task=countdown", "data.task_args={max_numbers: 4}", "model.attention_backend=sdpa_segments",
    ])
    assert (cfg.algo.advantage, cfg.algo.aggregation, cfg.algo.overlong, cfg.algo.dual_clip) == (
        "reinforce_pp", "seq_mean_token_sum_norm", "penalty", 3.0)
    assert [f.name for f in cfg.reward.fns] == ["format", "my_pkg.rewards:score", "my_pkg.rewards.score"]
    assert cfg.model.attention_backend == "sdpa_segments" and cfg.data.task_args == {"max_numbers": 4}
    assert load_config(None, ["data.task=null", "data.path=x.jsonl"]).data.task is None
    assert load_config(None).algo.dual_clip is None  # off by default


def test_enumerated_names_match_their_registries():
    """config/ cannot import the packages that implement its names, so this keeps the two lists equal."""
    from megatron_tlt.data.synthetic import TASKS
    from megatron_tlt.ops.attention import BACKENDS
    from megatron_tlt.rl.algorithms import ADVANTAGES, AGGREGATIONS, MIS_LEVELS, ROLLOUT_CORRECTIONS
    from megatron_tlt.rl.rewards import BUILTIN_REWARDS
    from megatron_tlt.ops.fp8 import GEMM_PATHS
    from megatron_tlt.rollout import DRAFT_MODES, PRECISIONS, SPEC_MODES
    from megatron_tlt.rollout.cuda_graphs import GRAPH_MODES

    assert sorted(schema.ADVANTAGE_ESTIMATORS) == sorted(ADVANTAGES)
    assert sorted(schema.LOSS_AGGREGATIONS) == sorted(AGGREGATIONS)
    assert sorted(schema.ROLLOUT_CORRECTIONS) == sorted(ROLLOUT_CORRECTIONS)
    assert sorted(schema.MIS_LEVELS) == sorted(MIS_LEVELS)
    assert sorted(schema.BUILTIN_REWARDS) == sorted(BUILTIN_REWARDS)
    assert sorted(schema.SPEC_MODES) == sorted(SPEC_MODES)
    assert sorted(schema.DRAFT_MODES) == sorted(DRAFT_MODES)
    assert sorted(schema.ROLLOUT_PRECISIONS) == sorted(PRECISIONS)
    assert sorted(schema.FP8_GEMMS) == sorted(("auto", *GEMM_PATHS))
    assert sorted(schema.CUDA_GRAPH_MODES) == sorted(("auto", *GRAPH_MODES))
    assert sorted(schema.ATTENTION_BACKENDS) == sorted(("auto", *BACKENDS))
    assert sorted(schema.SYNTHETIC_TASKS) == sorted(TASKS)
    for name, fn in TASKS.items():  # the task_args each generator takes after (n, seed)
        assert schema.SYNTHETIC_TASKS[name] == tuple(inspect.signature(fn).parameters)[2:], name


def test_attention_backend_reaches_packed_attention(one_thread):
    import torch

    from megatron_tlt.models.transformer import Policy
    from megatron_tlt.parallel import init_parallel

    tp_group = init_parallel().tp_group
    tokens, pos, cu = torch.arange(6)[None], torch.tensor([[0, 1, 2, 0, 1, 2]]), torch.tensor([0, 3, 6])
    out = {}
    for backend in ("auto", "sdpa_segments"):
        torch.manual_seed(0)
        model = Policy(schema.ModelConfig(attention_backend=backend), tp_group)
        out[backend] = model(tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=3)
    assert torch.equal(out["auto"], out["sdpa_segments"])  # auto is sdpa_segments on CPU
    if importlib.util.find_spec("flash_attn") is None:  # a named backend is used as is, not replaced by auto's choice
        model = Policy(schema.ModelConfig(attention_backend="flash_attn"), tp_group)
        with pytest.raises(RuntimeError, match="'flash_attn' needs the flash-attn package"):
            model(tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=3)


def test_hf_conversion_ignores_the_attention_backend():
    from megatron_tlt.models.hf import hf_config_from_model_config, model_config_from_hf

    hf_config = hf_config_from_model_config(schema.ModelConfig(attention_backend="sdpa_segments"))
    assert not any("attention_backend" in key or "attn_impl" in key for key in hf_config)
    assert model_config_from_hf(hf_config) == schema.ModelConfig()  # back to "auto"


def test_missing_values_must_be_set(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  path: ???\n")
    with pytest.raises(ConfigError, match="data.path"):
        load_config(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", ["data.path=x.jsonl"]).data.path == "x.jsonl"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load(preset):
    cfg = load_config(preset, ["data.path=x.jsonl", "run.model_path=/m"])
    assert cfg.run.steps > 0


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["train", "model.num_layer=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["megatron-tlt train: error: unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"]


def test_demo_settings_are_a_valid_config():
    from megatron_tlt.cli.demo import DEMO_SETTINGS

    cfg = load_config(None, DEMO_SETTINGS)
    assert cfg.run.dir == "runs/demo" and cfg.run.sft_steps > 0 and cfg.data.task_args == {"max_terms": 3, "max_value": 9}


def test_head_dim_is_derived_from_the_merged_sizes_unless_set():
    # the default model's head_dim (64 / 4) must not stick to a config that changes the sizes
    assert load_config(None, ["model.hidden_size=128"]).model.head_dim == 32
    assert load_config(None, ["model.hidden_size=128", "model.num_attention_heads=8", "model.num_kv_heads=8"]).model.head_dim == 16
    assert load_config(None, ["model.hidden_size=128", "model.head_dim=64"]).model.head_dim == 64


def test_layout_checks_wait_for_the_checkpoint_when_run_model_path_is_set():
    # the sizes come from run.model_path's config: checked when the model is built, not against the default model
    cfg = load_config(None, ["run.model_path=/models/qwen", "parallel.tensor_parallel_size=4"])
    assert cfg.parallel.tensor_parallel_size == 4
    with pytest.raises(ConfigError, match="num_kv_heads=2"):
        load_config(None, ["parallel.tensor_parallel_size=4"])
