"""The GPU paths against their references, on one CUDA device (`pytest -m gpu`; tools/gpu_check.sh runs them).

- CUDA-graph capture: the rollout engine's decode / verify / draft calls replayed from captured graphs give
  the tokens, logprobs and hidden states of the same static-shape calls run eagerly (greedy and sampled,
  plain, chain and tree SD, fp32 and bf16), on the first run (capture) and the second (replay);
- bf16 autocast (the trainer's `_autocast`): the packed forward's logprobs and the parameter gradients are
  close to fp32's, and differ from them (the autocast is on);
- attention backends: each packed backend (flash_attn where installed, torch_varlen, sdpa_segments) in a
  bf16 model forward/backward against the fp32 reference, within twice the reference algorithm's own bf16
  error; the KV-cache attention (decode, tree verify) against float64 on the CPU; "auto" picks a CUDA kernel;
- FP8 rollouts: torch._scaled_mm and the Triton kernels == the dequantized reference (sm89+); an FP8 engine
  replayed from CUDA graphs == eager, near bf16;
- NCCL: the 1-process group `init_parallel` makes on CUDA is NCCL, and the model, the vocab-parallel
  logprobs, the gradient all-reduce / global norm and plain collectives run over it;
- activation recomputation: selective / full == none under bf16 autocast with the CUDA kernels, with fewer
  bytes held between forward and backward; sequence parallelism over NCCL (megatron-core's own CUDA path) ==
  TP = 2 without it, which needs two GPUs (skipped on one).

Skipped without CUDA ("needs CUDA"); each test takes seconds on an H200.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist
from engine_utils import tokens_of

from megatron_tlt.config.schema import AlgoConfig, ModelConfig, OptimConfig
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.drafter import Drafter
from megatron_tlt.models.packed import packed_forward
from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.attention import BACKENDS, cache_attention_mask, cached_attention, select_backend
from megatron_tlt.ops.logprob import vocab_parallel_logprobs
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.parallel.collectives import max_over, sum_over
from megatron_tlt.parallel.grads import all_reduce_grads_, global_grad_norm
from megatron_tlt.rollout import RolloutEngine, SamplingParams
from megatron_tlt.rollout.spec.selector import DraftShape
from megatron_tlt.trainer.policy import PolicyTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = ModelConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=3, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=256, init_std=0.2,
)
PROMPTS = [[7], [3, 9, 27, 81, 15], list(range(10, 40)), [5, 6], list(range(100, 117))]
MAX_NEW = 32
SHAPES = {"chain": DraftShape.chain(4), "tree": DraftShape(depth=4, topk=3, num_verify=10)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN if either holds a NaN)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def ps():
    state = init_parallel()
    yield state
    destroy_parallel()


def _policy(ps, cfg=CFG, dtype=torch.float32) -> Policy:
    set_seed(0)
    return Policy(cfg, tp_group=ps.tp_group).to(device=ps.device, dtype=dtype)


# ---- CUDA-graph capture == eager with the same static shapes ----


def _engine(policy, drafter, spec: str, graphs: str) -> RolloutEngine:
    kw = {} if spec == "off" else dict(drafter=drafter, spec=spec, draft_shape=SHAPES[spec])
    # 3 slots: the static calls pad 3 live rows to 4; PROMPTS (5) queue behind them and reuse slots
    return RolloutEngine(policy, max_seq_len=128, max_batch=3, return_hidden=True, cuda_graphs=graphs, **kw)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["off", "chain", "tree"])
def test_graph_replay_equals_eager_static_calls(ps, spec, dtype):
    """Decode, verify and draft levels replayed from CUDA graphs == the same padded calls run eagerly: greedy
    tokens, logprobs and hidden states; sampled (fp32) tokens with the same seed. Run twice: capture, then replay."""
    policy = _policy(ps, dtype=dtype).eval().requires_grad_(False)
    drafter = Drafter(policy).to(device=ps.device, dtype=dtype).eval()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    runs = [SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)]
    if dtype == torch.float32:
        runs.append(SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=3))
    for params in runs:
        eager = _engine(policy, drafter, spec, "eager").generate(PROMPTS, params)
        engine = _engine(policy, drafter, spec, "capture")
        for run in ("capture", "replay"):
            got = engine.generate(PROMPTS, params)
            assert tokens_of(got) == tokens_of(eager), f"{spec} {run} T={params.temperature}: tokens differ from eager"
            for (g,), (e,) in zip(got, eager):
                torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), **tol)
                torch.testing.assert_close(g.hidden_states.float(), e.hidden_states.float(), **tol)
        assert engine.model_calls.static_calls.graphs, "no CUDA graph was captured"
        if spec != "off":
            assert engine.stats.spec_steps > 0


@torch.no_grad()
def test_graphs_equal_exact_shapes_greedy(ps):
    """Captured graphs (padded batch, bucketed kv_len) give the greedy tokens of exact-shape eager calls (fp32)."""
    policy = _policy(ps).eval().requires_grad_(False)
    drafter = Drafter(policy).to(ps.device).eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    for spec in ("off", "tree"):
        exact = _engine(policy, drafter, spec, "off").generate(PROMPTS, params)
        assert tokens_of(_engine(policy, drafter, spec, "capture").generate(PROMPTS, params)) == tokens_of(exact)


# ---- FP8 rollouts ----


@pytest.mark.parametrize("path", ["scaled_mm", "triton"])
def test_fp8_gemm_paths_equal_the_reference_on_cuda(path):
    """torch._scaled_mm (one call per 128-channel block) and the Triton kernels == the dequantized fp32 reference,
    on shapes with edge blocks; needs FP8 tensor cores (sm89+), the triton path triton."""
    from megatron_tlt.ops.fp8 import fp8_linear, quantize_weight

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need sm89+")
    if path == "triton":
        pytest.importorskip("triton", reason="the triton path needs triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k, m in [(4096, 4096, 64), (1024, 2816, 7), (384, 320, 1)]:
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        want = fp8_linear(x.float(), quantize_weight(w, 128, path="reference")).double()
        got = fp8_linear(x.float(), quantize_weight(w, 128, path=path)).double()
        err = float((got - want).norm() / want.norm())
        print(f"FP8 {path} {m}x{k}x{n}: rel. error vs the reference {err:.2e}")
        assert err < 1e-5


@torch.no_grad()
def test_fp8_rollout_graph_replay_equals_eager_and_is_close_to_bf16(ps):
    """An FP8 engine (the GEMM path rollout.fp8_gemm=auto picks here) replayed from CUDA graphs == eager, greedy
    tokens and logprobs; its logprobs are near the bf16 engine's and not equal to them (FP8 is on)."""
    policy = _policy(ps, dtype=torch.bfloat16).eval().requires_grad_(False)
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)

    def run(graphs, precision="fp8"):
        engine = RolloutEngine(policy, max_seq_len=128, max_batch=3, cuda_graphs=graphs, precision=precision)
        return engine, [engine.generate(PROMPTS, params) for _ in range(2)]  # capture, then replay

    _, (eager, _) = run("eager")
    engine, graphed = run("capture")
    print(f"FP8 GEMM path on {torch.cuda.get_device_name()}: {engine.model_calls.fp8.path}")
    assert engine.model_calls.static_calls.graphs
    for got in graphed:
        assert tokens_of(got) == tokens_of(eager)
        for (g,), (e,) in zip(got, eager):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), rtol=1e-2, atol=1e-2)
    _, (bf16, _) = run("eager", precision="auto")
    first = [(c.logprobs[0], b.logprobs[0]) for (c,), (b,) in zip(eager, bf16)]
    assert any(a != b for a, b in first) and all(abs(a - b) < 0.5 for a, b in first)


