"""`megatron-tlt demo`: the smallest end-to-end run of the pipeline, on CPU, with no downloads.

It builds a tokenizer and a tiny policy, trains it on the built-in arithmetic task with packed
micro-batches (response tokens only), evaluates held-out loss before and after, saves an atomic
sharded checkpoint, exports it to a Hugging Face directory and reloads that through
`megatron_tlt.load_model`, checking the logits match the trained model exactly.

    megatron-tlt demo                         # embedded default (examples/configs/tiny.yaml values)
    megatron-tlt demo demo.steps=60 model.num_layers=4
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_tlt.config import Config, load_config, to_yaml
from megatron_tlt.data.packing import pack_sequences, plan_micro_batches
from megatron_tlt.data.synthetic import arithmetic_task
from megatron_tlt.data.tokenizer import TOKENIZER_FILES, build_test_tokenizer, encode_prompt, load_tokenizer
from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.logprob import vocab_parallel_logprobs
from megatron_tlt.parallel import init_parallel, set_seed

log = logging.getLogger(__name__)


def _examples(tokenizer, n: int, seed: int):
    """Token ids and response masks (True on the solution tokens) for n arithmetic problems."""
    seqs, masks = [], []
    for ex in arithmetic_task(n, seed):
        prompt = encode_prompt(tokenizer, ex.prompt)
        response = tokenizer.encode(ex.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        masks.append([False] * len(prompt) + [True] * len(response))
    return seqs, masks


def _packed_loss(model: Policy, seqs, masks, idx: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Sum of response-token NLL over the examples `idx`, packed into one stream; and the token count."""
    pb = pack_sequences([seqs[i] for i in idx], ids=list(idx), train_masks=[masks[i] for i in idx])
    hidden = model(pb.tokens[None], position_ids=pb.position_ids[None], cu_seqlens=pb.cu_seqlens, with_logits=False)[0]
    logprobs, _ = vocab_parallel_logprobs(
        hidden, model.output_weight(), pb.targets, tp_group=model.tp_group, vocab_size=model.cfg.vocab_size, compute_entropy=False
    )
    return -(logprobs * pb.loss_mask).sum(), int(pb.loss_mask.sum())


@torch.no_grad()
def _eval_loss(model: Policy, seqs, masks, max_tokens: int) -> float:
    total, count = 0.0, 0
    for idx in plan_micro_batches([len(s) for s in seqs], max_tokens):
        loss, n = _packed_loss(model, seqs, masks, idx)
        total, count = total + loss.item(), count + n
    return total / count


def run_demo(config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Path:
    cfg: Config = load_config(config_path, overrides)
    t0 = time.perf_counter()
    ps = init_parallel(cfg.parallel)
    set_seed(cfg.parallel.seed)
    out = Path(cfg.demo.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    tok_dir = build_test_tokenizer(out / "tokenizer", vocab_size=cfg.model.vocab_size)
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model.vocab_size={cfg.model.vocab_size}")

    train_seqs, train_masks = _examples(tokenizer, cfg.demo.num_examples, seed=cfg.parallel.seed)
    eval_seqs, eval_masks = _examples(tokenizer, 32, seed=cfg.parallel.seed + 1)
    model = Policy(cfg.model, ps.tp_group).to(ps.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.demo.lr, weight_decay=0.0)
    bins = plan_micro_batches([len(s) for s in train_seqs], cfg.demo.micro_batch_tokens)
    before = _eval_loss(model, eval_seqs, eval_masks, cfg.demo.micro_batch_tokens)
    print(f"[demo] {sum(p.numel() for p in model.parameters()):,} params, {len(train_seqs)} examples in {len(bins)} packed micro-batches")
    print(f"[demo] held-out loss before: {before:.4f} (uniform would be {math.log(cfg.model.vocab_size):.4f})")

    num_tokens = sum(sum(m[1:]) for m in train_masks)  # trained targets per step
    for step in range(cfg.demo.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for idx in bins:
            loss, _ = _packed_loss(model, train_seqs, train_masks, idx)
            (loss / num_tokens).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == cfg.demo.steps - 1:
            print(f"[demo] step {step:3d}  train loss {total / num_tokens:.4f}")
    after = _eval_loss(model, eval_seqs, eval_masks, cfg.demo.micro_batch_tokens)
    print(f"[demo] held-out loss after:  {after:.4f}")

    from megatron_tlt.checkpoint.convert import tlt_to_hf
    from megatron_tlt.checkpoint.dcp import save_checkpoint
    from megatron_tlt.models.loading import load_model

    ckpt = save_checkpoint(
        out / "checkpoint", model, cfg.model, tp_group=ps.tp_group,
        files={f: tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()}, meta={"step": cfg.demo.steps},
    )
    hf_dir = out / "hf"
    if ps.is_main:
        shutil.rmtree(hf_dir, ignore_errors=True)  # the previous demo's export in this run directory
        tlt_to_hf(ckpt, hf_dir)
        reloaded = load_model(hf_dir, device="cpu")
        probe = torch.tensor([eval_seqs[0]])
        with torch.no_grad():
            diff = (reloaded(probe) - model(probe.to(ps.device)).cpu()).abs().max().item()
        print(f"[demo] checkpoint {ckpt} -> HF export {hf_dir}: reloaded max |dlogits| = {diff:.3g}")
        if diff != 0.0:
            raise RuntimeError("HF export does not reproduce the trained model's logits")
    print(f"[demo] done in {time.perf_counter() - t0:.1f}s; run directory: {out.resolve()}")
    return out
