"""Training throughput and model-FLOPs utilisation (MFU) of the policy update, `trainer.PolicyTrainer.step`.

A fresh policy (default about 1.26B parameters: hidden 2048, 24 layers, 16 heads / 8 KV heads, vocab 32000)
takes --steps optimizer steps (after --warmup-steps untimed ones) on random token samples of
--seq-len tokens (--prompt-len prompt, the rest response), --samples-per-step a step, packed into
micro-batches of --micro-batch-tokens. The step is the library's own: packed forward with bf16
autocast, chunked vocab-parallel logprobs, PPO-clip loss, backward, gradient norm and clipping, the
non-finite guard's snapshot, AdamW.

Model FLOPs (the MFU convention: what the model needs, not what the kernels happen to do) per step:
- 6 * N * tokens, N = the parameters taking part in matmuls (all but the input embedding table;
  a tied embedding counts once, as the LM head);
- plus causal attention: per sequence of length s, QK^T and PV cost 2 * 2 * layers * heads * head_dim
  multiply-adds summed over the s(s+1)/2 (query, key) pairs a causal kernel computes, times 3 for the
  backward: 6 * layers * heads * head_dim * s(s+1).
MFU = model FLOPs / step time / --peak-flops (default the H100/H200 SXM dense bf16 datasheet rate,
989 TFLOP/s). With --measure-ceilings it first times a bf16 8192^3 matmul and a device-to-device copy
(the ceilings METHOD.md asks for) and reports MFU against the measured matmul rate too.

    python tools/bench/train_mfu.py --measure-ceilings            # on a GPU: ~1 min
    python tools/bench/train_mfu.py --hidden 256 --layers 2 --vocab 1024 --seq-len 256 --samples-per-step 4 \\
        --micro-batch-tokens 1024 --steps 2 --warmup-steps 1     # a CPU smoke run
"""
from __future__ import annotations

import argparse
import time

import torch

from megatron_tlt.config.schema import AlgoConfig, ModelConfig, OptimConfig
from megatron_tlt.data.packing import plan_micro_batches
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.rl.sample import Sample
from megatron_tlt.trainer.policy import PolicyTrainer


def matmul_params(model: Policy) -> int:
    """Parameters that take part in matmuls: all but the input embedding table, unless it is the (tied) head."""
    total = sum(p.numel() for p in model.parameters())
    if model.cfg.tie_word_embeddings:
        return total
    return total - model.embed_tokens.weight.numel()


def model_flops(cfg: ModelConfig, n_matmul: int, lengths: list[int]) -> float:
    """Training FLOPs (forward + backward) of one step over sequences of `lengths`."""
    dense = 6.0 * n_matmul * sum(lengths)
    attn = 6.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * sum(s * (s + 1) for s in lengths)
    return dense + attn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(bf16 matmul FLOP/s on random 8192^3 operands, device-to-device copy bytes/s counting read + write)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)

    def best(fn, reps: int) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]  # median

    mm_s = best(lambda: a @ b, 20)
    copy_s = best(lambda: dst.copy_(src), 20)
    return 2 * n**3 / mm_s, 2 * src.numel() * src.element_size() / copy_s


def random_samples(n: int, seq_len: int, prompt_len: int, vocab: int, seed: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(0, vocab, (seq_len,), generator=gen).tolist()
        r = seq_len - prompt_len
        out.append(Sample(tokens[:prompt_len], tokens[prompt_len:], [-2.0] * r, advantage=1.0 if i % 2 else -1.0, group=i // 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width; 0: 8/3 x hidden rounded to 128")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--samples-per-step", type=int, default=16)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocator, kernel choice)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="FLOP/s of the MFU denominator (H100/H200 SXM dense bf16)")
    p.add_argument("--measure-ceilings", action="store_true", help="time a bf16 matmul and a device copy first")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    ps = init_parallel()
    dev = ps.device
    measured_flops = None
    if args.measure_ceilings and dev.type == "cuda":
        measured_flops, copy_bw = measure_ceilings(dev)
        print(f"ceilings: bf16 matmul 8192^3 {measured_flops / 1e12:.0f} TFLOP/s; device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    inter = args.intermediate or int(args.hidden * 8 / 3 + 127) // 128 * 128
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter, num_layers=args.layers,
                      num_attention_heads=args.heads, num_kv_heads=args.kv_heads, max_position_embeddings=max(args.seq_len, 1024))
    set_seed(args.seed)
    t0 = time.perf_counter()
    # Allocated without megatron-core's CPU initialisation (tens of seconds at this size), then drawn on the
    # device: normal(0, init_std) matrices, the RMSNorm weights stay ones.
    model = Policy(cfg, tp_group=ps.tp_group, init_weights=False).to(dev)
    with torch.no_grad():
        for q in model.parameters():
            if q.dim() >= 2:
                q.normal_(0.0, cfg.init_std)
    n_total, n_mm = sum(q.numel() for q in model.parameters()), matmul_params(model)
    print(f"model: hidden {cfg.hidden_size} x {cfg.num_layers} layers, {cfg.num_attention_heads}/{cfg.num_kv_heads} heads, "
          f"MLP {inter}, vocab {cfg.vocab_size}: {n_total / 1e9:.3f}B parameters ({n_mm / 1e9:.3f}B in matmuls); "
          f"built in {time.perf_counter() - t0:.0f} s on {dev.type}", flush=True)
    optim = OptimConfig(lr=1e-5, warmup_steps=0, micro_batch_tokens=args.micro_batch_tokens, bf16=True)
    trainer = PolicyTrainer(model, optim, AlgoConfig(), ps, total_steps=args.warmup_steps + args.steps)
    samples = random_samples(args.samples_per_step, args.seq_len, args.prompt_len, args.vocab, args.seed)
    lengths = [len(s.tokens) for s in samples]
    micro_batches = plan_micro_batches(lengths, args.micro_batch_tokens)
    flops = model_flops(cfg, n_mm, lengths)
    tokens = sum(lengths)
    print(f"step: {len(samples)} samples x {args.seq_len} tokens = {tokens} tokens in {len(micro_batches)} micro-batches; "
          f"{flops / 1e12:.1f} model TFLOP per step ({100 * (flops - 6.0 * n_mm * tokens) / flops:.1f}% attention); "
          f"bf16 autocast {'on' if dev.type == 'cuda' else 'off (CPU)'}", flush=True)
    times = []
    for i in range(args.warmup_steps + args.steps):
        _sync(dev)
        start = time.perf_counter()
        metrics, _ = trainer.step(samples, micro_batches, max_response_len=args.seq_len)
        _sync(dev)
        seconds = time.perf_counter() - start
        timed = i >= args.warmup_steps
        if timed:
            times.append(seconds)
        print(f"  step {i}{'' if timed else ' (warm-up)'}: {seconds:.3f} s, {tokens / seconds:,.0f} tokens/s, "
              f"loss {metrics['loss']:.4f}, grad norm {metrics['grad_norm']:.3f}", flush=True)
    step_s = sorted(times)[len(times) // 2]
    achieved = flops / step_s
    line = (f"train MFU: {tokens / step_s:,.0f} tokens/s, {achieved / 1e12:.1f} TFLOP/s = {achieved / args.peak_flops:.1%} MFU "
            f"of {args.peak_flops / 1e12:.0f} TFLOP/s peak")
    if measured_flops:
        line += f" ({achieved / measured_flops:.1%} of the measured bf16 matmul rate)"
    if dev.type == "cuda":
        line += f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(line + f" (median of {len(times)} steps, {n_total / 1e9:.2f}B parameters)", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
