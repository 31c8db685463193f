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
from megatron_tlt.parallel.state import destroy_parallel, init_parallel
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


def _update(model, ps, steps: int, kl: float = 0.0, mini_batches: int = 1, correction: str = "none", features=None):
    """The metrics of `steps` updates, and each step's hidden rows for the drafter ([R + 1, H + 3H] with the
    EAGLE-3 `features` layers; on the last stage)."""
    optim = OptimConfig(lr=1e-2, micro_batch_tokens=40, grad_clip=0.5, mini_batches=mini_batches)
    ref = None
    if kl:
        ref = build_stage(model.cfg, ps.tp_group, ps.pp_rank, ps.pp_size, len(model.chunks), init_weights=False) \
            if hasattr(model, "chunks") else Policy(model.cfg, ps.tp_group, init_weights=False)
        ref.load_state_dict(model.state_dict())
    trainer = PolicyTrainer(model, optim, AlgoConfig(kl_coef=kl, rollout_correction=correction), ps, total_steps=4, ref_model=ref)
    samples = _samples()
    bins = [list(range(0, 4)), list(range(4, 7)), list(range(7, 10))]
    out = [trainer.step(samples, bins, max_response_len=12, collect_hidden=features is not None, feature_layers=features)
           for _ in range(steps)]
    return [m for m, _ in out], [h for _, h in out]


