"""Prompt datasets for RL: rows with a prompt and a reference answer, tokenised once, served in a
deterministic per-epoch shuffle with a resumable position.

Sources: a jsonl or parquet file with configurable field names, or a built-in synthetic task
(`megatron_tlt.data.synthetic`). Rows that are not UTF-8 or not a JSON object, with a missing field, an
empty or whitespace-only prompt, a prompt that cannot be templated (e.g. a chat message without `content`),
a prompt over `max_prompt_tokens`, or one that leaves no room for a response in the rollout's context
(`max_context`: prompt + 1 > the engine's max_seq_len) are skipped and counted, with one log line per reason
naming the first line numbers.

    ds = PromptDataset.from_file("math.jsonl", tokenizer, prompt_key="question", answer_key="answer")
    sampler = PromptSampler(len(ds), seed=1)
    batch = [ds[i] for i in sampler.take(64)]       # epoch-aware; sampler.state_dict() resumes it
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_tlt.data.synthetic import get_task
from megatron_tlt.data.tokenizer import encode_prompt
from megatron_tlt.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PromptExample:
    prompt_ids: list[int]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)  # the raw row's other fields (e.g. countdown numbers)


def _read_rows(path: Path) -> Iterable[tuple[int, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, _Undecodable(f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, e


class _Undecodable(str):
    """A row whose bytes are not UTF-8 (the reason)."""


def _blank(prompt) -> bool:
    """An empty or whitespace-only prompt: a str, or chat messages whose contents are all blank strings."""
    if isinstance(prompt, str):
        return not prompt.strip()
    contents = [m.get("content") for m in prompt if isinstance(m, dict)]
    return bool(contents) and len(contents) == len(prompt) and all(isinstance(c, str) and not c.strip() for c in contents)


def _lines(numbers: list) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    return f"{shown}, ... ({len(numbers) - 10} more)" if len(numbers) > 10 else shown


class PromptDataset:
    def __init__(self, examples: list[PromptExample]):
        if not examples:
            raise UserError("the prompt dataset is empty after filtering (see the log line about skipped rows)")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, Any]], tokenizer, *, prompt_key: str, answer_key: str,
                  max_prompt_tokens: int, apply_chat_template: bool = True, source: str = "",
                  max_context: Optional[int] = None, unit: str = "row") -> "PromptDataset":
        """`rows`: (line or row number, parsed row). `max_context`: the rollout's max_seq_len (a prompt needs one
        position left for the response). `unit`: what the numbers in the skip log lines count ("line" in jsonl)."""
        examples, skipped = [], defaultdict(list)  # reason -> line numbers
        for line_no, row in rows:
            if isinstance(row, _Undecodable):
                skipped[str(row)].append(line_no)
                continue
            if not isinstance(row, dict):
                skipped["not a JSON object"].append(line_no)
                continue
            prompt, answer = row.get(prompt_key), row.get(answer_key)
            if not isinstance(prompt, (str, list)) or not prompt or answer is None:
                skipped[f"missing or empty '{prompt_key}'/'{answer_key}'"].append(line_no)
                continue
            if _blank(prompt):
                skipped["whitespace-only prompt"].append(line_no)
                continue
            try:
                ids = encode_prompt(tokenizer, prompt, apply_chat_template=apply_chat_template)
            except Exception as e:  # a malformed message list fails inside the chat template (jinja2)
                skipped[f"prompt cannot be templated ({type(e).__name__})"].append(line_no)
                continue
            if not ids:
                skipped["prompt encodes to no tokens"].append(line_no)
                continue
            if len(ids) > max_prompt_tokens:
                skipped[f"prompt over {max_prompt_tokens} tokens"].append(line_no)
                continue
            if max_context is not None and len(ids) + 1 > max_context:
                skipped[f"prompt + 1 response token over the rollout's context of {max_context} tokens"].append(line_no)
                continue
            meta = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
            examples.append(PromptExample(ids, str(answer), meta))
        for reason, numbers in skipped.items():
            log.warning("skipped %d rows of %s: %s (%ss %s)", len(numbers), source or "the dataset", reason, unit, _lines(numbers))
        return cls(examples)

    @classmethod
    def from_file(cls, path, tokenizer, **kw) -> "PromptDataset":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"prompt dataset not found: {path}")
        unit = "row" if path.suffix == ".parquet" else "line"
        return cls.from_rows(_read_rows(path), tokenizer, source=str(path), unit=unit, **kw)

    @classmethod
    def from_task(cls, name: str, n: int, seed: int, tokenizer, task_args: Optional[dict] = None, **kw) -> "PromptDataset":
        rows = []
        for i, ex in enumerate(get_task(name)(n, seed, **(task_args or {}))):
            rows.append((i, {"prompt": ex.prompt, "answer": ex.answer, **ex.meta}))
        return cls.from_rows(rows, tokenizer, prompt_key="prompt", answer_key="answer", source=f"task '{name}'", **kw)


class PromptSampler:
    """Indices in a fresh seeded permutation per epoch; its state (epoch, offset) resumes exactly."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            n = min(k - len(out), self.size - self.offset)
            out += self._order[self.offset : self.offset + n]
            self.offset += n
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
