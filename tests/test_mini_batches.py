"""PPO mini-batches and epochs in `PolicyTrainer.step`: two mini-batches of one epoch equal two sequential
single-mini-batch updates on the two shares (weights, the lr schedule counted in optimizer steps, AdamW's state),
at DP=1 and DP=2; the PPO clip acts on the second mini-batch only with a large lr; the old-policy logprobs come
from one forward-only pass (the pre-update policy's) with more than one update and from no extra pass with one."""
import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_train import CFG, make_samples

import megatron_tlt.trainer.policy as policy_mod
import megatron_tlt.trainer.schedule as schedule_mod
from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.data.packing import plan_micro_batches
from megatron_tlt.models.packed import chunk_forward, token_logprobs
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.trainer.policy import PolicyTrainer, split_mini_batches

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 40  # micro-batch budget: several micro-batches per share
# eps=1: Adam's update a smooth function of the gradient, so a wrong loss normaliser shows in the weights
OPTIM = OptimConfig(lr=1e-2, eps=1.0, micro_batch_tokens=TOKENS)


def _model(ps, init: dict) -> Policy:
    model = Policy(CFG, ps.tp_group, init_weights=False)
    load_full_state_dict(model, init)
    return model


def _second_share_without_signal(samples, micro_batches):
    """The samples with the second mini-batch's advantages set to 0, and the two shares (sample lists): the second
    update then has zero gradients, so the pre-update old logprobs of the mini-batch run and the detached ones of a
    standalone update give the same step (AdamW momentum only), and the comparison is exact."""
    shares = split_mini_batches([len(s.tokens) for s in samples], micro_batches, 2)
    second = {i for b in shares[1] for i in b}
    samples = [replace(s, advantage=0.0) if i in second else s for i, s in enumerate(samples)]
    return samples, [[samples[i] for b in share for i in b] for share in shares]


def _sequential(model, ps, halves) -> list[dict]:
    """Two single-mini-batch updates, one per half, under the schedule of two RL steps of two mini-batches."""
    trainer = PolicyTrainer(model, OPTIM, AlgoConfig(), ps, total_steps=4)
    return [trainer.step(h, plan_micro_batches([len(s.tokens) for s in h], TOKENS), max_response_len=16)[0] for h in halves]


def test_split_is_disjoint_token_balanced_and_within_the_micro_batches():
    micro_batches = [[0, 1, 2], [3, 4], [5]]
    lengths = [10, 9, 3, 8, 4, 6]
    shares = split_mini_batches(lengths, micro_batches, 2)
    # longest first onto the lighter share: 10 -> a, 9 -> b, 8 -> b, 6 -> a, 4 -> a, 3 -> b: 10+6+4 | 9+8+3
    assert shares == [[[0], [4], [5]], [[1, 2], [3]]]
    assert split_mini_batches(lengths, micro_batches, 1) == [micro_batches]
    assert split_mini_batches([5], [[0]], 2) == [[[0]], []]  # an empty share: the rank still joins the update


