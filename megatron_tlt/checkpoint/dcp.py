"""Sharded, atomic megatron_tlt checkpoints with `torch.distributed.checkpoint` (DCP), loadable at any TP degree.

Why: a training job must be able to resume (or be converted to HF) at a different tensor-parallel degree
than it was saved at, and a crash during a save must never leave a checkpoint that loads half-written.

How: every parameter is saved as its full-shape logical tensor. A TP-sharded parameter becomes a DTensor
with `Shard(partition_dim)` on a 1-D DeviceMesh over the TP group, so each rank writes only its slice and
DCP records the global offsets; replicated parameters are plain tensors, and DCP's save planner writes a
tensor that several ranks hold (replicated params, data-parallel replicas of a shard) only once. Loading
builds the same DTensor views over the model's parameters at the *current* TP degree, and DCP reads the
overlapping chunks straight into them. Tensors keep their saved dtype (bf16 round-trips bit-exact).
Optimizer state (`optimizer_state`) is keyed `<param name>/<key>` the same way; under ZeRO (optim.distributed)
a rank holds the state of the parameters it owns only, so it saves that shard and loads just those keys, at
any DP size.

Layout of a checkpoint directory (a contract other code relies on):

    CKPT_DIR/
      model_config.yaml   the ModelConfig (megatron_tlt.config.to_yaml)
      model/              DCP files of the model state
      <name>/             further DCP states passed as `states={name: state_dict}`, e.g. "optimizer"
      meta.json           small JSON user metadata, e.g. {"step": 10} (optional)
      <file>              extra files copied in with `files={name: source}`, e.g. tokenizer files
      COMPLETE            written last: {"format": "megatron_tlt/1", ...}

Atomicity (`checkpoint.publish`, shared with converted checkpoints and drafter directories): all ranks
write into a sibling `CKPT_DIR.tmp-<random>`; after a barrier, rank 0 fsyncs it, writes COMPLETE, moves an
existing checkpoint aside, renames the new one in and only then deletes the old one. Loaders accept only
directories with COMPLETE of this format, so stale `*.tmp-*` directories from a crash are ignored.

    save_checkpoint("runs/x/step_10", model, cfg.model, states={"optimizer": opt.state_dict()}, meta={"step": 10})
    meta = load_checkpoint("runs/x/step_10", model, states={"optimizer": sd})  # sd loaded in place
"""
from __future__ import annotations

import json
import secrets
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard

from megatron_tlt.checkpoint.publish import (
    COMPLETE,
    broadcast_object,
    check_replaceable,
    copy_durable,
    discard,
    is_distributed,
    on_rank0,
    publish,
    rank,
    require_complete,
    tmp_sibling,
    verify_files,
    write_durable,
)
from megatron_tlt.config import ModelConfig, to_yaml
from megatron_tlt.config.loader import ConfigError, load_config
from megatron_tlt.errors import CheckpointError
from megatron_tlt.models.pipeline import PolicyStage
from megatron_tlt.parallel.sharding import full_shape, named_shard_specs

FORMAT = "megatron_tlt/1"
WHAT = "megatron_tlt checkpoint"  # how errors name one
CONFIG_FILE = "model_config.yaml"
META_FILE = "meta.json"
MODEL_DIR = "model"
_RESERVED = {COMPLETE, CONFIG_FILE, META_FILE, MODEL_DIR}


# ---- DCP calls, with errors wrapped ----
def _summary(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException carries per-rank tracebacks, keep the first cause."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = next(iter(e.failures.items()))
        return f"rank {rank}: {_summary(exc)}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _dcp_save(state: dict, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, sync_files=True))


def _dcp_load(state: dict, directory: Path, no_dist: bool = False) -> None:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"could not read checkpoint state {directory}: {_summary(e)}") from e


def _read_metadata(directory: Path) -> Metadata:
    """DCP metadata of one state directory, after checking that every data file it names is present and whole."""
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"'{directory.name}' is not in the checkpoint {directory.parent} (no DCP .metadata file)")
    try:
        md = dcp.FileSystemReader(directory).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint state {directory} has unreadable DCP metadata: {_summary(e)}") from e
    needed: dict[str, int] = {}  # data file -> bytes it must hold
    for info in md.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size < size:
            raise CheckpointError(f"checkpoint file {f} is truncated ({f.stat().st_size} bytes, expected >= {size})")
    return md


