"""Training throughput, packed vs padded-to-longest, on a long-tailed length mix (DESIGN target: >= 2x).

Runs the policy's training forward + backward over the same examples two ways:
- packed: examples bin-packed by tokens (`plan_micro_batches`, budget --max-tokens), one flat token
  stream per micro-batch with `cu_seqlens`, loss from the library's packed forward (`models.packed`) on the loss mask;
- padded: micro-batches of --batch-size examples in dataset order, each padded to its longest
  example, dense causal attention, the same loss with padding masked out.
Lengths are log-normal (median --median-len, spread --sigma), clipped to [--min-len, --max-len].
Only real (non-pad) tokens count in tokens/s. Each micro-batch's time is the fastest of --iters runs
(this discounts warm-up and other load on a shared machine), and the modes alternate run by run.
Micro-batches are built before timing (that is data loading). Both modes must produce the same
total loss, which the script checks.

    python tools/bench/packing.py                    # CPU defaults: a small model, about 1-2 min on 2 cores
    python tools/bench/packing.py --hidden 1024 --layers 8 --vocab 32000 --num-examples 512 \\
        --median-len 512 --max-len 8192 --max-tokens 32768 --dtype bfloat16   # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_tlt.config.schema import DTYPES, ModelConfig
from megatron_tlt.data.packing import pack_sequences, plan_micro_batches
from megatron_tlt.models.packed import packed_forward, token_logprobs
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed


def long_tailed_lengths(n: int, median: int, sigma: float, min_len: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    raw = median * torch.exp(sigma * torch.randn(n, generator=gen, dtype=torch.float64))  # [n] log-normal
    return raw.round().clamp(min_len, max_len).long().tolist()


def packed_batches(seqs: list[torch.Tensor], max_tokens: int, device) -> list[dict]:
    out = []
    for idx in plan_micro_batches([len(s) for s in seqs], max_tokens):
        pb = pack_sequences([seqs[i].to(device) for i in idx])  # tokens, position ids, targets, loss mask [T]
        out.append(dict(batch=pb, tokens=pb.tokens, loss_mask=pb.loss_mask, num_slots=pb.tokens.numel()))
    return out


def padded_batches(seqs: list[torch.Tensor], batch_size: int, device) -> list[dict]:
    out = []
    for first in range(0, len(seqs), batch_size):
        rows = seqs[first:first + batch_size]
        longest = max(len(s) for s in rows)
        tokens = torch.zeros(len(rows), longest, dtype=torch.int64)  # [B, S], pad id 0
        real = torch.zeros(len(rows), longest, dtype=torch.bool)  # [B, S]
        for b, s in enumerate(rows):
            tokens[b, : len(s)], real[b, : len(s)] = s, True
        targets = tokens.roll(-1, dims=1)  # [B, S] next token of the same row (last column: don't care)
        loss_mask = real.roll(-1, dims=1)  # [B, S] the next token is real
        loss_mask[:, -1] = False
        out.append(dict(
            tokens=tokens.to(device), targets=targets.flatten().to(device),
            loss_mask=loss_mask.flatten().to(device), num_slots=tokens.numel(),
        ))
    return out


def packed_loss(model: Policy, mb: dict) -> torch.Tensor:
    logprobs = packed_forward(model, mb["batch"]).logprobs  # [T]
    return -(logprobs * mb["loss_mask"]).sum()


def padded_loss(model: Policy, mb: dict) -> torch.Tensor:
    hidden = model.hidden_states(mb["tokens"])  # [B, S, H], dense causal attention
    logprobs, _ = token_logprobs(model, hidden.flatten(0, 1), mb["targets"])  # [B * S]
    return -(logprobs * mb["loss_mask"]).sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_epoch(model: Policy, batches: list[dict], loss_fn, num_targets: int) -> tuple[list[float], float]:
    """Forward + backward over every micro-batch (gradients accumulate): (seconds per micro-batch, total loss)."""
    model.zero_grad(set_to_none=True)
    device = batches[0]["tokens"].device
    seconds = []
    total = torch.zeros((), device=device)
    for mb in batches:
        _sync(device)
        start = time.perf_counter()
        loss = loss_fn(model, mb) / num_targets
        loss.backward()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        total += loss.detach()
    return seconds, float(total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-examples", type=int, default=64)
    p.add_argument("--median-len", type=int, default=64)
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the lengths")
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="examples per padded micro-batch")
    p.add_argument("--max-tokens", type=int, default=2048, help="token budget per packed micro-batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--iters", type=int, default=3, help="runs per mode; each micro-batch counts its fastest run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    ps = init_parallel()
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
        max_position_embeddings=args.max_len, params_dtype=args.dtype,
    )
    set_seed(args.seed)
    model = Policy(cfg, tp_group=ps.tp_group).to(ps.device)

    lengths = long_tailed_lengths(args.num_examples, args.median_len, args.sigma, args.min_len, args.max_len, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    seqs = [torch.randint(0, args.vocab, (n,), generator=gen) for n in lengths]
    real_tokens = sum(lengths)
    num_targets = real_tokens - len(lengths)  # every token but each example's last is a training target
    modes = {
        "packed": (packed_batches(seqs, args.max_tokens, ps.device), packed_loss),
        "padded": (padded_batches(seqs, args.batch_size, ps.device), padded_loss),
    }
    print(
        f"{len(lengths)} examples, lengths median {sorted(lengths)[len(lengths) // 2]} mean {real_tokens / len(lengths):.0f} "
        f"max {max(lengths)}; {real_tokens} tokens; model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, "
        f"{args.dtype} on {ps.device.type} ({torch.get_num_threads()} threads)"
    )

    fastest = {mode: [float("inf")] * len(batches) for mode, (batches, _) in modes.items()}  # seconds per micro-batch
    losses = {}
    for _ in range(args.iters):
        for mode, (batches, loss_fn) in modes.items():
            seconds, losses[mode] = run_epoch(model, batches, loss_fn, num_targets)
            fastest[mode] = [min(a, b) for a, b in zip(fastest[mode], seconds)]
    if abs(losses["packed"] - losses["padded"]) > 1e-3 * abs(losses["padded"]):
        raise RuntimeError(f"the modes computed different losses: {losses}; the comparison is not like for like")

    tokens_per_s = {}
    for mode, (batches, _) in modes.items():
        tokens_per_s[mode] = real_tokens / sum(fastest[mode])
        padding = 1 - real_tokens / sum(mb["num_slots"] for mb in batches)
        print(f"{mode}: {tokens_per_s[mode]:9.0f} tokens/s  ({len(batches)} micro-batches, padding {padding:6.1%}, loss {losses[mode]:.4f})")
    print(f"packed/padded speedup: {tokens_per_s['packed'] / tokens_per_s['padded']:.2f}x")
    destroy_parallel()


if __name__ == "__main__":
    main()
