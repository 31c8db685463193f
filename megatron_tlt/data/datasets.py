"""Prompt datasets for RL: rows with a prompt and a reference answer, tokenised once, served in a
deterministic per-epoch shuffle with a resumable position.

Sources: a jsonl or parquet file with configurable field names, or a built-in synthetic task
(`megatron_tlt.data.synthetic`). Rows with a missing field, an empty prompt or a prompt over
`max_prompt_tokens` are skipped and counted, with one log line per reason.

    ds = PromptDataset.from_file("math.jsonl", tokenizer, prompt_key="question", answer_key="answer")
    sampler = PromptSampler(len(ds), seed=1)
    batch = [ds[i] for i in sampler.take(64)]       # epoch-aware; sampler.state_dict() resumes it
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
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
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, e


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
                  max_prompt_tokens: int, apply_chat_template: bool = True, source: str = "") -> "PromptDataset":
        examples, skipped = [], Counter()
        for line_no, row in rows:
            if not isinstance(row, dict):
                skipped["not a JSON object"] += 1
                continue
            prompt, answer = row.get(prompt_key), row.get(answer_key)
            if not isinstance(prompt, (str, list)) or not prompt or answer is None:
                skipped[f"missing or empty '{prompt_key}'/'{answer_key}'"] += 1
                continue
            ids = encode_prompt(tokenizer, prompt, apply_chat_template=apply_chat_template)
            if len(ids) > max_prompt_tokens:
                skipped[f"prompt over {max_prompt_tokens} tokens"] += 1
                continue
            meta = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
            examples.append(PromptExample(ids, str(answer), meta))
        for reason, count in skipped.items():
            log.warning("skipped %d rows of %s: %s", count, source or "the dataset", reason)
        return cls(examples)

    @classmethod
    def from_file(cls, path, tokenizer, **kw) -> "PromptDataset":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"prompt dataset not found: {path}")
        return cls.from_rows(_read_rows(path), tokenizer, source=str(path), **kw)

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
