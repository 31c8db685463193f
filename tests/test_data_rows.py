"""Issue 16 item 8: rows that cannot be read, decoded or templated are skipped and counted with their line
numbers (never a traceback); over-context and whitespace-only prompts are skipped at load; `generate`'s reader
names file:line for bytes that are not UTF-8."""
from __future__ import annotations

import json
import logging

import pytest

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config import load_config
from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.data.jsonl import read_jsonl_objects
from megatron_tlt.data.tokenizer import build_test_tokenizer, load_tokenizer
from megatron_tlt.errors import UserError
from megatron_tlt.step.setup import build_datasets, rollout_max_seq_len


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _row(prompt, answer="1") -> bytes:
    return json.dumps({"prompt": prompt, "answer": answer}).encode()


def test_bad_rows_are_skipped_with_their_line_numbers(tmp_path, tok_dir, caplog):
    path = tmp_path / "data.jsonl"
    _write(path, [
        _row("1+1=?"),                                           # 1 kept
        b'{"prompt": "caf\xe9 1+1=?", "answer": "2"}',           # 2 latin-1 byte: not UTF-8
        _row([{"role": "user"}]),                                # 3 chat message without content
        _row("   \t "),                                          # 4 whitespace-only
        _row([{"role": "user", "content": "  "}]),               # 5 whitespace-only messages
        _row("2+2=?"),                                           # 6 kept
        _row("x" * 40),                                          # 7 over the context (prompt + 1 > 24)
        b"[1, 2]",                                               # 8 not an object
        _row([{"role": "user", "content": "3+3=?"}]),            # 9 kept
    ])
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset.from_file(path, load_tokenizer(tok_dir), prompt_key="prompt", answer_key="answer",
                                     max_prompt_tokens=64, max_context=24)
    assert len(ds) == 3
    text = caplog.text
    assert "skipped 1 rows of" in text and "not valid UTF-8" in text and "(lines 2)" in text
    assert "prompt cannot be templated" in text and "(lines 3)" in text
    assert "whitespace-only prompt (lines 4, 5)" in text
    assert "prompt + 1 response token over the rollout's context of 24 tokens (lines 7)" in text
    assert "not a JSON object (lines 8)" in text


def test_over_context_prompts_are_skipped_at_load(tmp_path, tok_dir, caplog):
    # max_prompt_tokens + max_new_tokens = 72 > the model's 32-token window: the rollout's context is 32
    path = tmp_path / "data.jsonl"
    _write(path, [_row("1+1=?")] * 3 + [_row("y" * 40)] + [_row("2+2=?")] * 20)
    cfg = load_config(None, [f"data.path={path}", f"data.tokenizer={tok_dir}", "model.max_position_embeddings=32",
                             "data.max_prompt_tokens=64", "rollout.max_new_tokens=8", "data.eval_examples=2"])
    assert rollout_max_seq_len(cfg) == 32
    with caplog.at_level(logging.WARNING):
        train, held_out = build_datasets(cfg, load_tokenizer(tok_dir))
    assert len(train) + len(held_out) == 23
    assert all(len(e.prompt_ids) + 1 <= 32 for e in train.examples + held_out.examples)
    assert "over the rollout's context of 32 tokens (lines 4)" in caplog.text


def test_skip_log_lists_the_first_ten_line_numbers(tmp_path, tok_dir, caplog):
    path = tmp_path / "data.jsonl"
    _write(path, [_row("1+1=?")] + [_row(" ")] * 12)
    with caplog.at_level(logging.WARNING):
        PromptDataset.from_file(path, load_tokenizer(tok_dir), prompt_key="prompt", answer_key="answer", max_prompt_tokens=64)
    assert "skipped 12 rows" in caplog.text and "(lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (2 more))" in caplog.text


def test_generate_reader_names_file_and_line_for_bad_bytes(tmp_path, tok_dir, capsys):
    path = tmp_path / "prompts.jsonl"
    _write(path, [json.dumps({"input_ids": [1, 2]}).encode(), b'{"prompt": "\xff\xfe"}'])
    with pytest.raises(UserError, match=r"prompts\.jsonl:2: not valid UTF-8 \(byte 12 of the line\)"):
        list(read_jsonl_objects(path, "prompts"))
    rc = cli_main(["generate", "--model", str(tok_dir), "--prompts", str(path), "--out", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: not valid UTF-8" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
