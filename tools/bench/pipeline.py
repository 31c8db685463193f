"""Pipeline parallelism on CPU: the measured bubble, the reshard into the rollout layout, memory per rank.

Everything runs in real gloo processes (one CPU thread each), in one invocation:

1. Bubble, at PP = --pp (world = PP, 1 x PP, default 2): a pipeline step is `trainer.schedule.run_micro_batches`
   with backward (what `PolicyTrainer.step` runs: torch.distributed.pipelining's Schedule1F1B at vpp = 1,
   ScheduleInterleaved1F1B at vpp = 2) over m = 4, 8, 16 micro-batches. Inside this bench only,
   `forward_one_chunk` / `backward_one_chunk` of torch's pipeline stages and the schedule's `_compute_loss`
   (the last stage's LM head and loss) are wrapped to record the wall-clock span of every compute action
   (time.monotonic: one clock for every process on the machine). Per step, the window runs from the first
   compute action on any rank to the last one; a rank's idle fraction = 1 - (its compute time) / window:
   the bubble plus p2p waits. Averaged over --steps steps (after one untimed step) and printed next to the
   theory for equal-cost stages and micro-batches: 1F1B (p-1)/(m+p-1); interleaved with v chunks per rank,
   each 1/v of the rank's work, (p-1)/(v*m+p-1) (the bubble (p-1)/v chunk-times of a step of m + (p-1)/v;
   Megatron's (p-1)/(v*m) is the same bubble relative to the ideal step rather than to the whole step).
   Same work: at each m both schedules run the same m packs (the same tokens, drawn from one seed), every
   pack --examples examples of --example-len tokens (so every micro-batch has the same token count and no
   padding), on the same weights (initialised per parameter name, the same whatever the cut); the decoder
   is cut evenly (--layers divisible by 2 * PP). PP = 4 needs 4 free cores: on 2 cores, 4 processes that
   compute at once share them, which stretches the compute spans and hides the bubble, so the default is 2.
2. Reshard, per RL step: `coordinator.reshard.RolloutWeights.acquired` (training layout -> whole-model copy
   at rollout TP) once per policy version, --reshard-steps times; its own `last` (time, bytes received by
   the rank) next to the model's bytes. Layouts: TP=1 x PP=--pp -> rollout TP=1 (the bubble's run), and at world 4
   TP=2 x PP=2 -> rollout TP=2 and TP=1 x PP=2 (DP=2) -> rollout TP=2.
3. Memory per rank in the same runs, as a run holds it: the rollout engine (its KV cache, held for the whole
   run) over the rollout copy, then per step the rollout (copy acquired), then a `PolicyTrainer.step` (plain
   AdamW, optim.rollback off). Measured: the bytes of the distinct tensor storages actually allocated behind
   the training stage's parameters, their .grad, the AdamW state, the rollout copy's parameters and the KV
   cache, taken inside the rollout (copy filled) and right after the update (copy freed); the peak over the
   steps is printed. Activations are not in it (freed when the update returns; tools/bench/memory.py
   profiles them).

    python tools/bench/pipeline.py            # a few minutes on 2 idle cores
    python tools/bench/pipeline.py --quick    # smaller micro-batches, one timed step: a check that it runs

Timing on a shared machine is noisy: final bubble figures need a run with the cores to itself.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase

from megatron_tlt.config.schema import AlgoConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_tlt.coordinator.reshard import RolloutWeights
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.models.packed import token_logprobs
from megatron_tlt.models.pipeline import build_stage
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel
from megatron_tlt.parallel.sharding import full_shape
from megatron_tlt.parallel.state import free_port, set_local_rank_env
from megatron_tlt.rl.sample import Sample
from megatron_tlt.rollout import RolloutEngine
from megatron_tlt.trainer.policy import PolicyTrainer
from megatron_tlt.trainer.schedule import run_micro_batches

MB = 2**20
MICRO_BATCHES = (4, 8, 16)
PROMPT_LEN = 16  # of each sample's --example-len tokens in the reshard runs' updates


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
                       num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.heads,
                       max_position_embeddings=args.example_len)


def gathered(value) -> list:
    """`value` of every rank (the bench's side channel, not timed)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class ComputeSpans:
    """Records the wall-clock (start, end) of every compute action of this process's pipeline stages while
    active: forward and backward of a chunk, and the last stage's loss."""

    TARGETS = ((_PipelineStageBase, "forward_one_chunk"), (_PipelineStageBase, "backward_one_chunk"),
               (_PipelineSchedule, "_compute_loss"))

    def __enter__(self) -> ComputeSpans:
        self.spans: list[tuple[float, float]] = []
        self._saved = [(cls, name, getattr(cls, name)) for cls, name in self.TARGETS]
        for cls, name, fn in self._saved:
            setattr(cls, name, self._timed(fn))
        return self

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.monotonic()
            out = fn(*args, **kwargs)
            self.spans.append((start, time.monotonic()))
            return out
        return timed

    def __exit__(self, *exc) -> None:
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)