# ---- bf16 autocast in training ----


def _packed_batch(lengths, seed: int, vocab: int = CFG.vocab_size):
    gen = torch.Generator().manual_seed(seed)
    return pack_sequences([torch.randint(0, vocab, (n,), generator=gen) for n in lengths])


def _loss_and_grads(policy, pb, autocast) -> tuple[torch.Tensor, list[torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    with autocast:
        lp = packed_forward(policy, pb).logprobs  # [T] fp32
    mask = pb.loss_mask.to(lp.device)
    loss = -(lp * mask).sum() / mask.sum()
    loss.backward()
    return lp.detach().where(mask, 0.0), [p.grad.detach().clone() for p in policy.parameters()]


def test_bf16_autocast_forward_backward_close_to_fp32(ps):
    """The trainer's bf16 autocast: logprobs and gradients within bf16 error of fp32 (rel. error <= 1e-2 /
    3e-2 overall, 0.1 per parameter), finite, and not identical (the autocast took effect). On the CPU the same
    model in pure bf16 (worse than autocast) gives 1e-3 / 1.1e-2 / 1.7e-2."""
    policy = _policy(ps, dataclasses.replace(CFG, init_std=0.05)).train()
    trainer = PolicyTrainer(policy, OptimConfig(bf16=True), AlgoConfig(), ps, total_steps=1)
    pb = _packed_batch([33, 1, 200, 64, 7, 129], seed=1)
    lp32, g32 = _loss_and_grads(policy, pb, contextlib.nullcontext())
    lp16, g16 = _loss_and_grads(policy, pb, trainer._autocast())
    assert torch.isfinite(lp16).all() and all(torch.isfinite(g).all() for g in g16)
    lp_err = rel_err(lp16, lp32)
    grad_err = rel_err(torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32]))
    print(f"bf16 vs fp32: logprobs rel. error {lp_err:.2e}, gradients {grad_err:.2e}")
    assert 0 < lp_err <= 1e-2
    assert 0 < grad_err <= 3e-2
    for (name, _), a, b in zip(policy.named_parameters(), g16, g32):
        assert rel_err(a, b) <= 0.1, f"{name}: gradient rel. error {rel_err(a, b):.3g}"


