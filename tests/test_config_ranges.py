"""Issue 16 item 7: every numeric config value is range-checked at load, naming the key (never a late traceback
mid-run); malformed YAML is a one-line ConfigError naming the file and line."""
from __future__ import annotations

import pytest

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config import load_config
from megatron_tlt.config.loader import ConfigError


@pytest.mark.parametrize("override,message", [
    ("optim.micro_batch_tokens=0", "optim.micro_batch_tokens=0 is not supported; supported: an integer >= 1"),
    ("rollout.n=0", "rollout.n=0 is not supported; supported: an integer >= 1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0 is not supported; supported: an integer >= 1"),
    ("rollout.temperature=-1", "rollout.temperature=-1.0 is not supported; supported: a finite number >= 0"),
    ("rollout.temperature=nan", "rollout.temperature=nan is not supported"),
    ("run.prompts_per_step=0", "run.prompts_per_step=0 is not supported; supported: an integer >= 1"),
    ("run.steps=0", "run.steps=0 is not supported; supported: an integer >= 1"),
    ("rollout.top_p=0", "rollout.top_p=0.0 is not supported; supported: a finite number > 0 and <= 1"),
    ("rollout.top_k=-1", "rollout.top_k=-1"),
    ("rollout.kv_cache_gb=0", "rollout.kv_cache_gb=0.0"),
    ("model.num_kv_heads=0", "model.num_kv_heads=0"),
    ("model.num_attention_heads=0", "model.num_attention_heads=0"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps=0.0"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens=0"),
    ("data.eval_examples=0", "data.eval_examples=0"),
    ("reward.timeout_s=0", "reward.timeout_s=0.0"),
    ("reward.num_workers=-1", "reward.num_workers=-1"),
    ("algo.clip_low=1.5", "algo.clip_low=1.5 is not supported; supported: a finite number >= 0 and < 1"),
    ("algo.kl_coef=-0.1", "algo.kl_coef=-0.1"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]=1.0"),
    ("optim.eps=0", "optim.eps=0.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0"),
    ("run.save_every=-1", "run.save_every=-1"),
    ("run.sft_batch=0", "run.sft_batch=0"),
    ("run.resume=maybe", "run.resume='maybe' is not supported; supported: auto, true, false"),
    ("drafter.lr=0", "drafter.lr=0.0 is not supported; supported: a finite number > 0"),
    ("drafter.buffer_gb=0", "drafter.buffer_gb=0.0"),
    ("drafter.micro_batch_tokens=1", "drafter.micro_batch_tokens=1 is not supported; supported: an integer >= 2"),
    ("drafter.warmup_steps=-1", "drafter.warmup_steps=-1"),
    ("drafter.warmup_prompts=0", "drafter.warmup_prompts=0"),
])
def test_numeric_values_are_range_checked_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_edge_values_that_make_sense_load():
    cfg = load_config(None, ["rollout.temperature=0", "rollout.top_k=0", "optim.grad_clip=0", "reward.num_workers=0",
                             "run.save_every=0", "algo.max_refill_rounds=0", "run.resume=true"])
    assert cfg.rollout.temperature == 0 and cfg.run.resume == "true"
    assert load_config(None, ["run.resume=false"]).run.resume == "false"
    assert load_config(None).run.resume == "auto" and load_config(None).run.overwrite is False
    with pytest.raises(ConfigError, match="cannot be combined with run.resume=true"):
        load_config(None, ["run.overwrite=true", "run.resume=true"])


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\n  dir: [runs/x\nmodel:\n  hidden_size: 32\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:\d+: malformed YAML \("):
        load_config(bad)
    (tmp_path / "bytes.yaml").write_bytes(b"run:\n  dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'bytes.yaml'}:2: not valid UTF-8"):
        load_config(tmp_path / "bytes.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"override 'run.steps=\[1,': the value is not valid YAML"):
        load_config(None, ["run.steps=[1,"])
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:" in err and "malformed YAML" in err and "Traceback" not in err
