"""End-to-end RL step, TLT vs SD with a frozen drafter vs no SD, on a long-tailed workload (DESIGN targets:
TLT >= 1.7x step speedup over no SD; drafter training <= 3% of the critical path).

One invocation runs the same GRPO workload three times, each as a 2-DP-rank run on this machine (gloo,
launched like `megatron-tlt demo`, with its `train_on_local_ranks`), with the same seed and settings:
- nosd:   rollout.spec=off
- frozen: rollout.spec=adaptive, drafter.online=false (drafter warmed up offline, then never trained)
- tlt:    rollout.spec=adaptive, drafter.online=true  (the same warm-up, then spot training on idle ranks)
Each run starts with a short supervised warm-up of a fresh policy on the arithmetic task with up to
--max-terms terms (worked solutions grow with the term count, and the count is skewed, so response lengths
are long-tailed: see the printed p90/p50), then --steps RL steps. The first --skip steps of every run are
left out of the means (the first rollouts also pay one-off costs). Per mode it prints means over the
remaining steps of rank 0's metrics.jsonl rows, then the speedups of the means and the critical-path share
of drafter training under TLT: the time ranks spent after the stop signal (stop_latency_s + merge_time_s)
over step time.

    python tools/bench/tlt.py            # about 6-8 min on 2 idle CPU cores (much longer on a loaded machine)
    python tools/bench/tlt.py --quick    # about 3 min idle (about 5 min measured on 2 cores shared with another job)
    python tools/bench/tlt.py --hidden 512 --layers 8 --steps 20 --prompts 64   # larger, e.g. on a GPU host

Ratios only: absolute times on a shared CPU are noisy, and at tiny scale one decode step is dominated by
per-step Python and launch overhead rather than by matmuls, which is the regime where SD helps least.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_tlt.config import load_config
from megatron_tlt.demo import train_on_local_ranks

MODES = {
    "nosd": ("no SD", ["rollout.spec=off"]),
    "frozen": ("SD, frozen drafter", ["rollout.spec=adaptive", "drafter.online=false"]),
    "tlt": ("TLT", ["rollout.spec=adaptive", "drafter.online=true"]),
}


def settings(a: argparse.Namespace, mode: str) -> list[str]:
    return [
        f"run.dir={Path(a.out) / mode}", f"run.seed={a.seed}", "run.tensorboard=false", "run.eval_every=0",
        f"model.hidden_size={a.hidden}", f"model.intermediate_size={a.hidden * 11 // 4}", f"model.num_layers={a.layers}",
        "data.task=arithmetic", f"data.task_args={{max_terms: {a.max_terms}, max_value: 20}}", "data.eval_examples=16",
        f"run.sft_steps={a.sft_steps}", "run.sft_lr=2e-3", f"run.steps={a.steps}", f"run.prompts_per_step={a.prompts}",
        f"rollout.n={a.n}", f"rollout.max_new_tokens={a.max_new_tokens}", "optim.lr=1e-4", "reward.num_workers=0",
        f"rollout.max_spec_batch={a.max_spec_batch}", f"drafter.warmup_steps={a.drafter_warmup}", "drafter.lr=3e-4",
        *MODES[mode][1],
    ]


def run_mode(a: argparse.Namespace, mode: str, ranks: int = 2) -> tuple[list[dict], float]:
    cfg = load_config(None, settings(a, mode))
    path = Path(cfg.run.dir) / "metrics.jsonl"
    if path.exists():
        path.unlink()  # a run dir from an earlier invocation: start clean (no resume)
    t0 = time.perf_counter()
    train_on_local_ranks(cfg, ranks)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, time.perf_counter() - t0


def summarize(rows: list[dict], skip: int) -> dict[str, float]:
    rows = rows[skip:] or rows

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    def total(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows)

    spec_steps = total("spec_row_steps")
    return {
        "steps": len(rows), "step": mean("step_time_s"), "rollout": mean("rollout_time_s"), "train": mean("train_time_s"),
        "accept": total("accepted_drafts") / spec_steps if spec_steps else float("nan"), "spec_row_steps": spec_steps,
        "drafter_steps": total("drafter_steps"), "drafter_s": total("drafter_train_time_s"),
        "recovered_s": total("idle_rank_s_recovered"), "idle_s": total("idle_rank_s"),
        "after_stop": mean("stop_latency_s") + mean("merge_time_s"),
        "p50": mean("response_len_p50"), "p90": mean("response_len_p90"), "max": max(r.get("response_len_max", 0) for r in rows),
        "reward": mean("reward_mean"),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer RL steps and a shorter warm-up")
    p.add_argument("--out", default="runs/bench_tlt")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-terms", type=int, default=8)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--drafter-warmup", type=int, default=120)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=1, help="first RL steps left out of the means")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step (split over the 2 ranks)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-spec-batch", type=int, default=32)
    p.add_argument("--modes", default="nosd,frozen,tlt")
    a = p.parse_args(argv)
    if a.quick:
        a.sft_steps, a.drafter_warmup, a.steps, a.prompts = 120, 80, 4, 8
    modes = a.modes.split(",")
    res = {}
    for mode in modes:
        rows, wall = run_mode(a, mode)
        res[mode] = s = summarize(rows, a.skip)
        print(f"[bench] {mode}: {len(rows)} RL steps in a {wall:.0f}s run (incl. warm-up); response length "
              f"p50 {s['p50']:.1f} p90 {s['p90']:.1f} max {s['max']:.0f} (p90/p50 {s['p90'] / max(s['p50'], 1):.2f})", flush=True)
    print(f"\nmeans over RL steps {a.skip}..{a.steps - 1} (2 DP ranks, hidden {a.hidden}, {a.layers} layers, "
          f"{a.prompts} prompts x {a.n} samples, max_new_tokens {a.max_new_tokens})")
    print(f"{'mode':<20} {'step s':>8} {'rollout s':>10} {'train s':>8} {'accept':>7} {'drafter steps':>14} "
          f"{'drafter s':>10} {'idle rank-s recovered':>22} {'reward':>7}")
    for mode in modes:
        s = res[mode]
        print(f"{MODES[mode][0]:<20} {s['step']:>8.3f} {s['rollout']:>10.3f} {s['train']:>8.3f} {s['accept']:>7.2f} "
              f"{s['drafter_steps']:>14.0f} {s['drafter_s']:>10.2f} {s['recovered_s']:>10.2f} of {s['idle_s']:>6.2f} idle "
              f"{s['reward']:>7.3f}")
    if "nosd" in res:
        base = res["nosd"]
        others = [(name, res[m]) for m, name in (("frozen", "frozen"), ("tlt", "TLT")) if m in res]
        print("rollout speedup vs no-SD: " + ", ".join(f"{name} {base['rollout'] / s['rollout']:.2f}x" for name, s in others))
        print("step speedup vs no-SD: " + ", ".join(f"{name} {base['step'] / s['step']:.2f}x" for name, s in others))
    if "tlt" in res:
        s = res["tlt"]
        print(f"drafter training on the critical path: {100 * s['after_stop'] / s['step']:.1f}% of step time "
              f"(stop latency + merge {1000 * s['after_stop']:.1f} ms per step; target <= 3%)")


if __name__ == "__main__":
    main()