def test_bf16_training_step_is_finite(ps):
    """A PolicyTrainer step with bf16 autocast on CUDA updates the weights and reports finite metrics."""
    from megatron_tlt.rl.sample import Sample

    policy = _policy(ps)
    trainer = PolicyTrainer(policy, OptimConfig(bf16=True, lr=1e-4, warmup_steps=0), AlgoConfig(), ps, total_steps=2)
    gen = torch.Generator().manual_seed(2)
    samples = []
    for i, (p, r) in enumerate([(5, 30), (17, 3), (1, 90), (40, 40)]):
        prompt, response = torch.randint(0, CFG.vocab_size, (p,), generator=gen), torch.randint(0, CFG.vocab_size, (r,), generator=gen)
        samples.append(Sample(prompt.tolist(), response.tolist(), [-1.0] * r, advantage=(-1.0) ** i, group=i))
    before = [p.detach().clone() for p in policy.parameters()]
    metrics, _ = trainer.step(samples, [[0, 1], [2, 3]], max_response_len=128)
    assert metrics["skipped_update"] == 0.0 and trainer.version == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))


# ---- attention backends ----


def test_auto_backend_on_cuda_is_a_cuda_kernel():
    select_backend.cache_clear()
    try:
        assert select_backend("cuda") in ("flash_attn", "torch_varlen")
    finally:
        select_backend.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_with_each_backend_matches_fp32_reference(ps, backend):
    """A bf16 model forward/backward (packed, 6 examples) with `backend`: logprobs and gradients within twice
    the bf16 error of the reference backend (sdpa_segments) against the fp32 reference, plus a small slack."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    if backend == "torch_varlen":
        pytest.importorskip("torch.nn.attention.varlen")
    cfg = dataclasses.replace(CFG, hidden_size=256)  # head_dim 64
    pb = _packed_batch([1, 17, 64, 5, 130, 300], seed=4)

    def run(name: str, dtype):
        policy = _policy(ps, dataclasses.replace(cfg, attention_backend=name), dtype=dtype).train()
        lp, grads = _loss_and_grads(policy, pb, torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16))
        return lp.float(), torch.cat([g.float().flatten() for g in grads])

    want_lp, want_g = run("sdpa_segments", torch.float32)
    base_lp, base_g = run("sdpa_segments", torch.bfloat16)
    got_lp, got_g = run(backend, torch.bfloat16)
    for what, got, base, want in (("logprobs", got_lp, base_lp, want_lp), ("gradients", got_g, base_g, want_g)):
        err, base_err = rel_err(got, want), rel_err(base, want)
        print(f"{backend} {what}: rel. error {err:.2e} (sdpa_segments in bf16: {base_err:.2e})")
        assert err <= 2 * base_err + 2e-3, f"{backend} {what}: rel. error {err:.3g}, reference algorithm in bf16 {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tree", [False, True], ids=["decode", "tree_verify"])
def test_cached_attention_matches_float64_cpu(dtype, tree):
    """The rollout's KV-cache attention on CUDA (causal new tokens, or a tree mask over them) == float64 on the CPU."""
    B, S, kv_len, hq, hkv, d = 4, 5 if tree else 1, 96, 8, 2, 64
    gen = torch.Generator().manual_seed(5)
    start = torch.tensor([0, 17, 40, 90])[:B]  # committed tokens per row (row 3: its new tokens fill the cache)
    q = torch.randn(B, S, hq, d, generator=gen)
    k, v = (torch.randn(B, kv_len, hkv, d, generator=gen) for _ in range(2))
    new_mask = None
    if tree:
        parent = [-1, 0, 0, 1, 2]  # node i sees itself and its ancestors
        m = torch.eye(S, dtype=torch.bool)
        for i, p in enumerate(parent):
            while p >= 0:
                m[i, p], p = True, parent[p]
        new_mask = m.expand(B, S, S).clone()
    mask = cache_attention_mask(start, S, kv_len, new_mask)  # [B, S, kv_len]
    want = cached_attention(q.double(), k.double(), v.double(), mask, d**-0.5)
    got = cached_attention(*(t.to("cuda", dtype) for t in (q, k, v)), mask.cuda(), d**-0.5).cpu()
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)


