"""Bytes that cross DP ranks per RL step: `coordinator.exchange` vs a pickled all_gather of every rank's samples.

Both ways run side by side on the same samples in 2 gloo processes. The old way (the driver before the
restructuring) was `dist.all_gather_object(parts, samples)`: each rank receives an int64 size per rank, then
every other rank's pickled sample list padded to the largest. The new way gathers the lengths, plans the update
(each rank packs its own samples; micro-batches move only to balance tokens) and sends only the moved samples.
Printed: bytes received per rank for each step (the old way receives the same on every rank).

Samples: a finished run's real response lengths (`--run-dir`, its response_lengths.jsonl; prompts of the
run's task, groups of `--n` dealt round-robin over the 2 ranks as the driver does), and a synthetic
long-tailed step where one rank's groups are much longer than the other's, so the balance must move some.

    megatron-tlt demo && python tools/bench/dp_exchange.py --run-dir runs/demo
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.parallel import init_parallel
from megatron_tlt.parallel.state import free_port, set_local_rank_env
from megatron_tlt.rl.sample import Sample

WORLD = 2


def make_samples(rank: int, lengths: list[int], prompt_lens: list[int], n: int, vocab: int, seed: int) -> list[Sample]:
    """This rank's share of one step: group g = sample index // n, on rank g % WORLD."""
    rng = random.Random(f"{seed}/{rank}")
    out = []
    for k, r in enumerate(lengths):
        g = k // n
        if g % WORLD == rank:
            out.append(Sample([rng.randrange(vocab) for _ in range(prompt_lens[g % len(prompt_lens)])],
                              [rng.randrange(vocab) for _ in range(r)], [rng.uniform(-3, 0) for _ in range(r)],
                              reward=float(rng.random() < 0.8), advantage=rng.gauss(0, 1), group=g))
    return out


def _worker(rank: int, port: int, steps: list[tuple[str, list[int]]], prompt_lens: list[int], args) -> None:
    set_local_rank_env(rank, WORLD, port)
    ps = init_parallel()
    for name, lengths in steps:
        mine = make_samples(rank, lengths, prompt_lens, args.n, args.vocab, args.seed)
        sizes = [None] * WORLD
        dist.all_gather_object(sizes, len(pickle.dumps(mine)))
        old = 8 * (WORLD - 1) + (WORLD - 1) * max(sizes)
        batch = exchange_for_update(mine, args.micro_batch_tokens, ps)
        moved = gathered(sum(1 for s in batch.samples if s not in mine))
        new = gathered(batch.bytes_received)
        if rank == 0:
            print(f"{name}: {len(lengths)} samples, {sum(lengths)} response tokens, {sum(moved)} moved; bytes received "
                  f"per rank: pickled all_gather {old}, exchange {' / '.join(map(str, new))} (ranks 0 / 1; "
                  f"{old / max(new):.1f}x less on the busier rank)", flush=True)


def gathered(value: int) -> list[int]:
    """`value` of every rank (the side channel of this benchmark, not counted)."""
    out = [None] * WORLD
    dist.all_gather_object(out, value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="a finished run (its response_lengths.jsonl); '' to skip")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 30, 59], help="steps of the run to replay")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (the run's rollout.n)")
    p.add_argument("--prompt-len", type=int, default=15, help="prompt tokens per sample")
    p.add_argument("--vocab", type=int, default=256, help="token ids are drawn below this (pickle size depends on it)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="optim.micro_batch_tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    steps = []
    if args.run_dir:
        path = Path(args.run_dir) / "response_lengths.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `megatron-tlt demo` first, or pass --run-dir ''")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        lengths = {r["step"]: r["lengths"] for r in rows}
        steps += [(f"{args.run_dir} step {s}", lengths[s]) for s in args.steps if s in lengths]
    rng = random.Random(args.seed)  # long tail on rank 0's groups only: 32 groups, rank 0's ~10x longer
    tail = [int(rng.lognormvariate(6.0 if (k // args.n) % WORLD == 0 else 3.7, 0.6)) + 1 for k in range(32 * args.n)]
    steps.append(("synthetic long-tailed step", tail))
    mp.start_processes(_worker, args=(free_port(), steps, [args.prompt_len], args), nprocs=WORLD, join=True,
                       start_method="spawn")


if __name__ == "__main__":
    main()
