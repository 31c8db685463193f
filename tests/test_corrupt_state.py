"""Issue 16 item 6: corrupt state. Checkpoints carry a sha256 manifest (in COMPLETE, written at publish) that is
verified at load; a resume falls back to the newest checkpoint that verifies, logs what it skipped and why,
moves the broken ones aside (so a later save of that step is not refused and no resume trips over them again),
and cleans (or recovers) the temporaries of interrupted saves; a garbled model_config.yaml is a CheckpointError
naming the file."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from megatron_tlt.checkpoint import publish
from megatron_tlt.checkpoint.convert import tlt_to_hf
from megatron_tlt.checkpoint.dcp import (
    CONFIG_FILE, load_checkpoint, load_full_state_dict_from_checkpoint, read_model_config, save_checkpoint,
)
from megatron_tlt.checkpoint.loading import load_model
from megatron_tlt.config import ModelConfig
from megatron_tlt.errors import CheckpointError
from megatron_tlt.parallel.state import destroy_parallel, init_parallel
from megatron_tlt.step.checkpointing import open_run_dir

CFG = ModelConfig(vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_attention_heads=4, num_kv_heads=2)


@pytest.fixture
def ps():
    torch.set_num_threads(1)
    yield init_parallel()
    destroy_parallel()


def _model(seed=0):
    from megatron_tlt.models.transformer import Policy

    torch.manual_seed(seed)
    return Policy(CFG, tp_group=init_parallel().tp_group)


def _save(path, step, seed=0):
    return save_checkpoint(path, _model(seed), CFG, meta={"step": step})


def _shard(path):
    return max((path / "model").glob("*.distcp"), key=lambda f: f.stat().st_size)


def _flip_16_bytes(f):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 16] = bytes(b ^ 0xFF for b in data[mid: mid + 16])
    f.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_not_loaded_as_nan(tmp_path, ps):
    path = _save(tmp_path / "ck", 1)
    marker = json.loads((path / publish.COMPLETE).read_text())
    assert set(marker["files"]) >= {CONFIG_FILE, "meta.json"} and any(k.startswith("model/") for k in marker["files"])
    _flip_16_bytes(_shard(path))
    for load in (lambda: load_checkpoint(path, _model(1)), lambda: load_full_state_dict_from_checkpoint(path),
                 lambda: load_model(path)):
        with pytest.raises(CheckpointError, match=r"\.distcp is corrupt: its sha256 differs from the one written at save"):
            load()


def test_a_drafter_directory_with_flipped_bytes_is_refused(tmp_path, ps):
    from megatron_tlt.drafter import Drafter
    from megatron_tlt.drafter.io import WEIGHTS_FILE, load_drafter, save_drafter

    policy = _model()
    path = save_drafter(tmp_path / "drafter", Drafter(policy))
    load_drafter(path, policy)  # verifies
    _flip_16_bytes(path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="drafter.safetensors is corrupt: its sha256 differs"):
        load_drafter(path, policy)


def test_garbled_model_config_is_a_checkpoint_error_naming_the_file(tmp_path, ps):
    path = _save(tmp_path / "ck", 1)
    (path / CONFIG_FILE).write_text("arch: llama\nhidden_size: [32,\n")
    expected = rf"{path / CONFIG_FILE}:\d+: malformed YAML"
    for call in (lambda: read_model_config(path), lambda: load_model(path), lambda: tlt_to_hf(path, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match=expected):
            call()
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}"):  # the checksum or the parse, naming the file
        load_checkpoint(path, _model())


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, ps, caplog):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _save(ckpts / f"step_{step}", step, seed=step)
    _flip_16_bytes(_shard(ckpts / "step_5"))                               # flipped bytes
    shard = _shard(ckpts / "step_4")
    shard.write_bytes(shard.read_bytes()[:100])                              # truncated shard
    (ckpts / "step_3" / publish.COMPLETE).unlink()                           # a crash between rename and marker
    (ckpts / "step_6").mkdir()                                               # a user's partial copy
    shutil.copytree(ckpts / "step_2" / "model", ckpts / "step_6" / "model")
    shutil.copytree(ckpts / "step_1", ckpts / "step_7.tmp-0badc0de")         # interrupted saves (no marker yet)
    (ckpts / "step_7.tmp-0badc0de" / publish.COMPLETE).unlink()
    (ckpts / "step_2.tmp-1234abcd").mkdir()
    shutil.copytree(ckpts / "step_1", ckpts / "step_8")                      # a complete checkpoint, renamed

    with caplog.at_level(logging.WARNING):
        chosen = open_run_dir(run, "auto", False, steps=10)
    assert chosen == ckpts / "step_2"
    log = caplog.text
    assert "skipping checkpoint" in log and "step_6" in log and "no valid COMPLETE marker" in log
    assert "step_5" in log and "is corrupt: its sha256 differs" in log
    assert "step_4" in log and "truncated" in log
    assert "step_3" in log
    assert "resuming from" in log and "the newest checkpoint that verifies" in log
    assert "removed" in log and "step_2.tmp-1234abcd" in log and "step_7.tmp-0badc0de" in log
    assert "step_8 holds the state after step 1, not 8" in log
    assert sorted(p.name for p in ckpts.iterdir()) == ["skipped", "step_1", "step_2"]
    assert sorted(p.name for p in (ckpts / "skipped").iterdir()) == ["step_3", "step_4", "step_5", "step_6", "step_8"]
    assert not list(ckpts.glob("*.tmp-*"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a second resume skips nothing: no livelock over the same dirs
        assert open_run_dir(run, "auto", False, steps=10) == chosen
    assert "skipping" not in caplog.text
    _save(ckpts / "step_3", 3)  # the step a resume reaches next is saved again (not "refusing to replace")
    assert open_run_dir(run, "true", False, steps=10) == ckpts / "step_3"


def test_interrupted_swap_is_recovered(tmp_path, ps, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    _save(ckpts / "step_1", 1)
    _save(ckpts / "step_2", 2)
    (ckpts / "step_2").rename(ckpts / "step_2.tmp-aa11bb22")  # the new copy, complete, not yet renamed in
    with caplog.at_level(logging.WARNING):
        assert open_run_dir(tmp_path / "run", "auto", False, steps=10) == ckpts / "step_2"
    assert "recovered" in caplog.text


def test_resume_true_without_a_verifying_checkpoint_is_a_clear_error(tmp_path, ps):
    ckpts = tmp_path / "run" / "checkpoints"
    _save(ckpts / "step_1", 1)
    _flip_16_bytes(_shard(ckpts / "step_1"))
    with pytest.raises(CheckpointError, match=r"run.resume=true but .*checkpoints holds no checkpoint that verifies "
                                              r"\(skipped: step_1: .*is corrupt"):
        open_run_dir(tmp_path / "run", "true", False, steps=10)
    # nothing is deleted: the broken checkpoint is kept aside for inspection
    assert (ckpts / "skipped" / "step_1" / "model").is_dir()


def _two_rank_worker(rank: int, world_size: int, run: str) -> None:
    from pathlib import Path

    from megatron_tlt.errors import UserError

    assert open_run_dir(Path(run), "auto", False, steps=10) == Path(run) / "checkpoints" / "step_1"  # rank 0 decides
    try:
        open_run_dir(Path(run), "false", False, steps=10)
    except UserError as e:  # every rank raises rank 0's error: none waits in a later collective
        assert "holds another run" in str(e)
    else:
        raise AssertionError(f"rank {rank}: no error")


def test_every_rank_gets_rank0s_decision(tmp_path, ps):
    from dist_utils import run_distributed

    ckpts = tmp_path / "run" / "checkpoints"
    _save(ckpts / "step_1", 1)
    _save(ckpts / "step_2", 2)
    _flip_16_bytes(_shard(ckpts / "step_2"))
    run_distributed(_two_rank_worker, world_size=2, args=(str(tmp_path / "run"),))
    assert (ckpts / "skipped" / "step_2").is_dir()