def _check_equal(stage_sd, ref_sd, ps, what, atol=1e-5):
    for name, t in stage_sd.items():
        torch.testing.assert_close(t, ref_sd[name], rtol=1e-4, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def _update_case(tp, pp, vpp, tied, kl, mini_batches=1, correction="none", features=None):
    ps = init_parallel(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_size=vpp))
    cfg = ModelConfig(**CFG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, pp, vpp)
    one = _single_state(ps)
    torch.manual_seed(0)
    full = Policy(cfg, one.tp_group)
    _check_equal(gather_full_state_dict(stage, ps.tp_group), full.state_dict(), ps, "init")
    got, got_hidden = _update(stage, ps, steps=2, kl=kl, mini_batches=mini_batches, correction=correction, features=features)
    want, want_hidden = _update(full, one, steps=2, kl=kl, mini_batches=mini_batches, correction=correction, features=features)
    if features is not None and ps.pp_rank == pp - 1:  # the EAGLE-3 features of layers on both stages reach the last
        for g, w in zip(got_hidden, want_hidden):
            assert g.keys() == w.keys() == set(range(10))
            for i in w:
                assert g[i].shape == (len(_samples()[i].response_ids) + 1, 4 * CFG["hidden_size"])
                torch.testing.assert_close(g[i], w[i], rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["optimizer_steps"] == mini_batches
        if correction == "mis":  # the pre-update logprobs reject some tokens, the same ones at PP = 1
            assert 0 < g["rollout_masked_frac"] < 1 and g["rollout_masked_frac"] == pytest.approx(w["rollout_masked_frac"])
        for key in ("loss", "grad_norm", "entropy", "clip_frac", "kl_ref", "rollout_ratio_mean", "rollout_kl_k3", "train_tokens"):
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


def _sft_case(vpp):
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
    _check_equal(stage.state_dict(), full.state_dict(), ps, "after SFT", atol=5e-5)  # 3 AdamW steps at lr 1e-2


# ---- checkpoints at any TP x PP, rollouts in the rollout layout, an RL run at PP = 2 ----
def _logits_pp(stage, ps, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of one sequence through the pipeline (valid on the last stage)."""
    from megatron_tlt.data.packing import pack_sequences
    from megatron_tlt.trainer.schedule import run_micro_batches

    out = {}

    def head(k, hidden):
        out[k] = stage.chunks[-1].compute_logits(hidden[None])[0]
        return out[k].sum()

    with torch.no_grad():
        run_micro_batches(stage, [pack_sequences([tokens])], head, ps, backward=False)
    return out.get(0)


TOKENS = [5, 17, 3, 88, 41, 9, 60, 2, 33]


def _save_case(path):
    from megatron_tlt.checkpoint.dcp import save_checkpoint

    ps = init_parallel(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2))
    cfg = ModelConfig(**CFG, tie_word_embeddings=True)
    torch.manual_seed(1)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, 2)
    _update(stage, ps, steps=1)  # trained weights (the tied copies moved together)
    save_checkpoint(path, stage, cfg)
    logits = _logits_pp(stage, ps, TOKENS)
    if ps.is_last_stage and ps.tp_rank == 0:
        torch.save(logits, f"{path}.logits.pt")


def _load_pp2_worker(rank, world, path):
    from megatron_tlt.checkpoint.loading import load_model

    ps = init_parallel(ParallelConfig(pipeline_parallel_size=2))
    stage = load_model(path, pipeline=(ps.pp_rank, 2, 1, None))
    logits = _logits_pp(stage, ps, TOKENS)
    if ps.is_last_stage:
        torch.testing.assert_close(logits, torch.load(f"{path}.logits.pt"), rtol=1e-5, atol=1e-5)


def _tp2_pp2_worker(rank, world, path):
    _update_case(2, 2, 1, True, 0.0)
    destroy_parallel(keep_world=True)
    _save_case(path)


def test_tp2_pp2_equals_tp1_pp1_and_its_checkpoint_loads_at_tp1_pp1_and_tp1_pp2(tmp_path):
    from megatron_tlt.checkpoint.loading import load_model

    path = str(tmp_path / "ckpt")
    run_distributed(_tp2_pp2_worker, world_size=4, args=(path,), timeout_s=300)
    want = torch.load(f"{path}.logits.pt")
    init_parallel()
    model = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([TOKENS]))[0], want, rtol=1e-5, atol=1e-5)
    run_distributed(_load_pp2_worker, world_size=2, args=(path,))


def _rollout_case(rollout_tp, precision="auto"):
    """Rollouts on the resharded copy == on the PP = 1 policy; with FP8 the copy's linears are quantized at acquire
    and their high-precision storage freed."""
    from megatron_tlt.coordinator.reshard import RolloutWeights
    from megatron_tlt.rollout import RolloutEngine, SamplingParams

    ps = init_parallel(ParallelConfig(pipeline_parallel_size=2), rollout_tp=rollout_tp)
    cfg = ModelConfig(**CFG)
    torch.manual_seed(2)
    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, 2)
    _update(stage, ps, steps=1)
    copy = Policy(cfg, ps.rollout.tp_group, init_weights=False)
    weights = RolloutWeights(stage, copy, ps, keep=False)
    fp8 = dict(precision=precision, fp8_block=16)
    engine = RolloutEngine(copy, cache_budget_bytes=2**22, max_seq_len=32, **fp8)
    weights.engine = engine
    one = _single_state(ps)
    torch.manual_seed(2)
    full = Policy(cfg, one.tp_group)
    _update(full, one, steps=1)
    prompts = [[3, 4, 5], [9, 8], [11, 12, 13, 14]]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=12), SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=7)):
        with weights.acquired(version=1):
            assert weights.last["reshard_bytes"] > 0
            if precision == "fp8":
                assert weights.last["fp8_weight_bytes"] > 0
                assert all(m.weight.untyped_storage().size() == 0 for m in engine.model_calls.fp8.linears.values())
            got = engine.generate(prompts, params)
        assert all(p.untyped_storage().size() == 0 for p in copy.parameters())  # freed after the rollout
        want = RolloutEngine(full, cache_budget_bytes=2**22, max_seq_len=32, **fp8).generate(prompts, params)
        assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in want]


def _empty_replica_case():
    """DP = 2 where one replica has no micro-batch (the batch fits one): both still reduce the same gradients."""
    ps = init_parallel(ParallelConfig())
    torch.manual_seed(0)
    model = Policy(ModelConfig(**CFG, tie_word_embeddings=True), ps.tp_group)
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-2), AlgoConfig(), ps, total_steps=2)
    samples = _samples(4) if ps.dp_rank == 0 else []
    metrics, _ = trainer.step(samples, [list(range(len(samples)))] if samples else [], max_response_len=12)
    assert metrics["grad_norm"] > 0
    for p in model.parameters():  # the replicas took the same step
        other = p.detach().clone()
        dist.broadcast(other, src=0)
        assert torch.equal(p, other)


def _pp2_worker(rank, world):
    feats = (0, 2, 3)  # EAGLE-3 target features from layers on both stages (and on 3 of the 4 interleaved chunks)
    cases = [(_empty_replica_case,), (_update_case, 1, 2, 1, False, 0.0), (_update_case, 1, 2, 2, False, 0.0, 1, "none", feats),
             (_update_case, 1, 2, 1, True, 0.1, 1, "none", feats),
             (_update_case, 1, 2, 1, False, 0.0, 2, "mis", feats),  # the old-logprob pass and MIS masks through the pipeline
             (_sft_case, 2), (_rollout_case, 1), (_rollout_case, 2), (_rollout_case, 1, "fp8")]
    for case, *args in cases:  # one pair of processes, a layout per case
        case(*args)
        destroy_parallel(keep_world=True)


def test_pp2_equals_pp1_for_updates_sft_and_rollouts():
    """1F1B, interleaved (2 virtual stages) and tied embeddings + a KL reference pass: loss, gradients and weights
    after two updates equal PP = 1's, and so do the hidden rows with EAGLE-3 features the updates return for the
    drafter (features of layers on every stage, from the update's forward and from the forward-only pass); the SFT warm-up (interleaved) too; greedy and seeded-sampling rollouts of the
    resharded copy (rollout TP 1 and 2) give PP = 1's tokens."""
    run_distributed(_pp2_worker, world_size=2, timeout_s=300)


def _train_worker(rank, world, run_dir):
    import json
    import shutil

    from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint
    from megatron_tlt.config import load_config
    from megatron_tlt.train import train

    def cfg(name, *extra):
        return load_config(None, [
            f"run.dir={run_dir}/{name}", "run.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=8",
            "data.num_examples=32", "data.eval_examples=4", "reward.num_workers=0", "run.tensorboard=false",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "optim.lr=1e-3",
            "reward.fns=[{name: reward_fns_for_tests.length_reward}]",  # rewards that differ within a group
            "parallel.pipeline_parallel_size=2", "run.steps=2", *extra,
        ])

    # TLT at PP = 2: rollouts in the rollout layout (rollout DP = 2), the EAGLE-3 drafter (the default) trained on
    # the rank done first from the update's hidden rows, whose target features come from layers on both stages
    tlt = train(cfg("tlt", "rollout.spec=chain"))
    if rank == 0:
        rows = [json.loads(line) for line in (tlt / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        assert rows[1]["drafter_steps"] > 0  # from the buffer step 0's update filled
        assert all(r["reshard_bytes"] > 0 and r["grad_norm"] > 0 for r in rows)
    # resume at PP = 2 is bit-exact (without SD: TLT's drafter steps depend on timing, so its samples do too)
    straight = train(cfg("straight"))
    train(cfg("resumed", "run.save_every=1"))
    if rank == 0:
        shutil.rmtree(f"{run_dir}/resumed/checkpoints/step_2")
    dist.barrier()
    train(cfg("resumed", "run.save_every=1", "run.resume=true"))
    if rank == 0:
        for state in ("model", "optimizer"):
            a = load_full_state_dict_from_checkpoint(straight / "checkpoints" / "step_2", state)
            b = load_full_state_dict_from_checkpoint(f"{run_dir}/resumed/checkpoints/step_2", state)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{state}: 2 steps != 1 + resume + 1"
        first = load_full_state_dict_from_checkpoint(f"{run_dir}/resumed/checkpoints/step_1", "model")
        last = load_full_state_dict_from_checkpoint(straight / "checkpoints" / "step_2", "model")
        assert any(not torch.equal(first[k], last[k]) for k in last)  # the second update moved the weights
    # the PP = 2 run checkpoint (model, optimizer, drafter-less state) continues at PP = 1 x DP = 2
    destroy_parallel(keep_world=True)
    train(cfg("resumed", "run.save_every=1", "run.resume=true", "run.steps=3", "parallel.pipeline_parallel_size=1"))
    if rank == 0:
        rows = [json.loads(line) for line in (tlt.parent / "resumed" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["grad_norm"] > 0


def test_tlt_run_at_pp2_trains_the_drafter_and_resumes_bit_exact(tmp_path):
    run_distributed(_train_worker, world_size=2, args=(str(tmp_path),), timeout_s=240)