# ---- NCCL, one process ----


def test_nccl_group_runs_the_model_and_collectives(ps):
    """The 1-process group on CUDA is NCCL; the model's TP layers, the vocab-parallel logprobs, the gradient
    all-reduce and global norm, and all_reduce / all_gather / broadcast / host-scalar reductions run over it."""
    assert ps.device.type == "cuda" and dist.get_backend() == "nccl"
    for group in (ps.tp_group, ps.dp_group):
        assert dist.get_backend(group) == "nccl"
    policy = _policy(ps).train()
    pb = _packed_batch([20, 3, 50], seed=6)
    lp, grads = _loss_and_grads(policy, pb, torch.autocast("cuda", dtype=torch.bfloat16))
    all_reduce_grads_(policy.parameters(), ps.dp_group)
    for p, g in zip(policy.parameters(), grads):
        torch.testing.assert_close(p.grad, g)  # one rank: the all-reduce is the identity
    norm = global_grad_norm(policy.parameters(), ps.tp_group)
    torch.testing.assert_close(float(norm), float(torch.cat([g.flatten() for g in grads]).norm()), rtol=1e-4, atol=0)

    hidden = torch.randn(10, CFG.hidden_size, device="cuda")
    targets = torch.randint(0, CFG.vocab_size, (10,), device="cuda")
    weight = policy.output_weight().detach()
    got, _ = vocab_parallel_logprobs(hidden, weight, targets, tp_group=ps.tp_group, vocab_size=CFG.vocab_size)
    want = torch.log_softmax((hidden @ weight.T)[:, :CFG.vocab_size].double(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    x = torch.arange(6.0, device="cuda")
    dist.all_reduce(x, group=ps.dp_group)
    parts = [torch.empty_like(x)]
    dist.all_gather(parts, x, group=ps.tp_group)
    dist.broadcast(x, src=0, group=ps.dp_group)
    torch.cuda.synchronize()
    assert x.tolist() == parts[0].tolist() == list(range(6))
    assert sum_over(ps.dp_group, [1.5, 2.0], device=ps.device) == [1.5, 2.0]
    assert max_over(ps.dp_group, [3.0], device=ps.device) == [3.0]


# ---- activation recomputation (one GPU) and sequence parallelism (two GPUs) ----


def test_recompute_on_cuda_matches_none_and_holds_fewer_activations(ps):
    """selective / full recompute under bf16 autocast with the CUDA attention kernel: the loss and gradients of
    none (up to the kernels' own run-to-run noise), and fewer bytes alive between forward and backward (full: at
    least 3x fewer than none)."""
    policy = _policy(ps).train()
    pb = _packed_batch([700, 300, 1024, 24], seed=3)
    mask = pb.loss_mask.to(ps.device)
    held, losses, grads = {}, {}, {}
    for mode in ("none", "selective", "full"):
        policy.set_recompute(mode)
        policy.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = packed_forward(policy, pb, compute_entropy=True)
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        loss = -(out.logprobs * mask).sum() - 0.1 * (out.entropy * mask).sum()
        loss.backward()
        losses[mode], grads[mode] = loss.detach(), torch.cat([p.grad.float().flatten() for p in policy.parameters()])
    policy.set_recompute("none")
    print(f"bytes held between forward and backward: {held}")
    for mode in ("selective", "full"):
        torch.testing.assert_close(losses[mode], losses["none"], rtol=1e-5, atol=0, msg=lambda m: f"{mode}: {m}")
        assert rel_err(grads[mode], grads["none"]) <= 1e-3, f"{mode}: gradient rel. error {rel_err(grads[mode], grads['none']):.3g}"
    assert held["selective"] < held["none"] and 3 * held["full"] <= held["none"], held


def _sequence_parallel_worker(rank: int, world_size: int, port: int) -> None:
    import test_sequence_parallel as sp  # the CPU test's configs, micro-batch, step and comparison

    from megatron_tlt.config.schema import ParallelConfig
    from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_tlt.parallel.state import set_local_rank_env

    set_local_rank_env(rank, world_size, port)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))  # NCCL, cuda:rank: megatron-core's own SP path
    try:
        for name in sp.CONFIGS:
            cfg = dataclasses.replace(sp._config(name), attention_backend="sdpa_segments")  # fp32
            set_seed(0)
            plain = Policy(cfg, tp_group=ps.tp_group).to(ps.device)
            weights = gather_full_state_dict(plain, ps.tp_group)
            want = sp._step(plain, ps.tp_group)
            for recompute in ("none", "full"):
                model = Policy(cfg, tp_group=ps.tp_group, init_weights=False, sequence_parallel=True).to(ps.device)
                load_full_state_dict(model, weights, ps.tp_group)
                model.set_recompute(recompute)
                sp._assert_close(sp._step(model, ps.tp_group), want, f"{name}, rank {rank}, SP, recompute={recompute}")
    finally:
        destroy_parallel()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallelism needs TP = 2: two CUDA devices")
def test_sequence_parallel_on_two_gpus():
    """TP = 2 over NCCL with sequence parallelism (megatron-core's sequence-parallel linears and regions, not the
    CPU Functions) == TP = 2 without it: loss, logprobs, hidden states, gradients, weights after AdamW."""
    import torch.multiprocessing as mp

    from megatron_tlt.parallel.state import free_port

    mp.spawn(_sequence_parallel_worker, args=(2, free_port()), nprocs=2, join=True)