def test_two_mini_batches_equal_two_sequential_updates():
    ps = init_parallel()
    torch.manual_seed(0)
    init = gather_full_state_dict(Policy(CFG, ps.tp_group))
    samples = make_samples(ps)
    plan = plan_micro_batches([len(s.tokens) for s in samples], TOKENS)
    samples, halves = _second_share_without_signal(samples, plan)
    loads = [sum(len(s.tokens) for s in h) for h in halves]
    assert min(loads) > 0 and abs(loads[0] - loads[1]) <= max(len(s.tokens) for s in samples)

    model = _model(ps, init)
    trainer = PolicyTrainer(model, replace(OPTIM, mini_batches=2), AlgoConfig(), ps, total_steps=2)
    metrics, _ = trainer.step(samples, plan, max_response_len=16)
    assert metrics["optimizer_steps"] == 2 and trainer.version == 2 and metrics["skipped_update"] == 0

    reference = _model(ps, init)
    expected = _sequential(reference, ps, halves)
    for name, p in gather_full_state_dict(reference).items():
        torch.testing.assert_close(gather_full_state_dict(model)[name], p, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(init[n], p) for n, p in gather_full_state_dict(model).items())
    assert metrics["loss"] == pytest.approx((expected[0]["loss"] + expected[1]["loss"]) / 2, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(max(e["grad_norm"] for e in expected), rel=1e-6)
    assert metrics["lr"] == expected[0]["lr"] == OPTIM.lr
    assert metrics["train_tokens"] == sum(e["train_tokens"] for e in expected)


def test_two_mini_batches_equal_two_sequential_updates_against_the_pre_update_old_policy(monkeypatch):
    """Both shares with their advantages: the second mini-batch's PPO ratio is to the pre-update policy (the one
    that drew the samples), so the sequential reference's second update is given that policy as its old one. MIS
    with bounds that reject nothing makes a single update take the old-logprob pass, which runs the reference's on a
    frozen copy of the initial policy; the mini-batch trainer takes the same pass on its own pre-update weights.
    Each reference update packs its share's micro-batches as the mini-batch trainer does (the same sums)."""
    ps = init_parallel()
    torch.manual_seed(0)
    init = gather_full_state_dict(Policy(CFG, ps.tp_group))
    samples = make_samples(ps)
    plan = plan_micro_batches([len(s.tokens) for s in samples], TOKENS)
    shares = []  # per mini-batch: (its samples, its micro-batches as index lists into them)
    for share in split_mini_batches([len(s.tokens) for s in samples], plan, 2):
        starts = [0, *itertools.accumulate(len(b) for b in share)]
        shares.append(([samples[i] for b in share for i in b], [list(range(a, z)) for a, z in zip(starts, starts[1:])]))
    algo = AlgoConfig(rollout_correction="mis", mis_low=0.0, mis_high=1e30)
    optim = replace(OPTIM, lr=5e-2, eps=1e-8)  # a first update large enough that the second's ratio matters (and clips)
    model = _model(ps, init)
    metrics, _ = PolicyTrainer(model, replace(optim, mini_batches=2), algo, ps, total_steps=2).step(samples, plan, max_response_len=16)
    assert metrics["clip_frac"] > 0  # the second update's ratio is not 1

    def sequential(old_policy=None, algo=algo) -> dict[str, torch.Tensor]:
        reference = _model(ps, init)
        trainer = PolicyTrainer(reference, optim, algo, ps, total_steps=4)
        if old_policy is not None:  # the old-logprob pass: the frozen policy's trunk and LM head
            forward_only, old_head = trainer._forward_only, schedule_mod.head_chunk(old_policy)

            def old_pass(_model, packs, head, **kw):
                with monkeypatch.context() as m:
                    m.setattr(policy_mod, "token_logprobs", lambda _chunk, *a, **kw: token_logprobs(old_head, *a, **kw))
                    forward_only(old_policy, packs, head, **kw)

            monkeypatch.setattr(trainer, "_forward_only", old_pass)
        for share_samples, micro_batches in shares:
            trainer.step(share_samples, micro_batches, max_response_len=16)
        return gather_full_state_dict(reference)

    got = gather_full_state_dict(model)
    for name, p in sequential(old_policy=_model(ps, init)).items():
        torch.testing.assert_close(got[name], p, rtol=1e-6, atol=1e-7, msg=name)
    # the on-policy second update (old = the weights after the first) is a different step
    on_policy = sequential(algo=AlgoConfig())
    assert any(not torch.allclose(got[n], p, rtol=1e-4, atol=1e-5) for n, p in on_policy.items())


def _dp_worker(rank: int, world_size: int, init_path: str, out: str) -> None:
    torch.set_num_threads(1)
    ps = init_parallel()
    batch = exchange_for_update([s for s in make_samples(ps) if s.group % 2 == rank], TOKENS, ps)
    samples, shares = _second_share_without_signal(batch.samples, batch.micro_batches)
    model = _model(ps, torch.load(init_path))
    trainer = PolicyTrainer(model, replace(OPTIM, mini_batches=2), AlgoConfig(), ps, total_steps=2)
    metrics, _ = trainer.step(samples, batch.micro_batches, max_response_len=16)
    assert metrics["optimizer_steps"] == 2
    torch.save({"weights": gather_full_state_dict(model), "shares": shares}, Path(out) / f"rank{rank}.pt")


def test_two_mini_batches_at_dp2_equal_two_sequential_updates_at_dp1(tmp_path):
    ps = init_parallel()
    torch.manual_seed(0)
    torch.save(gather_full_state_dict(Policy(CFG, ps.tp_group)), tmp_path / "init.pt")
    destroy_parallel()
    run_distributed(_dp_worker, world_size=2, args=(str(tmp_path / "init.pt"), str(tmp_path)))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    halves = [ranks[0]["shares"][j] + ranks[1]["shares"][j] for j in range(2)]  # global mini-batch j: every rank's share j
    assert all(halves)
    ps = init_parallel()
    reference = _model(ps, torch.load(tmp_path / "init.pt"))
    _sequential(reference, ps, halves)
    for name, p in gather_full_state_dict(reference).items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["weights"][name], p, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {name}")


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_the_clip_acts_on_later_mini_batches_only(mini_batches):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    trainer = PolicyTrainer(model, OptimConfig(lr=5e-2, micro_batch_tokens=TOKENS, mini_batches=mini_batches), AlgoConfig(),
                            ps, total_steps=1)
    samples = make_samples(ps)
    metrics, _ = trainer.step(samples, plan_micro_batches([len(s.tokens) for s in samples], TOKENS), max_response_len=16)
    assert metrics["optimizer_steps"] == mini_batches
    if mini_batches == 1:  # on-policy: ratio 1 exactly
        assert metrics["clip_frac"] == 0 and metrics["approx_kl"] == 0
    else:  # the second mini-batch's ratio is to the pre-update policy, which the first update moved
        assert metrics["clip_frac"] > 0 and metrics["approx_kl"] > 0


@pytest.mark.parametrize("mini_batches,epochs", [(1, 1), (2, 1), (1, 2)])
def test_old_logprobs_are_the_pre_update_policys(monkeypatch, mini_batches, epochs):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    frozen = _model(ps, gather_full_state_dict(model))
    forwards, calls, packs = [], [], []
    real_forward, real_loss, real_run = schedule_mod.chunk_forward, policy_mod.policy_loss, policy_mod.run_micro_batches

    def run(model_, packs_, head, ps_, *, backward, **kw):
        packs.extend(packs_ if backward else [])  # the update's packs, in the order of the policy_loss calls
        return real_run(model_, packs_, head, ps_, backward=backward, **kw)

    monkeypatch.setattr(schedule_mod, "chunk_forward", lambda m, pb, **kw: forwards.append(pb) or real_forward(m, pb, **kw))
    monkeypatch.setattr(policy_mod, "policy_loss",
                        lambda lp, old, *a, **k: calls.append((lp.detach(), old)) or real_loss(lp, old, *a, **k))
    monkeypatch.setattr(policy_mod, "run_micro_batches", run)

    optim = OptimConfig(lr=1e-2, micro_batch_tokens=TOKENS, mini_batches=mini_batches, epochs=epochs)
    trainer = PolicyTrainer(model, optim, AlgoConfig(), ps, total_steps=1)
    samples = make_samples(ps)
    metrics, _ = trainer.step(samples, plan_micro_batches([len(s.tokens) for s in samples], TOKENS), max_response_len=16)
    assert metrics["optimizer_steps"] == mini_batches * epochs == trainer.version
    num_packs = len({id(pb) for pb in packs})
    # each pack (in one mini-batch) once per epoch, plus one forward-only pass over all packs with more than one update
    assert len(forwards) == num_packs * (epochs + (mini_batches * epochs > 1))
    assert len(calls) == len(packs) == num_packs * epochs
    with torch.no_grad():
        for pb, (lp, old) in zip(packs, calls):
            want = token_logprobs(frozen, chunk_forward(frozen, pb), pb.targets)[0]
            torch.testing.assert_close(old[pb.loss_mask], want[pb.loss_mask], rtol=0, atol=1e-6)
    moved = [(lp - old)[pb.loss_mask].abs().max() for pb, (lp, old) in zip(packs, calls)]
    assert (max(moved) > 1e-4) == (mini_batches * epochs > 1)  # later updates see the moved policy against the old one
