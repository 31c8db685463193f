"""Strict configs: unknown keys and wrong types name the key (and the closest valid one); presets load."""
from pathlib import Path

import pytest

from megatron_tlt.cli import main
from megatron_tlt.config import ConfigError, load_config

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
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


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
