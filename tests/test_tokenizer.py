"""Tokenizers: the built-in test tokenizer round-trips text, chat templates apply only when present."""
import json

import pytest
from tokenizers.processors import TemplateProcessing

from megatron_tlt.data.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    build_test_tokenizer,
    encode_prompt,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("plain_tok"), chat_template=False)


def test_build_layout_vocab_and_determinism(chat_dir, tmp_path):
    assert {p.name for p in chat_dir.iterdir()} <= set(TOKENIZER_FILES)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    tok = load_tokenizer(chat_dir)
    assert len(tok) <= 256
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    again = build_test_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (chat_dir / "tokenizer.json").read_bytes()
    small = load_tokenizer(build_test_tokenizer(tmp_path / "small", vocab_size=128))
    assert len(small) <= 128


def test_round_trip_text(chat_dir):
    tok = load_tokenizer(chat_dir)
    text = "Question: 48 / 2 = 24, so the answer is <answer>72</answer>.\n\tdef f(x): return x * 3 ~ {ok}!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text), "BPE merges make tokens longer than one character"
    specials = tok.encode("<|bos|>hi<|eos|>", add_special_tokens=False)
    assert specials[0] == tok.bos_token_id and specials[-1] == tok.eos_token_id
    assert tok.decode(specials, skip_special_tokens=True) == "hi"


def test_chat_template_applied_when_present(chat_dir):
    tok = load_tokenizer(chat_dir)
    ids = encode_prompt(tok, "What is 2+3?")
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.decode(encode_prompt(tok, messages)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(encode_prompt(tok, "Hi", apply_chat_template=False)) == "Hi"


def test_no_chat_template_encodes_plainly(plain_dir):
    tok = load_tokenizer(plain_dir)
    assert not tok.chat_template
    assert encode_prompt(tok, "What is 2+3?") == tok.encode("What is 2+3?", add_special_tokens=False)
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(tok, [{"role": "user", "content": "Hi"}])


def test_plain_encoding_adds_bos_once(plain_dir):
    tok = load_tokenizer(plain_dir)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    hi = tok.encode("hi", add_special_tokens=False)
    assert encode_prompt(tok, "hi") == [0] + hi
    assert encode_prompt(tok, "<|bos|>hi") == [0] + hi


def test_missing_tokenizer_json_names_dir_and_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