# ---- the model as full-shape logical tensors ----
def _tp_mesh(model: nn.Module, tp_group) -> Optional[DeviceMesh]:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return None
    return DeviceMesh.from_group(tp_group, device_type=next(model.parameters()).device.type)


def _logical(t: torch.Tensor, mesh: Optional[DeviceMesh], dim: Optional[int]) -> torch.Tensor:
    """A local shard as a full-shape logical tensor: DTensor Shard(dim) over the TP mesh, else itself."""
    return t if mesh is None or dim is None else DTensor.from_local(t, mesh, [Shard(dim)], run_check=False)


def module_state(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """name -> a view of each parameter: DTensor Shard(partition_dim) over the TP mesh if sharded, else plain."""
    mesh = _tp_mesh(model, tp_group)
    return {name: _logical(p.detach(), mesh, d) for name, p, d in named_shard_specs(model)}


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: under ZeRO (`optim.distributed`) the local optimizer of the
    parameters this DP rank owns, else `optimizer` itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tp_group=None) -> dict[str, Any]:
    """The optimizer's per-parameter state on this rank keyed `<param name>/<key>`, TP-sharded tensors as
    full-shape logical views (so it reshards like the model), for `save_checkpoint(states={"optimizer": ...})`
    and in-place `load_checkpoint`. Under ZeRO only the parameters this DP rank owns have keys: each rank saves
    its shard and loads just those keys, so the state reshards over DP too. Every parameter's state must exist:
    call `init_adam_state` before loading."""
    tp_group = tp_group if tp_group is not None else getattr(model, "tp_group", None)
    mesh = _tp_mesh(model, tp_group)
    local = local_optimizer(optimizer).state
    state = {}
    for name, p, d in named_shard_specs(model):
        for key, value in local.get(p, {}).items():
            sharded = torch.is_tensor(value) and value.shape == p.shape
            state[f"{name}/{key}"] = _logical(value, mesh, d) if sharded else value
    return state


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate Adam/AdamW state (step 0, zero moments) for every parameter of this rank's optimizer (under
    ZeRO: those it owns) that has none, so a checkpoint can be loaded into it in place."""
    local = local_optimizer(optimizer)
    for group in local.param_groups:
        for p in group["params"]:
            st = local.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _check_model_shapes(md: Metadata, model: nn.Module, tp_size: int, directory: Path) -> None:
    saved = {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    want = {name: full_shape(p, tp_size) for name, p, _ in named_shard_specs(model)}
    problems = [f"'{n}' is not in the checkpoint" for n in want if n not in saved]
    problems += [
        f"'{n}' has shape {saved[n]} in the checkpoint but {s} in the model"
        for n, s in want.items()
        if n in saved and saved[n] != s
    ]
    if not isinstance(model, PolicyStage):  # a pipeline stage holds a part of the stored model
        problems += [f"'{n}' is in the checkpoint but not in the model" for n in saved if n not in want]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"checkpoint {directory.parent} does not match the model: " + "; ".join(problems[:8]) + more)


# ---- public API ----
def is_tlt_checkpoint(path) -> bool:
    """True for a directory with a COMPLETE marker (a save that finished)."""
    p = Path(path)
    return p.is_dir() and (p / COMPLETE).is_file()


def read_model_config(path) -> ModelConfig:
    p = require_complete(path, FORMAT, WHAT)
    if not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"checkpoint {p} has no {CONFIG_FILE}")
    try:
        return load_config(p / CONFIG_FILE, schema=ModelConfig)
    except ConfigError as e:  # malformed YAML names file:line already; a bad value names its key
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(p / CONFIG_FILE)) else f"{p / CONFIG_FILE}: {msg}") from None


def _write_small_files(tmp: Path, path: Path, model_config: ModelConfig, meta, files) -> None:
    check_replaceable(path, FORMAT, WHAT)
    tmp.mkdir(parents=True)
    write_durable(tmp / CONFIG_FILE, to_yaml(model_config))
    if meta is not None:
        write_durable(tmp / META_FILE, json.dumps(meta, indent=1))
    for name, src in files.items():
        copy_durable(Path(src), tmp / name)


def save_checkpoint(
    path,
    model: nn.Module,
    model_config: ModelConfig,
    *,
    tp_group=None,
    states: Optional[dict[str, dict]] = None,
    meta: Optional[dict] = None,
    files: Optional[dict[str, Path]] = None,
) -> Path:
    """Save `model` (possibly TP-sharded; tp_group defaults to `model.tp_group`) and the named `states` atomically.

    Every rank must call this. `states` hold plain tensors and other picklable values, taken as replicated
    across ranks unless they are DTensors. Returns `path`.
    """
    path = Path(path)
    states, files = states or {}, files or {}
    clash = sorted((set(states) | set(files)) & _RESERVED) + sorted(set(states) & set(files))
    if clash:
        raise CheckpointError(f"checkpoint entry names {clash} are reserved or used twice")
    tp_group = tp_group if tp_group is not None else getattr(model, "tp_group", None)
    tmp = tmp_sibling(path, broadcast_object(secrets.token_hex(4)))
    try:
        on_rank0(_write_small_files, tmp, path, model_config, meta, files)
        _dcp_save(module_state(model, tp_group), tmp / MODEL_DIR)
        for name, state in states.items():
            _dcp_save(state, tmp / name)
        if is_distributed():
            dist.barrier()
        info = {"saved_tp_size": 1 if tp_group is None else dist.get_world_size(tp_group), "states": sorted(states)}
        on_rank0(publish, tmp, path, FORMAT, info)
    except BaseException:
        if rank() == 0:
            discard(tmp)
        raise
    return path


def verify_checkpoint(path, states=()) -> Path:
    """`path` if it is a complete checkpoint whose config, meta, model and named `states` match the checksums
    written at save (and whose model_config.yaml parses); else a CheckpointError naming the file and why."""
    p = require_complete(path, FORMAT, WHAT)
    verify_files(p, [CONFIG_FILE, META_FILE, MODEL_DIR, *states])
    read_model_config(p)
    return p


def _verify_on_rank0(path, states) -> None:
    """verify_checkpoint in one process (every rank would read every byte otherwise); all ranks raise its error."""
    error = None
    if rank() == 0:
        try:
            verify_checkpoint(path, states)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)


def load_checkpoint(path, model: nn.Module, *, tp_group=None, states: Optional[dict[str, dict]] = None,
                    verify: bool = True) -> dict:
    """Load the model (at its current TP degree, whatever it was saved at) and the named `states` in place.

    `states` must have the saved structure with tensors allocated (e.g. an optimizer state dict whose state
    is initialised); DCP fills them. Returns the checkpoint's meta.json (empty if none). The files read are
    first checked against the checksums written at save (on rank 0; `verify=False` when the caller just did).
    Every rank of the default group must call it.
    """
    p = require_complete(path, FORMAT, WHAT)
    if verify:
        _verify_on_rank0(p, list(states or {}))
    read_model_config(p)
    tp_group = tp_group if tp_group is not None else getattr(model, "tp_group", None)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    _check_model_shapes(_read_metadata(p / MODEL_DIR), model, tp_size, p / MODEL_DIR)
    states = states or {}
    for name in states:
        _read_metadata(p / name)
    with torch.no_grad():
        _dcp_load(module_state(model, tp_group), p / MODEL_DIR)
    for name, state in states.items():
        _dcp_load(state, p / name)
    if not (p / META_FILE).is_file():
        return {}
    try:
        return json.loads((p / META_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{p / META_FILE} is not valid JSON: {e}") from None


def load_full_state_dict_from_checkpoint(path, name: str = MODEL_DIR) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the model (or of the saved state `name`, e.g. "drafter"), in their saved
    dtypes, read in this process alone (no process group)."""
    p = require_complete(path, FORMAT, WHAT)
    verify_files(p, [name])
    md = _read_metadata(p / name)
    full = {
        name: torch.empty(m.size, dtype=m.properties.dtype)
        for name, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    _dcp_load(full, p / name, no_dist=True)
    return full