def equal_packs(args, m: int) -> list:
    """m packs of --examples random sequences of --example-len tokens each, the same for a given m."""
    g = torch.Generator().manual_seed(args.seed + m)
    return [pack_sequences([torch.randint(0, args.vocab, (args.example_len,), generator=g) for _ in range(args.examples)])
            for _ in range(m)]


def idle_fractions(stage, packs: list, ps) -> list[float]:
    """One pipeline step (forward + backward of every pack); each rank's idle fraction of the step's window."""
    chunk, tokens = stage.chunks[-1], sum(len(pb.tokens) for pb in packs)

    def head(k: int, hidden: torch.Tensor) -> torch.Tensor:
        return -token_logprobs(chunk, hidden, packs[k].targets)[0].sum() / tokens

    stage.zero_grad(set_to_none=True)
    dist.barrier()
    with ComputeSpans() as c:
        run_micro_batches(stage, packs, head, ps, backward=True)
    spans = gathered(c.spans)
    start, end = min(s for r in spans for s, _ in r), max(e for r in spans for _, e in r)
    return [1 - sum(e - s for s, e in r) / (end - start) for r in spans]


def measure_bubble(args, cfg: ModelConfig, ps) -> None:
    p = ps.pp_size
    results = {}
    for vpp in (1, 2):
        torch.manual_seed(args.seed)
        stage = build_stage(cfg, ps.tp_group, ps.pp_rank, p, vpp, device=ps.device)
        for m in MICRO_BATCHES:
            packs = equal_packs(args, m)
            idle_fractions(stage, packs, ps)  # untimed: first-call allocations
            steps = [idle_fractions(stage, packs, ps) for _ in range(args.steps)]
            idle = [sum(s[r] for s in steps) / len(steps) for r in range(p)]
            theory = (p - 1) / (vpp * m + p - 1)
            results[vpp, m] = (sum(idle) / p, theory)
            if ps.is_main:
                name = "1F1B" if vpp == 1 else f"interleaved vpp={vpp}"
                print(f"bubble PP={p} {name:<17} m={m:<2}: idle per stage {' / '.join(f'{x:.3f}' for x in idle)} "
                      f"(mean {sum(idle) / p:.3f}); theory {theory:.3f} ({'(p-1)/(m+p-1)' if vpp == 1 else '(p-1)/(v*m+p-1)'})",
                      flush=True)
    if ps.is_main:
        print("bubble summary, measured mean idle / theory: " + ", ".join(
            f"{'1F1B' if v == 1 else 'interleaved'} m={m} {got / want:.2f}x" for (v, m), (got, want) in results.items())
            + "; interleaved / 1F1B idle: " + ", ".join(
            f"m={m} {results[2, m][0] / results[1, m][0]:.2f}x (theory {results[2, m][1] / results[1, m][1]:.2f}x)"
            for m in MICRO_BATCHES), flush=True)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped; a freed storage holds 0)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def per_rank(values, unit: float = MB, fmt: str = "{:.2f}") -> str:
    """Every rank's value, in `unit`, as 'a / b / ...'."""
    return " / ".join(fmt.format(v / unit) for v in values)


