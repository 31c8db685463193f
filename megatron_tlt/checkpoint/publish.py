"""Atomic publication of output directories: run checkpoints, converted checkpoints, drafter directories
and exports all appear whole or not at all.

Why: a crash, a full disk or a preemption in the middle of a save must never leave something at the
final path that a later run (or `transformers`, or a serving engine) would load half-written, and it
must never destroy the previous good copy. One scheme for every writer keeps that guarantee in one place.

How (`publish`):
1. the writer fills a sibling temporary directory `PATH.tmp-<random>` (`tmp_sibling`), on any number
   of ranks;
2. every file and directory under it is fsynced;
3. a `COMPLETE` marker naming the format (`{"format": "megatron_tlt/1", ..., "files": {relpath: [bytes,
   sha256]}, "saved_at": ...}`) is written last, durably; loaders of our own formats accept only a directory
   whose marker has their format (`require_complete`), and `verify_files` checks every file against the
   manifest (a flipped byte or a truncated shard is a CheckpointError naming the file, never NaN weights). Directories in a foreign layout (Hugging Face model dirs) get no marker: their
   readers do not know one, and for them the rename below is the commit;
4. an existing PATH is moved aside (`PATH.tmp-<random>-old`), the new directory renamed in, the parent
   fsynced, and only then the old copy deleted. At every instant PATH is the old directory, the new one,
   or absent; leftover `*.tmp-*` siblings of a crash are never read.

    with staged(out, FORMAT, what="drafter directory") as tmp:   # one writer
        write_durable(tmp / "config.json", text)
    # several ranks: tmp = tmp_sibling(path, broadcast_object(token)); ...; on_rank0(publish, tmp, path, FORMAT)

Collectives (`broadcast_object`, `on_rank0`) run on the default (world) group when torch.distributed
is initialised, and are no-ops in a single process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch.distributed as dist

from megatron_tlt.errors import CheckpointError

COMPLETE = "COMPLETE"
TMP_INFIX = ".tmp-"


# ---- ranks ----
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[..., Any], *args) -> None:
    """Run `fn(*args)` on rank 0 only; if it fails, every rank raises (rank 0 its own exception, the others a
    CheckpointError with its message), so no rank waits forever in a later collective. Every rank must call it."""
    error = None
    if rank() == 0:
        try:
            fn(*args)
        except Exception as e:
            error = e
    error_msg = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if error_msg is not None:
        raise CheckpointError(f"rank 0 failed while writing: {error_msg}")


# ---- durable files ----
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def copy_durable(src: Path, dst: Path) -> None:
    """Copy a file and fsync the copy."""
    shutil.copyfile(src, dst)
    fsync_path(dst)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, children before their directory."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


# ---- the file manifest (checksums written at publish, verified at load) ----
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(root: Path) -> dict[str, list]:
    """{relative path: [size in bytes, sha256]} of every file under `root` but the COMPLETE marker."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            f = Path(dirpath) / name
            rel = f.relative_to(root).as_posix()
            if rel != COMPLETE:
                out[rel] = [f.stat().st_size, _sha256(f)]
    return dict(sorted(out.items()))


def verify_files(path, names: Optional[Iterable[str]] = None) -> None:
    """Check the files of a published directory (those whose first path part is in `names`, or all) against
    the manifest in its COMPLETE marker: CheckpointError naming the first missing, resized or changed file.
    Directories published before manifests existed (no "files" in the marker) pass unchecked."""
    p = Path(path)
    try:
        manifest = json.loads((p / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{p / COMPLETE} is unreadable or not a JSON object") from None
    if manifest is None:
        return
    wanted = None if names is None else set(names)
    for rel, (size, digest) in manifest.items():
        if wanted is not None and rel.split("/", 1)[0] not in wanted:
            continue
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing (listed in {COMPLETE})")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt ({f.stat().st_size} bytes, {size} when saved)")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 differs from the one written at save")


def stale_temporaries(parent: Path) -> list[Path]:
    """`*.tmp-<token>` (and `*.tmp-<token>-old`) directories under `parent`: left by interrupted saves or swaps."""
    pattern = re.compile(r"^.+" + re.escape(TMP_INFIX) + r"[0-9a-f]+(-old)?$")
    return sorted(q for q in parent.iterdir() if pattern.match(q.name)) if parent.is_dir() else []


# ---- markers ----
def read_format(path) -> Optional[str]:
    """The format named in `path`'s COMPLETE marker; None without a (readable) marker."""
    try:
        fmt = json.loads((Path(path) / COMPLETE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) else None


def require_complete(path, fmt: str, what: str) -> Path:
    """`path` as a Path if it is a published `what` of format `fmt`, else a CheckpointError saying why
    (missing, naming stale interrupted saves; no marker; another format)."""
    p = Path(path)
    if not p.is_dir():
        stale = sorted(q.name for q in p.parent.glob(f"{p.name}{TMP_INFIX}*")) if p.parent.is_dir() else []
        hint = f" (interrupted saves, ignored: {', '.join(stale)})" if stale else ""
        raise CheckpointError(f"{what} {p} does not exist{hint}")
    found = read_format(p)
    if found is None:
        raise CheckpointError(
            f"{what} {p} is incomplete: no valid {COMPLETE} marker (the save was interrupted, or it is not a {what})"
        )
    if found != fmt:
        raise CheckpointError(f"{what} {p} has format {found!r} in {COMPLETE}; expected {fmt!r}")
    return p


def check_replaceable(path: Path, fmt: str, what: str) -> None:
    """Refuse to publish over anything at `path` but a complete `what` of format `fmt` (never delete foreign data)."""
    if path.exists() and read_format(path) != fmt:
        raise CheckpointError(f"{path} exists and is not a {what} (no {COMPLETE} marker of format {fmt!r}); refusing to replace it")


def claim_empty_output(out: Path) -> None:
    """For outputs that must be new: refuse a non-empty `out`, remove an empty one (the result is renamed in)
    and create its parent."""
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise CheckpointError(f"output {out} exists and is not empty; choose a new directory or remove it")
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)


# ---- publish ----
def tmp_sibling(path: Path, token: Optional[str] = None) -> Path:
    """`PATH.tmp-<token>`, beside `path` (same file system, so the final rename is atomic)."""
    return path.with_name(f"{path.name}{TMP_INFIX}{token or secrets.token_hex(4)}")


def publish(tmp: Path, path: Path, fmt: Optional[str], info: Optional[dict] = None) -> None:
    """fsync `tmp`, write COMPLETE (`{"format": fmt, **info, "saved_at": ...}`; none when fmt is None),
    then swap it in for `path`: at every instant `path` is the old directory, the new one, or absent."""
    _fsync_tree(tmp)
    if fmt is not None:
        marker = {"format": fmt, **(info or {}), "files": file_manifest(tmp), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_durable(tmp / COMPLETE, json.dumps(marker))
        fsync_path(tmp)
    old = None
    if path.exists():
        old = tmp.with_name(tmp.name + "-old")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old)


def discard(tmp: Path) -> None:
    """Remove an unpublished temporary directory (after a failed save)."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged(path, fmt: Optional[str] = None, *, what: str = "directory", info: Optional[dict] = None) -> Iterator[Path]:
    """A fresh temporary directory for one writer; published as `path` when the block succeeds, discarded
    when it raises. With a format, an existing `path` is replaced only if it is a complete `what` of it."""
    path = Path(path)
    if fmt is not None:
        check_replaceable(path, fmt, what)
    tmp = tmp_sibling(path)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        publish(tmp, path, fmt, info)
    except BaseException:
        discard(tmp)
        raise
