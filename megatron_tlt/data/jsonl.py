"""Strict jsonl reading for command-line inputs: every bad line is a UserError naming `file:line`.

    for line_no, row in read_jsonl_objects(path, "prompts"):
        ...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megatron_tlt.errors import UserError


def read_jsonl_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) per non-blank line; UserError naming `file:line` for bytes that are not UTF-8,
    bad JSON or a non-object, and for an unreadable file."""
    try:
        raw_lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}") from None
    for line_no, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row
