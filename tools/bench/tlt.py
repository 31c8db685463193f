"""End-to-end RL step, TLT vs SD with a frozen drafter vs no SD, on a long-tailed workload (DESIGN targets:
TLT >= 1.7x step speedup over no SD; drafter training <= 3% of the critical path).

The starting point is the rollout benchmark's (tools/bench/common.py, cached under --cache-dir): a policy
trained supervised on the countdown task's worked solutions (their lengths are long-tailed: see the
printed p90/p50 and max) and an EAGLE drafter trained offline on the policy's own samples. One
invocation then runs the same GRPO workload from it three times, each as a 2-DP-rank run on this machine
(gloo, launched like `megatron-tlt demo`, with its `train_on_local_ranks`), same seed and settings:
- nosd:   rollout.spec=off
- frozen: rollout.spec=adaptive, drafter.online=false (the offline drafter, never trained again)
- tlt:    rollout.spec=adaptive, drafter.online=true  (the same drafter, then spot training on idle ranks)
- steal:  rollout.spec=off with work stealing only (coordinator.steal=true: round-robin placement, in order)
- sched:  rollout.spec=off with the long-tail scheduler (coordinator.assignment=balanced, admission=longest_first,
          steal=true)
- tlt_sched: tlt with the scheduler (--modes picks; the scheduler's predictions need prompts that recur: --prompt-pool)
- frozen3 / tlt3: frozen / tlt with the EAGLE-3 head (drafter.arch=eagle3) trained offline at the same budget
  on the same samples as the EAGLE head the other modes use; with both present it prints the EAGLE-3 / EAGLE
  ratios of accepted length and step speedup (online, both heads get the same idle time to train in)
Rollouts sample at --temperature (1, as in RL; 0: greedy). Rewards: the task's verifier plus 0.5 x the format reward (a
final answer is stated), so the policy has a signal, and moves, even while it rarely solves a task.

The workload is the regime TLT addresses: a few long responses (up to --max-new-tokens, near the model's
1024-token context; p90/p50 ~3.5, the longest several times p90) hold the rollout, and the rollout holds
about three quarters of the no-SD step (printed: its share). The held-out evaluations a run makes before
and after RL (greedy, 4 prompts) are outside the measured steps.

The comparison is exact. Speculative decoding samples the very tokens plain decoding does (position-keyed
noise, rollout/sampling.py), so the three runs roll out identical responses at every step and make
identical policy updates: only the time differs. Every run saves its rollouts (`run.save_rollouts`), and
the bench checks this per (step, prompt, sample): `identical rollouts across modes: X of Y sequences`,
and the first step where any sequence differs, if one does.

The first --skip steps of every run are left out of the means (the first rollouts also pay one-off
costs). Per mode it prints means over the remaining steps of rank 0's metrics.jsonl rows (rollout time:
the slowest rank's), then the speedups of the means and the critical-path share of drafter training
under TLT: the time ranks spent after the stop signal (stop_latency_s + merge_time_s) over step time.

    python tools/bench/tlt.py            # CPU (2 cores): 4-13 min to train the models once (cached), then ~9 min:
                                         # per mode ~1 min of start-up and evaluations, then 12 steps of ~16 s (no SD)
                                         # or ~8 s (SD) with 4 prompts x 8 samples
    python tools/bench/tlt.py --quick    # 3 steps of 4 prompts x 4 samples up to 256 tokens: a few minutes
    python tools/bench/tlt.py --quick --quick-models --modes frozen,frozen3 --steps 1   # smoke run of the heads (~2 min)
    python tools/bench/tlt.py --modes nosd,steal,sched,tlt,tlt_sched --prompt-pool 16 --lr 1e-12 --prompts 8 --max-batch 4
                                         # the scheduler (see below), ~43 min: 32 requests per rank queue for 4 KV slots,
                                         # so placement, admission order and stealing matter
    python tools/bench/tlt.py --task-args '{"attempts_per_number": 6}' --modes nosd,sched,tlt,tlt_sched --prompt-pool 16 \
        --lr 1e-12 --prompts 8 --max-batch 4   # the same on countdown whose lengths follow from the prompt (its own
                                               # cached models, ~19 min to train, then ~45 min)
    python tools/bench/tlt.py --task-args '{"attempts_per_number": 6}' --sft-steps 450 --modes nosd,sched,tlt_sched \
        --prompt-pool 16 --lr 1e-12 --prompts 8 --max-batch 4 --steps 8   # the same with a policy trained 3x longer, whose
                                               # lengths depend more on the prompt (~25 min to train, then ~22 min)

The scheduler places samples on other ranks, so the update packs and sums them in another order: the weights
then differ in their last bits and sampled rollouts drift apart after a few steps (the identical-rollouts line
says when). --lr 1e-12 keeps the fp32 weights unchanged, so every mode rolls out exactly the same tokens at every
step (the same work) and only the time differs. With --max-batch it also replays schedules on the no-SD run's true
lengths (tools/bench/sched_replay.py, in decode steps: round-robin, stealing only, the scheduler on its history, on
more history, on each group's true mean and max, on every sample's length, and the floor max(longest, tokens /
slots)): the headroom that length prediction leaves, and how much of it a prediction from history can reach. The
scheduler's replay on its own history matches its measured decode steps to ~1%. The scheduler's line gives its
makespan both in wall time and in work (the slowest rank's decode steps, from the runs' sched_actual_makespan
metric), which does not move with the machine's load as the seconds of two runs minutes apart do.
    python tools/bench/tlt.py --hidden 1024 --layers 24 --heads 16 --kv-heads 4 --sft-steps 600 --prompts 64   # on a GPU

Ratios only on CPU: absolute times on a shared CPU are noisy, and a small model's decode step is
dominated by per-step overhead rather than by matmuls.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TrainedModels, add_model_args, apply_quick_models, bench_config, trained_models  # noqa: E402

from sched_replay import read_responses, report  # noqa: E402

from megatron_tlt.config import load_config  # noqa: E402
from megatron_tlt.config.schema import CoordinatorConfig  # noqa: E402
from megatron_tlt.cli.demo import train_on_local_ranks  # noqa: E402
from megatron_tlt.metrics import read_jsonl  # noqa: E402
from megatron_tlt.parallel import destroy_parallel, init_parallel  # noqa: E402

SCHEDULER = ["coordinator.assignment=balanced", "coordinator.admission=longest_first", "coordinator.steal=true"]
MODES = {
    "nosd": ("no SD", ["rollout.spec=off"]),
    "frozen": ("SD, frozen drafter", ["rollout.spec=adaptive", "drafter.online=false"]),
    "tlt": ("TLT", ["rollout.spec=adaptive", "drafter.online=true"]),
    "steal": ("work stealing only", ["rollout.spec=off", "coordinator.steal=true"]),
    "sched": ("scheduler only", ["rollout.spec=off", *SCHEDULER]),
    "tlt_sched": ("TLT + scheduler", ["rollout.spec=adaptive", "drafter.online=true", *SCHEDULER]),
    "frozen3": ("SD, frozen EAGLE-3", ["rollout.spec=adaptive", "drafter.online=false"]),
    "tlt3": ("TLT, EAGLE-3", ["rollout.spec=adaptive", "drafter.online=true"]),
}
HEAD_OF = {"frozen3": "eagle3", "tlt3": "eagle3"}  # drafter.arch of a mode; the others: eagle


def settings(a: argparse.Namespace, models: TrainedModels, mode: str) -> list[str]:
    data = bench_config(a).data
    verifier = "countdown" if a.task == "countdown" else "math"
    return [
        f"run.dir={Path(a.out) / mode}", f"run.seed={a.seed}", "run.tensorboard=false", "run.eval_every=0",
        f"run.model_path={models.checkpoint}", f"drafter.path={models.heads[HEAD_OF.get(mode, 'eagle')]}",
        f"drafter.arch={HEAD_OF.get(mode, 'eagle')}", f"rollout.temperature={a.temperature}",
        "run.sft_steps=0", "drafter.warmup_steps=0",
        f"data.task={a.task}", f"data.task_args={json.dumps(a.task_args)}", f"data.num_examples={a.prompt_pool or data.num_examples}", "data.eval_examples=4",
        f"data.max_prompt_tokens={data.max_prompt_tokens}", f"reward.fns=[{{name: {verifier}}}, {{name: format, weight: 0.5}}]", "reward.num_workers=0",
        f"run.steps={a.steps}", f"run.prompts_per_step={a.prompts}", f"rollout.n={a.n}",
        f"rollout.max_new_tokens={a.max_new_tokens}", f"rollout.max_spec_batch={a.max_spec_batch}",
        f"optim.lr={a.lr}", f"drafter.lr={a.drafter_lr_online}", f"drafter.micro_batch_tokens={a.drafter_tokens}", f"drafter.ttt_steps={a.ttt_steps}",
        f"drafter.ttt_hidden_weight={a.ttt_hidden_weight}",
        "run.save_rollouts=true", *([f"rollout.max_batch={a.max_batch}"] if a.max_batch else []), *MODES[mode][1],
    ]


def run_mode(a: argparse.Namespace, models: TrainedModels, mode: str, ranks: int = 2) -> tuple[list[dict], dict, float]:
    """Rank 0's metrics rows, {(step, group, prompt, sample): response token ids} of every rank, and the wall time."""
    cfg = load_config(None, settings(a, models, mode))
    run_dir = Path(cfg.run.dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run dir from an earlier invocation: start clean (no resume)
    t0 = time.perf_counter()
    train_on_local_ranks(cfg, ranks)
    wall = time.perf_counter() - t0
    return read_jsonl(run_dir / "metrics.jsonl"), read_responses(run_dir), wall


def identical(base: dict, other: dict) -> tuple[set, int | None]:
    """The keys of `base` whose responses `other` repeats token for token, and the first step where one differs."""
    same = {k for k, tokens in base.items() if other.get(k) == tokens}
    return same, min((k[0] for k in base.keys() - same), default=None)


def summarize(rows: list[dict], skip: int) -> dict[str, float]:
    rows = rows[skip:] or rows

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    def total(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows)

    def mean_of(f) -> float:
        return sum(f(r) for r in rows) / len(rows)

    spec_steps = total("spec_row_steps")
    return {
        "steps": len(rows), "step": mean("step_time_s"), "rollout": mean("rollout_time_max_s"), "train": mean("train_time_s"),
        "rollout_share": mean_of(lambda r: r["rollout_time_max_s"] / r["step_time_s"]),
        "accept": total("accepted_drafts") / spec_steps if spec_steps else float("nan"), "spec_row_steps": spec_steps,
        "drafter_steps": total("drafter_steps"), "drafter_s": total("drafter_train_time_s"),
        "recovered_s": total("idle_rank_s_recovered"), "idle_s": total("idle_rank_s"),
        "after_stop": mean("stop_latency_s") + mean("merge_time_s"),
        "p50": mean("response_len_p50"), "p90": mean("response_len_p90"), "max": max(r.get("response_len_max", 0) for r in rows),
        "reward": mean("reward_mean"), "imbalance": mean("rollout_imbalance"), "corr": mean("sched_length_corr"),
        "tokens": mean_of(lambda r: r["num_samples"] * r["response_len_mean"]),  # generated per step
        "longest": mean("response_len_max"), "stolen": mean("sched_stolen"),
        "decode_makespan": total("sched_actual_makespan"),  # the slowest rank's decode steps, summed over the steps
    }


def in_decode_steps(base: dict, other: dict) -> str:
    """The rollout makespan as work rather than wall time: the slowest rank's decode steps, summed over the
    measured steps, of the no-SD run and `other` (no SD too, so a decode step is one token per live row)."""
    b, o = base["decode_makespan"], other["decode_makespan"]
    return f"in decode steps of the slowest rank {b:.0f} -> {o:.0f}, {100 * (1 - o / b):.1f}% shorter"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="fewer and smaller RL steps")
    p.add_argument("--out", default="runs/bench_tlt")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=1, help="first RL steps left out of the means")
    p.add_argument("--prompts", type=int, default=4, help="prompts per RL step (split over the 2 ranks)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=880, help="response limit (prompts <= 128 tokens, context 1024)")
    p.add_argument("--max-spec-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=0,
                   help="KV slots per rank (rollout.max_batch; 0: as many as fit): below the requests per rank, requests queue "
                        "for a slot and the scheduler's placement and order matter")
    p.add_argument("--lr", type=float, default=1e-4, help="policy learning rate (how fast the policy moves)")
    p.add_argument("--drafter-lr-online", type=float, default=3e-4)
    p.add_argument("--drafter-tokens", type=int, default=512, help="tokens per drafter step: the unit of preemption")
    p.add_argument("--modes", default="nosd,frozen,tlt,frozen3,tlt3", help=f"a comma list of {', '.join(MODES)}")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature (1 as in RL; 0: greedy)")
    p.add_argument("--prompt-pool", type=int, default=0,
                   help="training prompts the steps draw from (0: the task's 4096); a small pool recurs over the steps (epochs), "
                        "so the scheduler's per-prompt length predictions have a history")
    a = p.parse_args(argv)
    apply_quick_models(a)
    shaping = bench_config(a)
    room = shaping.model.max_position_embeddings - shaping.data.max_prompt_tokens
    if a.max_new_tokens > room:
        p.error(f"--max-new-tokens {a.max_new_tokens}: the model's context leaves at most {room} after the prompt")
    if a.quick:
        a.steps, a.prompts, a.n, a.max_new_tokens = 3, 4, 4, 256
    ps = init_parallel()
    models = trained_models(a, ps)
    destroy_parallel()
    for line in models.report:
        print(f"[bench] {line}")
    modes = a.modes.split(",")
    res, responses = {}, {}
    for mode in modes:
        rows, responses[mode], wall = run_mode(a, models, mode)
        res[mode] = s = summarize(rows, a.skip)
        print(f"[bench] {mode}: {len(rows)} RL steps in a {wall:.0f}s run (incl. warm-up and the held-out evaluations); response length "
              f"p50 {s['p50']:.1f} p90 {s['p90']:.1f} max {s['max']:.0f} (p90/p50 {s['p90'] / max(s['p50'], 1):.2f})", flush=True)
    print(f"\nmeans over RL steps {a.skip}..{a.steps - 1} (2 DP ranks, {a.task}, hidden {a.hidden}, {a.layers} layers, "
          f"{a.prompts} prompts x {a.n} samples, max_new_tokens {a.max_new_tokens}, temperature {a.temperature:g})")
    print(f"{'mode':<20} {'step s':>8} {'rollout s':>10} {'train s':>8} {'accept':>7} {'drafter steps':>14} "
          f"{'drafter s':>10} {'idle rank-s recovered':>22} {'reward':>7} {'tokens':>7} {'longest':>8}")
    for mode in modes:
        s = res[mode]
        print(f"{MODES[mode][0]:<20} {s['step']:>8.3f} {s['rollout']:>10.3f} {s['train']:>8.3f} {s['accept']:>7.2f} "
              f"{s['drafter_steps']:>14.0f} {s['drafter_s']:>10.2f} {s['recovered_s']:>10.2f} of {s['idle_s']:>6.2f} idle "
              f"{s['reward']:>7.3f} {s['tokens']:>7.0f} {s['longest']:>8.0f}")
    if "nosd" in res:
        base = res["nosd"]
        others = [(m, MODES[m][0]) for m in ("frozen", "tlt", "steal", "sched", "tlt_sched", "frozen3", "tlt3") if m in res]
        print(f"rollout share of the no-SD step: {100 * base['rollout_share']:.0f}%")
        if others:
            print("rollout speedup vs no-SD: " + ", ".join(f"{name} {base['rollout'] / res[m]['rollout']:.2f}x" for m, name in others))
            print("step speedup vs no-SD: " + ", ".join(f"{name} {base['step'] / res[m]['step']:.2f}x" for m, name in others))
            compared = [(name, *identical(responses["nosd"], responses[m])) for m, name in others]
            total = len(responses["nosd"])
            same_all = set.intersection(*(same for _, same, _ in compared))
            print(f"identical rollouts across modes: {len(same_all)} of {total} sequences ("
                  + ", ".join(f"{name} {len(same)}/{total}" for name, same, _ in compared) + ")")
            firsts = [(name, first) for name, _, first in compared if first is not None]
            print("first step where a sequence differs: " + (f"{min(f for _, f in firsts)} (" + ", ".join(
                f"{name} step {f}" for name, f in firsts) + ")" if firsts else "none"))
        if a.max_batch:
            for line in report(responses["nosd"], 2, a.max_batch, a.skip, CoordinatorConfig.length_decay, a.max_new_tokens / 2):
                print(line)
        if "steal" in res:
            print(f"work stealing only: rollout makespan {100 * (1 - res['steal']['rollout'] / base['rollout']):.1f}% shorter "
                  f"than no SD's ({in_decode_steps(base, res['steal'])}); {res['steal']['stolen']:.1f} requests stolen per step")
        if "sched" in res:
            print(f"scheduler only: rollout makespan {100 * (1 - res['sched']['rollout'] / base['rollout']):.1f}% shorter than "
                  f"no SD's (target >= 20%; {in_decode_steps(base, res['sched'])}); rollout imbalance (slowest rank / mean) {base['imbalance']:.3f} -> "
                  f"{res['sched']['imbalance']:.3f}; predicted vs actual group length correlation {res['sched']['corr']:.2f}; "
                  f"{res['sched']['stolen']:.1f} requests stolen per step")
        if "tlt_sched" in res:
            print(f"TLT + scheduler: step speedup vs no SD {base['step'] / res['tlt_sched']['step']:.2f}x (target >= 2.3x)")
    for eagle, eagle3 in (("frozen", "frozen3"), ("tlt", "tlt3")):
        if eagle in res and eagle3 in res:
            e, e3 = res[eagle], res[eagle3]
            print(f"{MODES[eagle3][0]} vs {MODES[eagle][0]}: accepted length {e['accept']:.2f} -> {e3['accept']:.2f} "
                  f"({e3['accept'] / e['accept']:.2f}x; target >= 1.3x), rollout {e['rollout']:.3f} -> {e3['rollout']:.3f} s "
                  f"({e['rollout'] / e3['rollout']:.2f}x), step {e['step'] / e3['step']:.2f}x, drafter steps "
                  f"{e['drafter_steps']:.0f} -> {e3['drafter_steps']:.0f}")
    if "tlt" in res:
        s = res["tlt"]
        print(f"drafter training on the critical path: {100 * s['after_stop'] / s['step']:.1f}% of step time "
              f"(stop latency + merge {1000 * s['after_stop']:.1f} ms per step; target <= 3%)")


if __name__ == "__main__":
    main()