def measure_layouts(args, cfg: ModelConfig, ps) -> None:
    torch.manual_seed(args.seed)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, ps.pp_size, device=ps.device)
    copy = Policy(cfg, ps.rollout.tp_group, init_weights=False).to(ps.device)
    weights = RolloutWeights(stage, copy, ps, keep=False)
    engine = RolloutEngine(copy, max_seq_len=args.example_len, cache_budget_bytes=int(args.kv_cache_mb * MB), cuda_graphs="off")
    optim = OptimConfig(lr=1e-4, micro_batch_tokens=args.examples * args.example_len, rollback=False)
    trainer = PolicyTrainer(stage, optim, AlgoConfig(), ps, total_steps=args.reshard_steps)
    g = torch.Generator().manual_seed(args.seed)
    resp = args.example_len - PROMPT_LEN
    samples = [Sample(torch.randint(0, args.vocab, (PROMPT_LEN,), generator=g).tolist(),
                      torch.randint(0, args.vocab, (resp,), generator=g).tolist(), [-1.0] * resp, advantage=float(k % 2) - 0.5)
               for k in range(2 * args.examples)]
    micro_batches = [list(range(args.examples)), list(range(args.examples, 2 * args.examples))]

    params = list(stage.parameters())
    parts = {
        "stage params": lambda: params, "grads": lambda: [p.grad for p in params],
        "AdamW": lambda: [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)],
        "rollout copy": lambda: list(copy.parameters()), "KV cache": lambda: engine.model_calls.cache.k + engine.model_calls.cache.v,
    }
    peak = {phase: dict.fromkeys([*parts, "total"], 0) for phase in ("rollout", "training")}

    def record(phase: str) -> None:
        for name, tensors in [*parts.items(), ("total", lambda: [t for f in parts.values() for t in f()])]:
            peak[phase][name] = max(peak[phase][name], held_bytes(tensors()))

    times, received = [], []
    for _ in range(args.reshard_steps):
        with weights.acquired(trainer.version):
            record("rollout")
        times.append(weights.last["reshard_time_s"])
        received.append(weights.last["reshard_bytes"])
        trainer.step(samples, micro_batches, max_response_len=resp)
        record("training")

    model_bytes = sum(torch.Size(full_shape(p, ps.rollout.tp_size)).numel() * p.element_size() for p in copy.parameters())
    rows = gathered((sorted(times)[len(times) // 2], max(received), held_bytes(params), peak))
    if not ps.is_main:
        return
    layout = f"TP={ps.tp_size}xPP={ps.pp_size}" + (f" (DP={ps.dp_size})" if ps.dp_size > 1 else "") + f" -> rollout TP={ps.rollout.tp_size}"
    print(f"reshard {layout}, world {ps.world_size}: median {per_rank([r[0] for r in rows], 1e-3, '{:.1f}')} ms per step; "
          f"received {per_rank([r[1] for r in rows])} MB per rank (ranks 0..{ps.world_size - 1}); model {model_bytes / MB:.2f} MB "
          f"(fp32), training shard {per_rank([r[2] for r in rows])} MB per rank; received / model "
          f"{max(r[1] for r in rows) / model_bytes:.2f}x on the busiest rank", flush=True)
    for phase in ("training", "rollout"):
        print(f"memory {layout} {phase:<8} peak per rank (MB): " + "; ".join(
            f"{name} {per_rank([r[3][phase][name] for r in rows])}" for name in [*parts, "total"]), flush=True)
    print(f"memory summary {layout}: rollout / training peak per rank "
          f"{per_rank([r[3]['rollout']['total'] / r[3]['training']['total'] for r in rows], 1)}x; rollout copy / training stage "
          f"params {per_rank([r[3]['rollout']['rollout copy'] / r[2] for r in rows], 1)}x; copy held while training "
          f"{per_rank([r[3]['training']['rollout copy'] for r in rows])} MB", flush=True)


def _worker(rank: int, world: int, port: int, args, tp: int, pp: int, rollout_tp: int, bubble: bool) -> None:
    set_local_rank_env(rank, world, port)
    torch.set_num_threads(1)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp), rollout_tp)
    cfg = model_config(args)
    if bubble:
        measure_bubble(args, cfg, ps)
    measure_layouts(args, cfg, ps)
    destroy_parallel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="micro-batches of 2 x 64 tokens, one timed step, 2 reshard steps")
    p.add_argument("--pp", type=int, default=2, help="pipeline size of the bubble measurement (world = PP: PP free cores)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="divisible by 2 * --pp (an even interleaved cut)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256, help="small, so the last stage's LM head adds little to its cost")
    p.add_argument("--examples", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--example-len", type=int, default=128, help="tokens per example")
    p.add_argument("--steps", type=int, default=2, help="timed pipeline steps per configuration")
    p.add_argument("--reshard-steps", type=int, default=3, help="RL steps (reshard + update) per layout")
    p.add_argument("--kv-cache-mb", type=float, default=16.0, help="the rollout engine's KV-cache budget per rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.examples, args.example_len, args.steps, args.reshard_steps = 2, 64, 1, 2
    if args.layers % (2 * args.pp):
        p.error(f"--layers {args.layers} must be divisible by 2 * --pp = {2 * args.pp} (an even cut at vpp = 2)")
    print(f"model hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, fp32; micro-batches of {args.examples} x "
          f"{args.example_len} tokens; gloo, 1 thread per rank", flush=True)
    runs = [(args.pp, 1, args.pp, 1, True), (4, 2, 2, 2, False), (4, 1, 2, 2, False)]  # world, tp, pp, rollout tp, bubble
    for world, tp, pp, rollout_tp, bubble in runs:
        mp.start_processes(_worker, args=(world, free_port(), args, tp, pp, rollout_tp, bubble), nprocs=world, join=True,
                           start_method="spawn")


if __name__ == "__main__":
    main()
