"""Tokenizers: load an HF tokenizer directory, encode prompts (with the chat template), build a tiny test one.

Why: the policy, the rollout engine and checkpoint conversion all need the same token ids, so every
tokenizer comes from one local HF directory (`tokenizer.json` + `tokenizer_config.json`), never from
a model hub. Tests and the CPU demo need a tokenizer without any download, so `build_test_tokenizer`
trains a tiny character-level BPE in-process from a built-in text.

How to use:

    tok = load_tokenizer("/models/Qwen2.5-7B")               # or build_test_tokenizer(tmp_dir)
    ids = encode_prompt(tok, "What is 2 + 3?")                 # chat template + generation prompt
    text = tok.decode(ids, skip_special_tokens=True)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Files that make up an HF tokenizer directory; checkpoint conversion copies those present.
# generation_config.json travels with them because it holds the eos ids that generation stops on.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

# ChatML, as used by the Qwen family: one block per message, then the assistant header.
TEST_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The test tokenizer's characters: tab, newline and printable ASCII; anything else becomes "?".
_ALPHABET = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F))
_TRAIN_TEXT = """\
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Answer: In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72.
Using the numbers [3, 7, 25], create an equation that equals 46. You can use + - * / and each number once.
Let me think step by step. 25 + 3 * 7 = 25 + 21 = 46. So the answer is <answer>25 + 3 * 7</answer>.
The policy generates a response for every prompt, the reward is computed, and the model is updated.
def add(a, b):
\treturn a + b
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!
"""


def load_tokenizer(path: Union[str, Path]) -> PreTrainedTokenizerFast:
    """Load the HF tokenizer in directory `path` from local files only."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}: an HF tokenizer directory holds tokenizer.json "
            f"(optionally tokenizer_config.json, special_tokens_map.json, chat_template.jinja)"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def encode_prompt(
    tokenizer: PreTrainedTokenizerFast, prompt: Union[str, list[dict]], apply_chat_template: bool = True
) -> list[int]:
    """Token ids of a prompt, ready for generation.

    With a chat template (and `apply_chat_template`), a str becomes one user message and the messages
    are rendered with the generation prompt; the rendered text already holds its special tokens, so
    none are added. Otherwise a str is encoded plainly, adding the tokenizer's own special tokens
    (e.g. BOS) only if the text does not already start with the BOS token.
    """
    if apply_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if not isinstance(prompt, str):
        raise ValueError("a list of chat messages needs a tokenizer with a chat template and apply_chat_template=True")
    has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
    return tokenizer.encode(prompt, add_special_tokens=not has_bos)


def build_test_tokenizer(out_dir: Union[str, Path], vocab_size: int = 256, chat_template: bool = True) -> Path:
    """Train a tiny deterministic character-level BPE on a built-in text and save it in HF layout to `out_dir`.

    Ids 0..4 are the special tokens <|bos|>, <|eos|>, <|pad|>, <|im_start|>, <|im_end|>; then the
    characters; then merges up to `vocab_size` tokens in all (fewer if the text runs out of pairs).
    Decoding is exact for text made of the alphabet (tab, newline, printable ASCII).
    """
    min_vocab = len(SPECIAL_TOKENS) + len(_ALPHABET)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (special tokens + characters), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(Regex(r"[^\t\n\x20-\x7e]"), "?")
    # words keep their leading space (" clips"), as in GPT-2 style BPE
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+"), "isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
        limit_alphabet=len(_ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAIN_TEXT.splitlines(keepends=True), trainer)
    tok.save(str(out_dir / "tokenizer.json"))

    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = TEST_CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out_dir
