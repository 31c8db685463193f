"""`megatron-tlt generate`: sample completions for a jsonl file of prompts with the rollout engine.

Why: look at what a checkpoint generates (and measure it) without writing a script.

How:

    megatron-tlt generate --model HF_DIR_OR_CKPT --prompts prompts.jsonl --out completions.jsonl \
        --n 4 --temperature 1.0 --top-p 0.95 --max-new-tokens 512 --seed 0 [--drafter DRAFTER --spec adaptive]

Each prompts row is a JSON object with `prompt` (a string, or a list of chat messages; the model
directory's chat template is applied) or `input_ids` (token ids, used as they are). Each output row
is one sample: prompt_index, sample_index, response (text, null without a tokenizer), token_ids,
logprobs, finish_reason, stats (with speculative decoding: spec_steps, accepted_drafts and
mean_accept_len, the accepted draft tokens per speculative step). Generation stops at the tokenizer's
eos token and at the eos ids of generation_config.json when the model directory has one.

Speculative decoding (`--spec chain|tree|adaptive`) needs `--drafter`, a drafter directory written by
`megatron-tlt train-drafter` (`drafter.io.save_drafter`); it changes the speed, never the tokens: with
the same --seed, a prompt's samples are the same with or without it (exact-sample verification), in
any batch. `--drafts topk` drafts the drafter's most likely tokens instead of its samples under the
target's noise (coupled, the default: more accepted at temperature > 0).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_tlt.data.jsonl import read_jsonl_objects
from megatron_tlt.errors import UserError


def read_prompts(path: Path, tokenizer) -> list[tuple[int, list[int]]]:
    """(line number, token ids) of every prompt row; UserError naming the file and line of the first bad row."""
    prompts = []
    for line_no, row in read_jsonl_objects(path, "prompts"):
        where = f"{path}:{line_no}"
        if ("prompt" in row) == ("input_ids" in row):
            raise UserError(f"{where}: expected a JSON object with exactly one of 'prompt' or 'input_ids'")
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise UserError(f"{where}: 'input_ids' must be a non-empty list of non-negative ints")
        else:
            text = row["prompt"]
            if not (isinstance(text, str) and text) and not (isinstance(text, list) and text):
                raise UserError(f"{where}: 'prompt' must be a non-empty string or list of chat messages")
            if tokenizer is None:
                raise UserError(f"{where}: a text 'prompt' needs tokenizer files in the model directory; give 'input_ids'")
            try:
                ids = _encode(tokenizer, text)
            except Exception as e:  # a malformed message list fails inside the chat template
                raise UserError(f"{where}: cannot encode the prompt: {e}") from None
            if not ids:
                raise UserError(f"{where}: the prompt encodes to no tokens")
        prompts.append((line_no, ids))
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def _encode(tokenizer, prompt) -> list[int]:
    from megatron_tlt.data.tokenizer import encode_prompt

    return encode_prompt(tokenizer, prompt)


def stop_token_ids(model_dir: Path, tokenizer) -> tuple[int, ...]:
    """The tokenizer's eos id and generation_config.json's eos_token_id (an int or a list)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_config = model_dir / "generation_config.json"
    if gen_config.is_file():
        try:
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise UserError(f"{gen_config} is not valid JSON: {e}") from None
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return tuple(sorted(ids))


def _load_tokenizer(model_dir: Path):
    from megatron_tlt.data.tokenizer import load_tokenizer

    return load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically: a crash leaves the old file (or none), never half of the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def run_generate(args) -> int:
    if args.spec != "off" and args.drafter is None:
        raise UserError(f"--spec {args.spec} needs --drafter PATH")
    if args.spec == "off" and args.drafter is not None:
        raise UserError("--drafter is used only with --spec chain|tree|adaptive")
    from megatron_tlt.rollout import SamplingParams

    model_dir = Path(args.model)
    tokenizer = _load_tokenizer(model_dir)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        stop_token_ids=stop_token_ids(model_dir, tokenizer), n=args.n, seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    prompts = read_prompts(Path(args.prompts), tokenizer)

    import torch.distributed as dist

    from megatron_tlt.checkpoint.loading import load_model
    from megatron_tlt.rollout import RolloutEngine

    model = load_model(model_dir)
    drafter = None
    if args.drafter is not None:
        from megatron_tlt.drafter.io import load_drafter

        drafter = load_drafter(args.drafter, model)  # CheckpointError (a UserError) when missing or unfit
    vocab = model.cfg.vocab_size
    for line_no, ids in prompts:
        if max(ids) >= vocab:
            raise UserError(f"{args.prompts}:{line_no}: token id {max(ids)} is outside the model's vocabulary (size {vocab})")
    try:
        engine = RolloutEngine(
            model, max_seq_len=args.max_seq_len, cache_budget_bytes=int(args.kv_cache_gb * 2**30), drafter=drafter, spec=args.spec,
            cuda_graphs=args.cuda_graphs, drafts=args.drafts, batch_invariant=args.batch_invariant,
            precision=args.precision, fp8_gemm=args.fp8_gemm,
        )
    except ValueError as e:  # max_seq_len out of range, or the budget is below one slot
        raise UserError(str(e)) from None
    results = engine.generate([ids for _, ids in prompts], params)
    rows = [
        {
            "prompt_index": i,
            "sample_index": j,
            "response": _decode(tokenizer, c.token_ids),
            "token_ids": c.token_ids,
            "logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
            "stats": c.stats,
        }
        for i, samples in enumerate(results)
        for j, c in enumerate(samples)
    ]
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_jsonl(Path(args.out), rows)
        s = engine.stats
        print(f"wrote {len(rows)} samples to {args.out} ({s.generated_tokens} tokens in {s.wall_s:.1f} s)")
        if drafter is not None:
            print(
                f"speculative steps: {s.spec_steps}, accepted drafts per row and step: {s.mean_accept_len:.2f}, "
                f"step kinds by live-batch bucket: {s.arms_by_bucket}"
            )
    return 0


def _decode(tokenizer, ids: list[int]) -> Optional[str]:
    return None if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
