"""FP8 rollouts: weight bytes, logits error and KL against high precision, rollout tokens/s, and the demo's RL with FP8.

DESIGN / issue targets: FP8 rollout weights >= 1.9x smaller than bf16; RL with FP8 rollouts + TIS within 2 points of
held-out accuracy of RL without FP8.

Sections (the policy and its prompts: tools/bench/common.py's trained benchmark policy, cached under --cache-dir):
- weights: the bytes of the quantized linears (q/k/v/o, MLP) in the policy's dtype and in bf16, against their e4m3
  values + fp32 block scales (`rollout.fp8.Fp8Weights`, block --block), and the whole model's;
- logits: --logit-prompts held-out prompts with the high-precision policy's greedy responses, one teacher-forced
  forward each in high precision and in FP8 (the same tokens): max and mean |logit error| (relative to the logits'
  std), mean and max per-token KL(high precision || FP8), top-1 agreement;
- throughput (CUDA only; skipped with the reason on CPU): rollout tokens/s of the same engine settings in the
  policy's dtype and in FP8 (GEMM path `--gemm`, logged), the same prompts with stop tokens off, so both generate
  exactly prompts x --max-new-tokens tokens (the same work), best of --iters rounds, modes alternating;
- demo (--demo): `megatron-tlt demo` twice, the same seed and settings, once as it is and once with
  rollout.precision=fp8 + algo.rollout_correction=tis: held-out accuracy after RL of each, the difference, and the
  FP8 run's mean TIS weight, ratio and k3 KL(rollout || train) over its steps (~2 x 4 min on 2 CPU cores).

    python tools/bench/fp8.py                 # weights + logits (trains the benchmark policy once if not cached)
    python tools/bench/fp8.py --demo          # + the RL comparison
    python tools/bench/fp8.py --dtype bfloat16 --hidden 1024 --layers 24 --heads 16 --kv-heads 4 --sft-steps 600   # GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, trained_models  # noqa: E402

from megatron_tlt.config.schema import DTYPES  # noqa: E402
from megatron_tlt.parallel import destroy_parallel, init_parallel  # noqa: E402
from megatron_tlt.rollout import Fp8Weights, RolloutEngine, SamplingParams  # noqa: E402


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def weights_section(policy, fp8: Fp8Weights) -> None:
    dtype = next(policy.parameters()).dtype
    numel = sum(m.weight.numel() for m in fp8.linears.values())
    hp, bf16, q = numel * next(policy.parameters()).element_size(), numel * 2, sum(w.nbytes for w in fp8.weights.values())
    total = sum(p.numel() * p.element_size() for p in policy.parameters())
    print(f"weights: {len(fp8.linears)} linears, {numel / 1e6:.2f}M parameters: {str(dtype)[6:]} {_mb(hp)}, bf16 {_mb(bf16)} -> "
          f"FP8 + scales {_mb(q)}: {bf16 / q:.2f}x smaller than bf16 (target >= 1.9x), {hp / q:.2f}x than {str(dtype)[6:]}")
    print(f"weights: whole model {_mb(total)} -> {_mb(total - hp + q)} with FP8 linears ({total / (total - hp + q):.2f}x; "
          "the embedding, norms and LM head stay in high precision)")


@torch.no_grad()
def logits_section(models, fp8: Fp8Weights, n_prompts: int, max_new: int) -> None:
    policy = models.policy
    prompts = [models.held_out[i].prompt_ids for i in range(min(n_prompts, len(models.held_out)))]
    eos = (models.tokenizer.eos_token_id,)
    max_seq_len = max(len(p) for p in prompts) + max_new
    engine = RolloutEngine(policy, max_seq_len=max_seq_len, cache_budget_bytes=1 << 28)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_token_ids=eos))
    max_err = sum_err = sum_std = kl_sum = kl_max = agree = count = 0.0
    for prompt, (c,) in zip(prompts, outs):
        seq = torch.tensor(prompt + c.token_ids, device=policy.embed_tokens.weight.device)[None]
        hp = policy(seq)[0].float()  # [L, V]
        with fp8.active():
            lo = policy(seq)[0].float()
        err = (lo - hp).abs()
        max_err, sum_err, sum_std = max(max_err, float(err.max())), sum_err + float(err.mean()) * len(hp), sum_std + float(hp.std(-1).sum())
        lp, lq = torch.log_softmax(hp, -1), torch.log_softmax(lo, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # [L] KL(hp || fp8)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        agree += float((hp.argmax(-1) == lo.argmax(-1)).sum())
        count += len(hp)
    std = sum_std / count
    print(f"logits: {len(prompts)} held-out prompts + greedy responses, {count:.0f} positions: |error| max {max_err:.4f}, "
          f"mean {sum_err / count:.4f} (logit std {std:.3f}: mean error {100 * sum_err / count / std:.2f}% of it)")
    print(f"logits: KL(high precision || FP8) per token mean {kl_sum / count:.2e}, max {kl_max:.2e}; "
          f"top-1 agreement {100 * agree / count:.2f}%")


def throughput_section(models, args, device: torch.device) -> None:
    if device.type != "cuda":
        print("throughput: skipped: no CUDA device (on the CPU the FP8 GEMM is the dequantized fp32 reference or an "
              "emulated torch._scaled_mm: no speed-up to measure)")
        return
    prompts = [models.held_out[i % len(models.held_out)].prompt_ids for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, stop_token_ids=())  # no early stop: same tokens
    max_seq_len = max(len(p) for p in prompts) + args.max_new_tokens
    engines = {mode: RolloutEngine(models.policy, max_seq_len=max_seq_len, cache_budget_bytes=4 << 30, max_batch=args.batch,
                                   precision=mode, fp8_gemm=args.gemm, fp8_block=args.block) for mode in ("auto", "fp8")}
    best = {mode: float("inf") for mode in engines}
    for e in engines.values():
        e.generate(prompts, params)  # warm-up: CUDA graphs captured
    for _ in range(args.iters):
        for mode, e in engines.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            e.generate(prompts, params)
            torch.cuda.synchronize()
            best[mode] = min(best[mode], time.perf_counter() - t)
    tokens = len(prompts) * args.max_new_tokens
    hp, q = tokens / best["auto"], tokens / best["fp8"]
    print(f"throughput: batch {len(prompts)} x {args.max_new_tokens} tokens on {torch.cuda.get_device_name(device)}: "
          f"{str(next(models.policy.parameters()).dtype)[6:]} {hp:.0f} tokens/s, FP8 ({engines['fp8'].model_calls.fp8.path}) "
          f"{q:.0f} tokens/s: {q / hp:.2f}x")


def demo_section(args) -> None:
    from megatron_tlt.cli.demo import run_demo

    runs = {}
    for name, extra in (("no FP8", []), ("FP8 + TIS", ["rollout.precision=fp8", "algo.rollout_correction=tis"])):
        start = time.perf_counter()
        run_dir = run_demo(overrides=[f"run.dir={args.demo_dir}/{name.replace(' ', '').replace('+', '_')}", *extra, *args.demo_overrides])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        runs[name] = rows
        print(f"demo: {name}: held-out accuracy after RL {100 * rows[-1]['eval_accuracy']:.1f}% "
              f"({len(rows)} steps, {time.perf_counter() - start:.0f} s)", flush=True)
    base, fp8 = runs["no FP8"][-1]["eval_accuracy"], runs["FP8 + TIS"][-1]["eval_accuracy"]
    rows = runs["FP8 + TIS"]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    print(f"demo: FP8 + TIS - no FP8 = {100 * (fp8 - base):+.1f} points (target within 2)")
    print(f"demo: FP8 run: mean TIS weight {mean('rollout_tis_weight_mean'):.4f}, ratio pi_train / pi_rollout mean "
          f"{mean('rollout_ratio_mean'):.4f} (max {max(r['rollout_ratio_max'] for r in rows):.3f}), truncated "
          f"{100 * mean('rollout_truncated_frac'):.3f}% of tokens, k3 KL(rollout || train) {mean('rollout_kl_k3'):.2e} per token; "
          f"no-FP8 run: k3 KL {sum(r['rollout_kl_k3'] for r in runs['no FP8']) / len(runs['no FP8']):.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="of the benchmarked policy (trained in float32)")
    p.add_argument("--block", type=int, default=128, help="FP8 block edge")
    p.add_argument("--gemm", default="auto", choices=["auto", "scaled_mm", "triton", "reference"], help="FP8 GEMM path")
    p.add_argument("--logit-prompts", type=int, default=32)
    p.add_argument("--logit-max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="throughput: prompts, all live at once")
    p.add_argument("--max-new-tokens", type=int, default=256, help="throughput: tokens generated per prompt")
    p.add_argument("--iters", type=int, default=3, help="throughput: timed rounds per mode (the best counts)")
    p.add_argument("--demo", action="store_true", help="also run the demo's RL with and without FP8 rollouts (~8 min on CPU)")
    p.add_argument("--demo-dir", default="/tmp/megatron_tlt_bench/fp8_demo", help="where the two demo runs go")
    p.add_argument("--demo-overrides", nargs="*", default=[], help="config overrides for both demo runs")
    args = p.parse_args()

    ps = init_parallel()
    start = time.perf_counter()
    models = trained_models(args, ps, dtype=args.dtype)
    cfg = models.policy.cfg
    print(f"policy: hidden {cfg.hidden_size} x {cfg.num_layers} layers, vocab {cfg.vocab_size}, {args.dtype} on {ps.device.type} "
          f"({torch.get_num_threads()} threads); FP8 block {args.block}; setup {time.perf_counter() - start:.0f} s")
    fp8 = Fp8Weights(models.policy, args.block, args.gemm)
    fp8.load()
    weights_section(models.policy, fp8)
    logits_section(models, fp8, args.logit_prompts, args.logit_max_new_tokens)
    throughput_section(models, args, ps.device)
    destroy_parallel()
    if args.demo:
        demo_section(args)


if __name__ == "__main__":
    main()
