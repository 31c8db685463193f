"""Peak memory per rank, measured on CPU, next to the memory plan's prediction (`megatron_tlt.plan`).

Each configuration runs in fresh processes (one, or two gloo DP ranks): the rollout engine is built first (its
KV cache is held from then on, as in a run), then `PolicyTrainer` steps over two packed micro-batches of
--tokens tokens each (--dp-tokens in the DP = 2 runs; examples of --example-len tokens), then one rollout.
Step 1 creates the AdamW state; step 2, with gradients of the first micro-batch alive during the second, is
the steady state measured.

How memory is measured: torch's CPU allocator reports every allocation and free to the profiler when
`torch.profiler.profile(profile_memory=True)` runs (its `[memory]` events); the profile starts before the
model is built, so the running sum of those events, in time order, is the bytes of every torch tensor alive,
and the peak of that sum inside a phase (a `record_function` window: "train step", "rollout") is the phase's
peak. Nothing of the plan's code is used for it. It does not see memory outside torch's allocator (Python
objects, gloo buffers) nor the allocator's own overhead. `activations` is the training peak minus the real
tensors held through it (parameters, their .grad, the optimizer's local state, the KV cache), summed from
the tensors themselves. optim.rollback is off, so the activations are the training peak (with it on, the
copy of weights + AdamW state at the step is the larger on small models; the plan counts it when set).
Step time is the fastest of --timed-steps more steps after the profile, without it.

Lines printed: for each configuration the measured peaks (training, rollout), the plan's prediction next to
each and the ratio, the optimizer state and activation bytes and the step time; then the ratios the issue
sets targets for: optimizer-state bytes per rank, plain / distributed at DP = 2 (target: the DP size), and
activations none / full (target >= 4x) at <= 40% extra step time.

    python tools/bench/memory.py                          # CPU defaults: a few minutes on 2 cores
    python tools/bench/memory.py --tokens 4096 --layers 4 # quicker
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.profiler import ProfilerActivity, profile, record_function

from megatron_tlt.config.schema import AlgoConfig, Config, DataConfig, DrafterConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.parallel.state import free_port, set_local_rank_env
from megatron_tlt.plan import memory_plan
from megatron_tlt.rl.sample import Sample
from megatron_tlt.rollout import RolloutEngine, SamplingParams
from megatron_tlt.trainer.policy import PolicyTrainer

MB = 2**20
PHASES = ("train step", "rollout")


def bench_config(args, recompute: str, distributed: bool, tokens: int) -> Config:
    model = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.heads,
        max_position_embeddings=max(args.example_len, args.prompt_len + args.new_tokens),
    )
    return Config(
        model=model,
        data=DataConfig(max_prompt_tokens=args.prompt_len),
        rollout=RolloutConfig(n=args.n, max_new_tokens=args.new_tokens, kv_cache_gb=args.kv_cache_mb / 1024, cuda_graphs="off"),
        drafter=DrafterConfig(online=False),
        optim=OptimConfig(lr=1e-4, micro_batch_tokens=tokens, rollback=False, distributed=distributed,
                          recompute=recompute),
        run=RunConfig(prompts_per_step=args.prompts, seed=args.seed),
    )


def phase_peaks(prof) -> dict[str, int]:
    """Peak of the running sum of the allocator's [memory] events inside each PHASES window."""
    events = list(prof.profiler.kineto_results.events())
    windows = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in PHASES}
    peaks, alive = dict.fromkeys(windows, 0), 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        alive += e.nbytes()
        for name, (start, end) in windows.items():
            if start <= e.start_ns() <= end:
                peaks[name] = max(peaks[name], alive)
    return peaks


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _worker(rank: int, world: int, port: int, args, recompute: str, distributed: bool, tokens: int, rollout: bool, out: str) -> None:
    set_local_rank_env(rank, world, port)
    torch.set_num_threads(max(1, args.threads // world))
    cfg = bench_config(args, recompute, distributed, tokens)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ps = init_parallel()
        set_seed(args.seed)
        model = Policy(cfg.model, ps.tp_group)
        model.set_recompute(recompute, cfg.optim.recompute_every)
        engine = RolloutEngine(model, max_seq_len=args.prompt_len + args.new_tokens,
                               cache_budget_bytes=int(cfg.rollout.kv_cache_gb * 2**30), cuda_graphs="off")
        trainer = PolicyTrainer(model, cfg.optim, AlgoConfig(), ps, total_steps=10)
        gen = torch.Generator().manual_seed(args.seed + rank)
        per_mb = tokens // args.example_len
        samples = [Sample(torch.randint(0, args.vocab, (16,), generator=gen).tolist(),
                          torch.randint(0, args.vocab, (args.example_len - 16,), generator=gen).tolist(),
                          [-1.0] * (args.example_len - 16), advantage=float(k % 2) - 0.5) for k in range(2 * per_mb)]
        micro_batches = [list(range(per_mb)), list(range(per_mb, 2 * per_mb))]
        step = lambda: trainer.step(samples, micro_batches, max_response_len=args.example_len)  # noqa: E731
        step()
        with record_function("train step"):
            step()
        local = trainer.optimizer.optim if isinstance(trainer.optimizer, ZeroRedundancyOptimizer) else trainer.optimizer
        optimizer = tensor_bytes(v for s in local.state.values() for v in s.values())
        params = list(model.parameters())
        held = tensor_bytes(params) + tensor_bytes(p.grad for p in params) + optimizer
        held += tensor_bytes(engine.model_calls.cache.k + engine.model_calls.cache.v)
        if rollout:
            prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
            with record_function("rollout"), torch.no_grad():
                engine.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, n=args.n, seed=args.seed))
    seconds = []
    for _ in range(args.timed_steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    plan = memory_plan(cfg, world, ps.tp_group).ranks[0]
    peaks = phase_peaks(prof)
    result = dict(train=peaks["train step"], rollout=peaks.get("rollout"), optimizer=optimizer,
                  activations=peaks["train step"] - held, step_s=min(seconds), plan_train=plan.training_bytes,
                  plan_rollout=plan.rollout_bytes, plan_optimizer=plan.optimizer, plan_activations=plan.activations)
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    destroy_parallel()


def run(args, name: str, world: int, tokens: int, recompute: str = "none", distributed: bool = False, rollout: bool = False) -> dict:
    """One configuration in fresh processes; prints its line and returns rank 0's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.start_processes(_worker, args=(world, free_port(), args, recompute, distributed, tokens, rollout, out), nprocs=world,
                           join=True, start_method="spawn")
        r = json.loads(Path(f"{out}.0").read_text())
    line = (f"{name:<28} training peak {r['train'] / MB:8.1f} MB (plan {r['plan_train'] / MB:8.1f}, "
            f"{r['plan_train'] / r['train']:5.3f}x)")
    if rollout:
        line += f"  rollout peak {r['rollout'] / MB:7.1f} MB (plan {r['plan_rollout'] / MB:7.1f}, {r['plan_rollout'] / r['rollout']:5.3f}x)"
    line += (f"  optimizer {r['optimizer'] / MB:6.1f} MB (plan {r['plan_optimizer'] / MB:6.1f})  activations "
             f"{r['activations'] / MB:7.1f} MB (plan {r['plan_activations'] / MB:7.1f})  step {r['step_s']:6.2f} s")
    print(line, flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per packed micro-batch (optim.micro_batch_tokens)")
    p.add_argument("--dp-tokens", type=int, default=2048, help="tokens per micro-batch of the DP = 2 runs (they compare optimizer state)")
    p.add_argument("--example-len", type=int, default=1024, help="tokens per packed example")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=8, help="rollout prompts (run.prompts_per_step)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (rollout.n)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=float, default=64.0, help="rollout.kv_cache_gb, in MB")
    p.add_argument("--timed-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over the DP ranks)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; micro-batches of {args.tokens} tokens "
          f"({args.dp_tokens} at DP=2) of {args.example_len}-token examples, 2 per step; fp32 on CPU, {args.threads} threads")

    runs = {mode: run(args, f"DP=1 recompute={mode}", 1, args.tokens, recompute=mode, rollout=mode == "none")
            for mode in ("none", "selective", "full")}
    plain = run(args, "DP=2 plain AdamW", 2, args.dp_tokens)
    zero = run(args, "DP=2 distributed optimizer", 2, args.dp_tokens, distributed=True)
    none, full = runs["none"], runs["full"]
    print(f"optimizer state per rank, plain / distributed at DP=2: {plain['optimizer'] / zero['optimizer']:.2f}x (target 2x); "
          f"training peak {plain['train'] / zero['train']:.2f}x")
    for mode in ("selective", "full"):
        r = runs[mode]
        print(f"recompute {mode}: activations {none['activations'] / r['activations']:.2f}x smaller than none, "
              f"step time {r['step_s'] / none['step_s'] - 1:+.0%}" + (" (target >= 4x at <= +40%)" if mode == "full" else ""))


if __name__ == "__main__":
    main()
