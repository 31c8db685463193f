"""Rollout decode throughput: plain vs speculative decoding (chain, tree, adaptive) at live batch sizes 1-64.

DESIGN targets: adaptive speculative decoding >= 2x plain decoding in the long-tail phase (batch <= 4),
and never slower than plain at any batch size; the EAGLE-3 head's accepted length >= 1.3x the EAGLE head's
at equal drafter training budget, at draft depth >= 4.

The model (tools/bench/common.py, cached under --cache-dir): a policy trained supervised on the
countdown task's worked solutions, and a one-layer EAGLE drafter trained offline on the policy's own
samples of training prompts. Everything below runs on held-out prompts.

For each live batch size B (--batch-sizes), an engine with B KV slots gets --prompts-per-slot x B
prompts (at least --min-prompts): queued prompts take the slots of finished ones, so B requests are
live until the queue drains (the "live" column is the mean over decode steps). Each mode decodes the
same prompts greedily (--max-new-tokens, stop at eos):
- plain:    one target forward per token;
- chain:    a chain draft of depth --chain-depth, verified in one forward;
- tree:     an EAGLE-2 tree (--tree-depth levels, top --tree-topk per node, best --tree-verify nodes verified);
- adaptive: the engine's bandit picks off / chain / tree per live-batch bucket from measured tokens per
            second (SD only at live batches <= --max-spec-batch).
Timing: one warm-up generate per engine (it also gives the adaptive selector its first measurements;
its state carries on, as it does across RL steps), then --iters rounds with the modes alternating;
a mode's tokens/s is its best round (the fastest wall time, prefill included; this discounts other
load on a shared machine). "accept" is the draft tokens accepted per row per speculative step (each
such step also emits one target token). Then the same for sampling at --temperatures (1 and 0.6) at
B = --sampled-batch, every SD mode twice: with coupled drafts (the engine's default: each node's first
child is the drafter's sample under the target's position noise) and with the drafter's top-k tokens
("/topk"). Speculative decoding is exact-sample, so every mode must emit plain decoding's tokens: each
section prints how many sequences are identical to plain decoding's (the last round's, token for token).
The batch sweep and the sampled rows draft with --head (default eagle3, the library's default drafter).
Drafter heads: the EAGLE (drafter.arch=eagle) and EAGLE-3 (drafter.arch=eagle3) drafters, trained offline at
the same budget on the same samples (tools/bench/common.py), each drafting chains of --chain-depth and trees
at B = --heads-batch, greedy and at temperature 1: accepted length and tokens/s vs plain per head, and the
EAGLE-3 / EAGLE ratio of accepted lengths (--heads-only: this section alone).
--invariant-check adds plain and adaptive with `rollout.batch_invariant` (attention per query in fp32) at
temperature 1: its cost, and the identical sequences with and without it (in --dtype bfloat16, where
the logits' last bits depend on the call's shapes).

GPU section (only with CUDA): the same model through `transformers` `generate` (greedy, same prompts,
batches of B, left-padded), and batch-1 decode time per token against the HBM-bandwidth roofline:
bytes read per token (the weights, minus the embedding table of which one row is read, plus the KV
cache of the context) / step time, as a fraction of --peak-bandwidth.

    python tools/bench/rollout.py                   # CPU defaults: trains the model once (~4 min, cached), then ~5 min
    python tools/bench/rollout.py --quick           # smoke run: a tiny model, the drafter heads only, one round (~2 min)
    python tools/bench/rollout.py --hidden 1024 --layers 24 --heads 16 --kv-heads 4 --sft-steps 600 \\
        --dtype bfloat16 --batch-sizes 1 4 16 64 256     # on a GPU (the roofline needs a model big enough to be bandwidth-bound)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, apply_quick_models, trained_models  # noqa: E402

from megatron_tlt.checkpoint.convert import tlt_to_hf  # noqa: E402
from megatron_tlt.config.schema import DTYPES  # noqa: E402
from megatron_tlt.parallel import destroy_parallel, init_parallel  # noqa: E402
from megatron_tlt.rollout import DraftSelector, DraftShape, RolloutEngine, SamplingParams  # noqa: E402

MODES = ("plain", "chain", "tree", "adaptive")  # SD modes draft coupled (the engine's default)
SAMPLED_MODES = MODES + tuple(f"{m}/topk" for m in MODES[1:])  # and with the drafter's top-k tokens


@dataclass
class ModeResult:
    tokens_per_s: float = 0.0  # best round
    accepted: int = 0  # over the timed rounds
    spec_row_steps: int = 0
    live_rows: list[int] = field(default_factory=list)  # live rows at each decode step, timed rounds
    arms: dict[int, Counter] = field(default_factory=dict)  # bucket -> step kind -> decode steps, timed rounds
    outputs: list[list[int]] = field(default_factory=list)  # response tokens of the last round

    @property
    def accept_len(self) -> float:
        return self.accepted / self.spec_row_steps if self.spec_row_steps else 0.0


def heads_section(models, prompts: list[list[int]], max_seq_len: int, eos, args) -> None:
    """EAGLE vs EAGLE-3 at equal training budget: chain and tree SD with each head, greedy and at temperature 1."""
    heads = {"eagle": models, "eagle3": dataclasses.replace(models, drafter=models.eagle3)}
    print(f"drafter heads at equal training budget, B={args.heads_batch}, chain depth {args.chain_depth}, tree depth "
          f"{args.tree_depth} (accept: draft tokens accepted per speculative step)")
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, max_new_tokens=args.max_new_tokens, stop_token_ids=eos, seed=args.seed)
        results = {arch: bench_batch(m, prompts, args.heads_batch, params, max_seq_len, args, ("plain", "chain", "tree"))
                   for arch, m in heads.items()}
        for arch, r in results.items():
            print_rows(f"{arch} T={temperature:g}", args.heads_batch, r)
            print(f"        outputs: {identical_note(r)}")
        print(f"EAGLE-3 / EAGLE accepted length at T={temperature:g}: " + ", ".join(
            f"{mode} {results['eagle3'][mode].accept_len / max(results['eagle'][mode].accept_len, 1e-9):.2f}x "
            f"({results['eagle'][mode].accept_len:.2f} -> {results['eagle3'][mode].accept_len:.2f}), speedup vs plain "
            f"{results['eagle'][mode].tokens_per_s / results['eagle']['plain'].tokens_per_s:.2f}x -> "
            f"{results['eagle3'][mode].tokens_per_s / results['eagle3']['plain'].tokens_per_s:.2f}x"
            for mode in ("chain", "tree")
        ) + "  (target at depth >= 4: >= 1.3x)")


def make_engine(models, mode: str, batch: int, max_seq_len: int, args) -> RolloutEngine:
    """mode: "plain", or "chain" / "tree" / "adaptive", optionally suffixed "/topk" (top-k drafts; default coupled)
    or "/invariant" (rollout.batch_invariant)."""
    spec, *flags = mode.split("/")
    shapes = {"chain": DraftShape.chain(args.chain_depth), "tree": DraftShape(args.tree_depth, args.tree_topk, args.tree_verify)}
    kw = {}
    if spec in shapes:
        kw = dict(drafter=models.drafter, spec=spec, draft_shape=shapes[spec])
    elif spec == "adaptive":
        selector = DraftSelector(list(shapes.values()), max_spec_batch=args.max_spec_batch, seed=args.seed)
        kw = dict(drafter=models.drafter, spec="adaptive", selector=selector)
    return RolloutEngine(
        models.policy, max_seq_len=max_seq_len, max_batch=batch, drafts="topk" if "topk" in flags else "coupled",
        batch_invariant="invariant" in flags, **kw,
    )


def bench_batch(
    models, prompts: list[list[int]], batch: int, params: SamplingParams, max_seq_len: int, args, modes=MODES
) -> dict[str, ModeResult]:
    """Every mode over the same prompts with `batch` slots: a warm-up, then --iters alternating rounds."""
    engines = {mode: make_engine(models, mode, batch, max_seq_len, args) for mode in modes}
    results = {mode: ModeResult() for mode in modes}
    for engine in engines.values():
        engine.generate(prompts, params)
    for _ in range(args.iters):
        for mode, engine in engines.items():
            completions = engine.generate(prompts, params)
            s, r = engine.stats, results[mode]
            r.tokens_per_s = max(r.tokens_per_s, s.generated_tokens / s.wall_s)
            r.accepted += s.accepted_drafts
            r.spec_row_steps += s.spec_row_steps
            r.live_rows += s.decode_batch_sizes
            for bucket, counts in s.arms_by_bucket.items():
                r.arms.setdefault(bucket, Counter()).update(counts)
            r.outputs = [c[0].token_ids for c in completions]
    return results


def print_rows(label: str, batch: int, results: dict[str, ModeResult]) -> None:
    plain = results["plain"].tokens_per_s
    for mode, r in results.items():
        live = sum(r.live_rows) / max(len(r.live_rows), 1)
        accept = f"{r.accept_len:6.2f}" if not mode.startswith("plain") else "     -"
        print(f"{label:>7} B={batch:<3} {mode:>13}: {r.tokens_per_s:8.1f} tokens/s  accept {accept}  "
              f"{r.tokens_per_s / plain:5.2f}x plain  (live {live:5.1f})")


def identical_note(results: dict[str, ModeResult]) -> str:
    """How many sequences of each SD mode's last round are plain decoding's, token for token."""
    plain = results["plain"].outputs
    same = {mode: sum(a == b for a, b in zip(r.outputs, plain)) for mode, r in results.items() if mode != "plain"}
    total = len(plain) * len(same)
    note = f"identical to plain decoding: {sum(same.values())} of {total} sequences"
    differ = [f"{mode} {len(plain) - n}/{len(plain)}" for mode, n in same.items() if n < len(plain)]
    return note + (f" (differ: {', '.join(differ)})" if differ else "")


def arm_summary(arms: dict[int, Counter]) -> str:
    parts = []
    for bucket in sorted(arms, reverse=True):
        counts = arms[bucket]
        total = sum(counts.values())
        choice = " ".join(f"{name} {100 * n / total:.0f}%" for name, n in counts.most_common())
        parts.append(f"[<= {bucket}: {choice}; {total} steps]")
    return " ".join(parts)


def invariant_section(models, prompts, max_seq_len: int, eos, args) -> None:
    """plain and adaptive at temperature 1, with and without rollout.batch_invariant: its cost, and whether SD
    still emits plain decoding's tokens in this dtype (reduced precision is where the logits' last bits differ
    between a decode and a verify forward)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, stop_token_ids=eos, seed=args.seed)
    modes = ("plain", "adaptive", "plain/invariant", "adaptive/invariant")
    results = bench_batch(models, prompts, args.sampled_batch, params, max_seq_len, args, modes)
    print_rows("temp 1", args.sampled_batch, results)
    same = {flag: sum(a == b for a, b in zip(results[f"adaptive{flag}"].outputs, results[f"plain{flag}"].outputs)) for flag in ("", "/invariant")}
    n = len(prompts)
    print(f"batch_invariant ({args.dtype}, temperature 1, B={args.sampled_batch}): plain {results['plain/invariant'].tokens_per_s:.1f} "
          f"vs {results['plain'].tokens_per_s:.1f} tokens/s ({results['plain/invariant'].tokens_per_s / results['plain'].tokens_per_s:.2f}x), "
          f"adaptive {results['adaptive/invariant'].tokens_per_s:.1f} vs {results['adaptive'].tokens_per_s:.1f} tokens/s "
          f"({results['adaptive/invariant'].tokens_per_s / results['adaptive'].tokens_per_s:.2f}x); adaptive identical to plain: "
          f"{same['/invariant']} of {n} sequences with it, {same['']} of {n} without")


