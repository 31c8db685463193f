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
    """(line number, JSON object) per non-blank line; UserError naming `file:line` for bad JSON or a non-object,
    and for an unreadable file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row
