"""Pipeline parallelism: a policy update at PP = 2 (1F1B and interleaved), at TP = 2 x PP = 2, and the SFT
warm-up equal the same update on one process holding the whole model; tied embeddings stay identical on
their two stages. Real gloo processes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megatron_tlt.config.schema import AlgoConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_tlt.models.pipeline import build_stage
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.sharding import gather_full_state_dict
from megatron_tlt.parallel.state import init_parallel
from megatron_tlt.rl.sample import Sample
from megatron_tlt.trainer.policy import PolicyTrainer
from megatron_tlt.trainer.sft import supervised_warmup

CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2)


def _samples(n: int = 10) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 96, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(1, 96, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(prompt, resp, [-4.0] * len(resp), advantage=float(i % 3) - 1.0, group=i // 2))
    return out


def _single_state(ps):
    """The parallel state of one process holding the whole model, inside the same world."""
    groups = [dist.new_group([r]) for r in range(ps.world_size)]
    one = groups[ps.rank]
    return dataclasses.replace(ps, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0, tp_group=one,
                               pp_group=one, dp_group=one, embedding_group=None)


def _update(model, ps, steps: int, kl: float = 0.0):
    optim = OptimConfig(lr=1e-2, micro_batch_tokens=40, grad_clip=0.5)
    ref = None
    if kl:
        ref = build_stage(model.cfg, ps.tp_group, ps.pp_rank, ps.pp_size, len(model.chunks), init_weights=False) \
            if hasattr(model, "chunks") else Policy(model.cfg, ps.tp_group, init_weights=False)
        ref.load_state_dict(model.state_dict())
    trainer = PolicyTrainer(model, optim, AlgoConfig(kl_coef=kl), ps, total_steps=4, ref_model=ref)
    samples = _samples()
    bins = [list(range(0, 4)), list(range(4, 7)), list(range(7, 10))]
    metrics = [trainer.step(samples, bins, max_response_len=12)[0] for _ in range(steps)]
    return metrics


def _check_equal(stage_sd, ref_sd, ps, what):
    for name, t in stage_sd.items():
        torch.testing.assert_close(t, ref_sd[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _worker(rank, world, tp, pp, vpp, tied, kl):
    ps = init_parallel(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_size=vpp))
    cfg = ModelConfig(**CFG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, pp, vpp)
    one = _single_state(ps)
    torch.manual_seed(0)
    full = Policy(cfg, one.tp_group)
    _check_equal(gather_full_state_dict(stage, ps.tp_group), full.state_dict(), ps, "init")
    got = _update(stage, ps, steps=2, kl=kl)
    want = _update(full, one, steps=2, kl=kl)
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "entropy", "clip_frac", "kl_ref"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (key, g, w)
    _check_equal(gather_full_state_dict(stage, ps.tp_group), dict(full.named_parameters()), ps, "weights after 2 updates")
    grads = {n: p.grad for n, p in full.named_parameters()}
    for name, p in stage.named_parameters():  # the last update's (clipped) gradients
        full_grad = torch.cat([torch.empty_like(p.grad)] * 1)
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(p.grad) for _ in range(tp)]
            dist.all_gather(parts, p.grad.contiguous(), group=ps.tp_group)
            full_grad = torch.cat(parts, dim=p.partition_dim)
        else:
            full_grad = p.grad
        torch.testing.assert_close(full_grad, grads[name], rtol=1e-4, atol=1e-6)
    if tied:  # the embedding on the first stage and its LM-head copy on the last are the same tensor
        w = stage.embed_tokens.weight.detach().clone()
        other = w.clone()
        dist.broadcast(other, src=dist.get_global_rank(ps.pp_group, 0), group=ps.pp_group)
        if ps.pp_rank == pp - 1:
            assert torch.equal(w, other)


@pytest.mark.parametrize("vpp,tied,kl", [(1, False, 0.0), (2, False, 0.0), (1, True, 0.1)], ids=["1f1b", "interleaved", "tied+kl"])
def test_pp2_update_equals_pp1(vpp, tied, kl):
    run_distributed(_worker, world_size=2, args=(1, 2, vpp, tied, kl))


def test_tp2_pp2_update_equals_tp1_pp1():
    run_distributed(_worker, world_size=4, args=(2, 2, 1, True, 0.0), timeout_s=240)


def _sft_worker(rank, world, vpp):
    ps = init_parallel(ParallelConfig(pipeline_parallel_size=2, virtual_pipeline_size=vpp))
    cfg = ModelConfig(**CFG)
    seqs = [s.tokens for s in _samples(12)]
    masks = [[False] * 2 + [True] * (len(t) - 2) for t in seqs]
    kw = dict(steps=3, lr=1e-2, batch_size=8, micro_batch_tokens=30, grad_clip=1.0, seed=0)
    torch.manual_seed(0)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, 2, vpp)
    got = supervised_warmup(stage, seqs, masks, ps, **kw)
    one = _single_state(ps)
    torch.manual_seed(0)
    full = Policy(cfg, one.tp_group)
    want = supervised_warmup(full, seqs, masks, one, **kw)
    assert got == pytest.approx(want, rel=1e-5)
    _check_equal(stage.state_dict(), full.state_dict(), ps, "after SFT")


def test_sft_warmup_pp2_equals_pp1():
    run_distributed(_sft_worker, world_size=2, args=(2,))