# ---- GPU section ----
def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it is read),
    unless the embedding is the (tied) LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def decode_step_s(engine: RolloutEngine, prompt: list[int], short: int, long: int, iters: int) -> float:
    """Seconds per batch-1 decode step: the difference of two runs without stop tokens (short and long new
    tokens) over their difference in steps, so prefill and fixed costs cancel."""
    best = {}
    for n in (short, long):
        params = SamplingParams(temperature=0.0, max_new_tokens=n)
        engine.generate([prompt], params)
        best[n] = min(_timed_generate(engine, [prompt], params) for _ in range(iters))
    return (best[long] - best[short]) / (long - short)


def _timed_generate(engine: RolloutEngine, prompts, params) -> float:
    engine.generate(prompts, params)
    return engine.stats.wall_s


def hf_tokens_per_s(hf_model, prompts: list[list[int]], batch: int, max_new_tokens: int, eos: int, pad: int, iters: int) -> float:
    """Greedy `generate` over `prompts` in left-padded batches of `batch`: best of `iters` generated tokens / s
    (a row's tokens count up to its first eos, included)."""
    def run() -> tuple[int, float]:
        torch.cuda.synchronize()
        start, tokens = time.perf_counter(), 0
        for first in range(0, len(prompts), batch):
            rows = prompts[first:first + batch]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device="cuda")  # [b, width]
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cuda")
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad)[:, width:]  # [b, new]
            is_eos = (out == eos).int()
            before_eos = (is_eos.cumsum(dim=1) - is_eos) == 0  # [b, new] up to and including the first eos
            tokens += int(before_eos.sum())
        torch.cuda.synchronize()
        return tokens, time.perf_counter() - start

    run()
    return max(tokens / seconds for tokens, seconds in (run() for _ in range(iters)))


