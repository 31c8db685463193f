"""DCP checkpoints: bit-exact round trips, TP resharding across real gloo processes, atomicity, clear errors;
the atomic-publish scheme (checkpoint.publish) that run checkpoints, converted checkpoints and drafter
directories share."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_tlt.checkpoint import dcp as ckpt
from megatron_tlt.checkpoint import publish
from megatron_tlt.checkpoint.dcp import (
    is_tlt_checkpoint,
    load_checkpoint,
    load_full_state_dict_from_checkpoint,
    read_model_config,
    save_checkpoint,
)
from megatron_tlt.config import ModelConfig, ParallelConfig
from megatron_tlt.errors import CheckpointError
from megatron_tlt.parallel.sharding import gather_full_state_dict
from megatron_tlt.parallel.state import destroy_parallel, get_parallel_state, init_parallel
from dist_utils import run_distributed

CFG = dict(
    vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2
)


def _model(seed: int, tp_group=None, **overrides):
    from megatron_tlt.models.transformer import Policy

    cfg = ModelConfig(**{**CFG, **overrides})
    torch.manual_seed(seed)
    return Policy(cfg, tp_group=tp_group or get_parallel_state().tp_group), cfg


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.fixture
def single_rank():
    yield init_parallel()
    destroy_parallel()


# ---- 1. single process round trip ----
def _adamw_after_one_step(model, seed: int) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    model(torch.randint(0, 96, (2, 6))).float().pow(2).mean().backward()
    opt.step()
    return opt


def test_round_trip_model_meta_and_states(tmp_path, single_rank):
    model, cfg = _model(0)
    opt = _adamw_after_one_step(model, seed=0)
    misc = {"rng": torch.get_rng_state(), "data": {"epoch": 2, "offset": torch.tensor(17)}}
    path = save_checkpoint(tmp_path / "ck", model, cfg, states={"optimizer": opt.state_dict(), "misc": misc}, meta={"step": 10})
    assert is_tlt_checkpoint(path) and read_model_config(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind

    fresh, _ = _model(1)
    fresh_opt = _adamw_after_one_step(fresh, seed=1)  # state allocated, values differ
    assert not torch.equal(fresh.embed_tokens.weight, model.embed_tokens.weight)
    opt_sd = fresh_opt.state_dict()
    misc_in = {"rng": torch.zeros_like(misc["rng"]), "data": {"epoch": 0, "offset": torch.tensor(0)}}
    meta = load_checkpoint(path, fresh, states={"optimizer": opt_sd, "misc": misc_in})
    fresh_opt.load_state_dict(opt_sd)

    assert meta == {"step": 10}
    _assert_same(_params(fresh), _params(model))
    want, got = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i in want:
        _assert_same(got[i], want[i])
    assert torch.equal(misc_in["rng"], misc["rng"]) and misc_in["data"]["epoch"] == 2 and int(misc_in["data"]["offset"]) == 17
    _assert_same(load_full_state_dict_from_checkpoint(path), _params(model))


def test_bf16_round_trip_bit_exact(tmp_path, single_rank):
    model, cfg = _model(0, params_dtype="bfloat16")
    path = save_checkpoint(tmp_path / "ck", model, cfg)
    fresh, _ = _model(1, params_dtype="bfloat16")
    assert load_checkpoint(path, fresh) == {}
    _assert_same(_params(fresh), _params(model))
    full = load_full_state_dict_from_checkpoint(path)
    assert full["lm_head.weight"].dtype == torch.bfloat16
    _assert_same(full, _params(model))


# ---- 2. resharding across real processes ----
def _reshard_worker(rank: int, world_size: int, out: str) -> None:
    import torch.distributed as dist

    out = Path(out)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))

    # TP=2 save; the full weights go to a .pt for the single-process TP=1 load in the parent.
    tp2, cfg = _model(0, ps.tp_group)
    save_checkpoint(out / "tp2", tp2, cfg, meta={"tp": 2})
    full = gather_full_state_dict(tp2, ps.tp_group)  # a collective: every rank gathers
    if rank == 0:
        torch.save(full, out / "tp2_full.pt")

    # TP=1 with DP=2 (both ranks hold the full model and both save), loaded back at TP=2.
    singletons = [dist.new_group([r]) for r in range(world_size)]
    tp1, _ = _model(1, singletons[rank])
    save_checkpoint(out / "dp2", tp1, cfg)
    fresh_tp2, _ = _model(2, ps.tp_group)
    assert load_checkpoint(out / "dp2", fresh_tp2) == {}
    _assert_same(gather_full_state_dict(fresh_tp2, ps.tp_group), _params(tp1))


def test_reshard_tp2_to_tp1_and_dp2_to_tp2(tmp_path):
    run_distributed(_reshard_worker, world_size=2, args=(str(tmp_path),))

    # DP replicas are written once: the data files hold one copy of the model (plus per-tensor headers), not two.
    n_bytes = sum(f.stat().st_size for f in (tmp_path / "dp2" / "model").glob("*.distcp"))
    full = load_full_state_dict_from_checkpoint(tmp_path / "dp2")
    model_bytes = sum(t.numel() * t.element_size() for t in full.values())
    assert model_bytes <= n_bytes < 2 * model_bytes

    init_parallel()
    try:
        tp1, _ = _model(3)
        assert load_checkpoint(tmp_path / "tp2", tp1) == {"tp": 2}
        want = torch.load(tmp_path / "tp2_full.pt")
        _assert_same(_params(tp1), want)
        _assert_same(load_full_state_dict_from_checkpoint(tmp_path / "tp2"), want)
    finally:
        destroy_parallel()


# ---- 3. atomicity ----
def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_failed_save_leaves_no_checkpoint_or_the_old_one(tmp_path, single_rank, monkeypatch):
    old, cfg = _model(0)
    new, _ = _model(1)
    path = tmp_path / "ck"

    def disk_full(*args, **kw):
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_dcp_save", disk_full)
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(path, old, cfg)
    assert not path.exists() and _siblings(path) == []
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path, new)

    save_checkpoint(path, old, cfg, meta={"v": "old"})
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_dcp_save", disk_full)
        with pytest.raises(OSError):
            save_checkpoint(path, new, cfg, meta={"v": "new"})
    assert load_checkpoint(path, new) == {"v": "old"} and _siblings(path) == []
    _assert_same(_params(new), _params(old))


def test_crash_before_complete_keeps_old_checkpoint(tmp_path, single_rank, monkeypatch):
    """A hard crash (no cleanup runs) just before COMPLETE: the temp dir holds everything else and must not load."""
    old, cfg = _model(0)
    new, _ = _model(1)
    path = save_checkpoint(tmp_path / "ck", old, cfg, meta={"v": "old"})
    write_durable = publish.write_durable

    def crash_on_complete(file: Path, text: str) -> None:
        if file.name == ckpt.COMPLETE:
            raise KeyboardInterrupt
        write_durable(file, text)

    monkeypatch.setattr(publish, "write_durable", crash_on_complete)
    monkeypatch.setattr(ckpt, "discard", lambda tmp: None)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, new, cfg, meta={"v": "new"})
    (stale,) = tmp_path.glob("ck.tmp-*")
    assert (stale / "model" / ".metadata").is_file() and not is_tlt_checkpoint(stale)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(stale, new)
    assert load_checkpoint(path, new) == {"v": "old"}


def test_failed_swap_puts_old_checkpoint_back(tmp_path, single_rank, monkeypatch):
    old, cfg = _model(0)
    new, _ = _model(1)
    path = save_checkpoint(tmp_path / "ck", old, cfg, meta={"v": "old"})
    rename = os.rename

    def fail_moving_new_in(src, dst):
        if ".tmp-" in Path(src).name and not str(src).endswith("-old") and Path(dst) == path:
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_moving_new_in)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, new, cfg, meta={"v": "new"})
    monkeypatch.undo()
    assert load_checkpoint(path, new) == {"v": "old"} and _siblings(path) == []
    assert save_checkpoint(path, new, cfg, meta={"v": "new"}) == path  # a later save replaces it
    assert load_checkpoint(path, old) == {"v": "new"} and _siblings(path) == []


# ---- 4. bad input ----
def test_bad_checkpoints_raise_clear_errors(tmp_path, single_rank):
    model, cfg = _model(0)
    path = save_checkpoint(tmp_path / "ck", model, cfg)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", model)
    with pytest.raises(CheckpointError, match="not in the checkpoint"):  # a state that was never saved
        load_checkpoint(path, model, states={"optimizer": {"x": torch.zeros(1)}})

    wide, _ = _model(0, hidden_size=48, num_attention_heads=6, num_kv_heads=2)
    with pytest.raises(CheckpointError, match=r"'embed_tokens.weight' has shape \(96, 32\) in the checkpoint but \(96, 48\)"):
        load_checkpoint(path, wide)

    (shard,) = (path / "model").glob("*.distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_full_state_dict_from_checkpoint(path)

    (path / ckpt.COMPLETE).unlink()
    assert not is_tlt_checkpoint(path)
    for load in (lambda: load_checkpoint(path, model), lambda: read_model_config(path)):
        with pytest.raises(CheckpointError, match="incomplete"):
            load()
    with pytest.raises(CheckpointError, match="refusing to replace"):  # not a complete checkpoint: never deleted
        save_checkpoint(path, model, cfg)


# ---- 5. the publish scheme ----
def test_staged_publishes_with_marker_replaces_and_discards(tmp_path):
    path = tmp_path / "out"
    with publish.staged(path, "thing/1", what="thing", info={"n": 1}) as tmp:
        publish.write_durable(tmp / "a.txt", "old")
    marker = json.loads((path / publish.COMPLETE).read_text())
    assert marker["format"] == "thing/1" and marker["n"] == 1 and "saved_at" in marker
    assert publish.require_complete(path, "thing/1", "thing") == path and _siblings(path) == []
    with pytest.raises(CheckpointError, match="has format 'thing/1' in COMPLETE; expected 'other/1'"):
        publish.require_complete(path, "other/1", "other")

    with pytest.raises(OSError, match="disk full"):
        with publish.staged(path, "thing/1", what="thing") as tmp:
            (tmp / "a.txt").write_text("new, half-written")
            raise OSError("disk full")
    assert (path / "a.txt").read_text() == "old" and _siblings(path) == []  # the old copy stays, no temp dir left

    with publish.staged(path, "thing/1", what="thing") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (path / "a.txt").read_text() == "new" and _siblings(path) == []

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not a thing .*refusing to replace it"):
        with publish.staged(foreign, "thing/1", what="thing"):
            pass
    assert (foreign / "data").read_text() == "keep me"

    with publish.staged(tmp_path / "hf") as tmp:  # a foreign layout: published without a marker
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json"]


def test_failed_conversion_leaves_no_output(tmp_path, single_rank, monkeypatch):
    from megatron_tlt.checkpoint import convert

    model, cfg = _model(0)
    path = save_checkpoint(tmp_path / "ck", model, cfg)

    def write_then_fail(out, *args, **kw):
        Path(out, "config.json").write_text("{}")
        raise OSError("No space left on device")

    monkeypatch.setattr(convert, "write_hf_dir", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        convert.tlt_to_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _rank0_failure_worker(rank: int, world_size: int) -> None:
    def fail(x):
        raise ValueError(f"bad {x}")

    try:
        publish.on_rank0(fail, 7)
    except CheckpointError as e:  # (a ValueError too, so caught first)
        assert rank == 1 and "rank 0 failed while writing: ValueError: bad 7" in str(e)
    except ValueError as e:
        assert rank == 0 and str(e) == "bad 7"
    else:
        raise AssertionError("on_rank0 did not raise")
    assert publish.broadcast_object(rank) == 0  # every rank left on_rank0: the next collective does not hang


def test_rank0_failure_raises_on_every_rank():
    run_distributed(_rank0_failure_worker, world_size=2)