def gpu_section(models, prompts_for, results_by_batch, max_seq_len: int, args) -> None:
    from transformers import AutoModelForCausalLM

    hf_dir = models.checkpoint.parent / "hf"
    if not (hf_dir / "config.json").is_file():
        tlt_to_hf(models.checkpoint, hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, args.dtype)).to("cuda").eval()
    eos, pad = models.tokenizer.eos_token_id, models.tokenizer.pad_token_id
    print(f"GPU: {torch.cuda.get_device_name()}, {args.dtype}")
    for batch, results in results_by_batch.items():
        hf = hf_tokens_per_s(hf_model, prompts_for(batch), batch, args.max_new_tokens, eos, pad, args.iters)
        ours = {mode: results[mode].tokens_per_s for mode in ("plain", "adaptive")}
        print(f"B={batch:<3} transformers generate: {hf:8.1f} tokens/s; megatron_tlt plain {ours['plain'] / hf:5.2f}x, "
              f"adaptive {ours['adaptive'] / hf:5.2f}x of it")
    del hf_model
    engine = make_engine(models, "plain", 1, max_seq_len, args)
    prompt = prompts_for(1)[0]
    short, long = 16, min(args.max_new_tokens, max_seq_len - len(prompt))
    step_s = decode_step_s(engine, prompt, short, long, args.iters)
    cfg = models.policy.cfg
    kv_bytes_per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.model_calls.cache.k[0].element_size()
    context = len(prompt) + (short + long) / 2  # mean cached length over the measured steps
    bytes_per_token = weight_bytes_per_token(models.policy) + kv_bytes_per_position * context
    achieved = bytes_per_token / step_s
    print(f"batch-1 decode: {1e3 * step_s:.3f} ms/token, {bytes_per_token / 1e6:.1f} MB read per token "
          f"({weight_bytes_per_token(models.policy) / 1e6:.1f} MB weights), {achieved / 1e9:.0f} GB/s = "
          f"{achieved / args.peak_bandwidth:.1%} of the {args.peak_bandwidth / 1e12:.2f} TB/s roofline (target >= 70%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompts-per-slot", type=int, default=2, help="prompts per KV slot: queued prompts keep the batch live")
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--chain-depth", type=int, default=8)
    p.add_argument("--tree-depth", type=int, default=4)
    p.add_argument("--tree-topk", type=int, default=4)
    p.add_argument("--tree-verify", type=int, default=12)
    p.add_argument("--max-spec-batch", type=int, default=32, help="adaptive: live batches above this decode plainly")
    p.add_argument("--sampled-batch", type=int, default=4, help="live batch size of the sampled rows (0: skip them)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.6], help="of the sampled rows")
    p.add_argument("--invariant-check", action="store_true",
                   help="also time plain and adaptive with rollout.batch_invariant at temperature 1 (use with --dtype bfloat16)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per mode after a warm-up; the best counts")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="of the benchmarked models (trained in float32)")
    p.add_argument("--peak-bandwidth", type=float, default=3.35e12, help="bytes/s of the GPU's HBM (H100 SXM: 3.35e12)")
    p.add_argument("--heads-batch", type=int, default=1, help="live batch of the drafter heads' comparison")
    p.add_argument("--heads-only", action="store_true", help="only the drafter heads' comparison")
    p.add_argument("--head", choices=("eagle3", "eagle"), default="eagle3",
                   help="the drafter of the batch sweep and the sampled rows (drafter.arch; eagle3 is the default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --quick-models, --heads-only, --iters 1, --max-new-tokens 48, --min-prompts 4")
    args = p.parse_args()
    if args.quick:
        args.quick_models, args.heads_only, args.iters, args.max_new_tokens, args.min_prompts = True, True, 1, 48, 4
    apply_quick_models(args)

    ps = init_parallel()
    start = time.perf_counter()
    models = trained_models(args, ps, dtype=args.dtype)
    cfg = models.policy.cfg
    for line in models.report:
        print(line)
    print(f"policy: hidden {cfg.hidden_size} x {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
          f"{sum(p.numel() for p in models.policy.parameters()) / 1e6:.1f}M parameters; drafters (1 layer each): eagle "
          f"{sum(p.numel() for p in models.drafter.parameters()) / 1e6:.1f}M, eagle3 "
          f"{sum(p.numel() for p in models.eagle3.parameters()) / 1e6:.1f}M parameters (+ the policy's embedding and LM head); "
          f"{args.dtype} on {ps.device.type} ({torch.get_num_threads()} threads); setup {time.perf_counter() - start:.0f} s")

    held_out = [models.held_out[i].prompt_ids for i in range(len(models.held_out))]

    def prompts_for(batch: int) -> list[list[int]]:
        n = max(args.prompts_per_slot * batch, args.min_prompts)
        return [held_out[i % len(held_out)] for i in range(n)]

    max_seq_len = max(len(q) for q in held_out) + args.max_new_tokens
    eos = (models.tokenizer.eos_token_id,)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, stop_token_ids=eos)
    print(f"shapes: chain depth {args.chain_depth}; tree depth {args.tree_depth}, top-{args.tree_topk}, verify {args.tree_verify}; "
          f"adaptive over off/chain/tree at live batch <= {args.max_spec_batch}")
    heads_section(models, prompts_for(args.heads_batch), max_seq_len, eos, args)
    if args.heads_only:
        print(f"total {time.perf_counter() - start:.0f} s")
        destroy_parallel()
        return
    if args.head == "eagle3":
        models = dataclasses.replace(models, drafter=models.eagle3)
    print(f"batch sweep and sampled rows: the {args.head} drafter")
    results_by_batch = {}
    for batch in args.batch_sizes:
        t0 = time.perf_counter()
        results = bench_batch(models, prompts_for(batch), batch, greedy, max_seq_len, args)
        results_by_batch[batch] = results
        print_rows("greedy", batch, results)
        print(f"        outputs: {identical_note(results)}; {time.perf_counter() - t0:.0f} s")
    sampled = {}
    for temperature in args.temperatures if args.sampled_batch else []:
        t0 = time.perf_counter()
        params = SamplingParams(temperature=temperature, max_new_tokens=args.max_new_tokens, stop_token_ids=eos, seed=args.seed)
        sampled[temperature] = results = bench_batch(
            models, prompts_for(args.sampled_batch), args.sampled_batch, params, max_seq_len, args, SAMPLED_MODES
        )
        print_rows(f"temp {temperature:g}", args.sampled_batch, results)
        print(f"        outputs: {identical_note(results)}; {time.perf_counter() - t0:.0f} s")

    print("adaptive selector, decode steps per live-batch bucket (timed rounds):")
    for batch, results in results_by_batch.items():
        print(f"  B={batch:<3} {arm_summary(results['adaptive'].arms)}")

    def ratio(results, mode):
        return results[mode].tokens_per_s / results["plain"].tokens_per_s

    small = [b for b in results_by_batch if b <= 4]
    if small:
        worst = ", ".join(f"{m} {min(ratio(results_by_batch[b], m) for b in small):.2f}x" for m in MODES[1:])
        print(f"SD/plain at B<=4 (worst of B={', '.join(map(str, small))}): {worst}  (target: >= 2x)")
    worst_b = min(results_by_batch, key=lambda b: ratio(results_by_batch[b], "adaptive"))
    print(f"adaptive/plain worst case over B: {ratio(results_by_batch[worst_b], 'adaptive'):.2f}x at B={worst_b}  (target: >= 1x)")
    for temperature, results in sampled.items():
        print(f"temperature {temperature:g} at B={args.sampled_batch}, coupled vs top-k drafts: " + "; ".join(
            f"{m} accept {results[m].accept_len:.2f} vs {results[m + '/topk'].accept_len:.2f}, "
            f"{ratio(results, m):.2f}x vs {ratio(results, m + '/topk'):.2f}x plain" for m in MODES[1:]
        ))

    if args.invariant_check:
        invariant_section(models, prompts_for(args.sampled_batch), max_seq_len, eos, args)

    if torch.cuda.is_available():
        gpu_section(models, prompts_for, results_by_batch, max_seq_len, args)
    else:
        print("GPU section skipped: CUDA is not available (transformers generate baseline and HBM roofline need a GPU)")
    print(f"total {time.perf_counter() - start:.0f} s")
    destroy_parallel()


if __name__ == "__main__":
    main()
