"""Rollout-training mismatch correction (`rl.algorithms.rollout_correction`): TIS weights with a cap, MIS at the
token and the sequence (geometric mean) level, the diagnostics, and the losses they give in `policy_loss`
(TIS reweights the PG term only; MIS rejections leave the loss and its normalisers). Every expected number is
worked out here by hand; then the same through `PolicyTrainer.step`."""
import math

import pytest
import torch
from test_train import CFG, make_samples

from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.data.packing import plan_micro_batches
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel
from megatron_tlt.rl.algorithms import loss_normalisers, policy_loss, rollout_correction
from megatron_tlt.trainer.policy import PolicyTrainer

LN = math.log


def _close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def _tis_case():
    # four tokens of one sample, the last off the loss mask (its garbage ratio must not count)
    rollout = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    old = rollout + torch.tensor([0.0, LN(3), LN(0.5), 30.0])  # ratios 1, 3, 0.5, (masked)
    mask = torch.tensor([True, True, True, False])
    return old, rollout, mask, torch.zeros(4, dtype=torch.long)


def test_tis_weights_cap_and_metrics():
    old, rollout, mask, ids = _tis_case()
    weights, out_mask, m = rollout_correction(old, rollout, mask, ids, "tis", tis_cap=2.0)
    _close(weights, [1.0, 2.0, 0.5, 0.0])
    assert torch.equal(out_mask, mask)
    _close(m["tokens"], 3)
    _close(m["ratio_sum"], 1 + 3 + 0.5)
    _close(m["ratio_max"], 3)
    _close(m["truncated"], 1)  # only ratio 3 > cap 2
    _close(m["masked"], 0)
    # k3 = exp(d) - d - 1 per loss token: 0, 3 - ln 3 - 1, 0.5 - ln 0.5 - 1
    _close(m["kl_k3_sum"], 0 + (2 - LN(3)) + (LN(2) - 0.5))


def test_tis_reweights_the_pg_term_not_the_kl_term():
    old, rollout, mask, ids = _tis_case()
    weights, mask, _ = rollout_correction(old, rollout, mask, ids, "tis", tis_cap=2.0)
    lp = old.clone().requires_grad_(True)  # the update's own forward: PPO ratio 1
    adv = torch.tensor([1.0, 1.0, -2.0, 5.0])
    ref = old + torch.tensor([0.0, LN(2), 0.0, 0.0])  # KL k3 on token 1: 2 - ln 2 - 1
    loss, _ = policy_loss(lp, old, adv, mask, ids, token_weights=weights, ref_logprobs=ref, kl_coef=0.5)
    # pg_t = -A_t * w_t: -1 * 1, -1 * 2, 2 * 0.5 -> sum -2; KL unweighted: 0.5 * (1 - ln 2); token mean over 3
    _close(loss, (-2 + 0.5 * (1 - LN(2))) / 3)
    loss.backward()
    # d/dlp of the pg part: -A_t * w_t / 3; the KL part: kl_coef * (1 - exp(ref - lp)) / 3 = 0.5 * (1 - 2) / 3 on token 1
    _close(lp.grad, [-1 / 3, -2 / 3 - 0.5 / 3, 1 / 3, 0.0])


def test_mis_token_rejects_outside_the_bounds_and_leaves_the_normalisers():
    rollout = torch.zeros(5)
    old = torch.tensor([0.0, LN(3), LN(0.5), LN(0.25), LN(2)])  # ratios 1, 3, 0.5, 0.25, 2
    mask = torch.ones(5, dtype=torch.bool)
    ids = torch.zeros(5, dtype=torch.long)
    weights, keep, m = rollout_correction(old, rollout, mask, ids, "mis", mis_level="token", mis_low=0.5, mis_high=2.0)
    assert keep.tolist() == [True, False, True, False, True]  # the bounds are inclusive
    _close(weights, [1, 0, 1, 0, 1])
    _close(m["masked"], 2)
    _close(m["truncated"], 0)
    _close(m["ratio_sum"], 1 + 3 + 0.5 + 0.25 + 2)
    _close(m["ratio_max"], 3)
    # the loss over the kept tokens only, divided by the kept count (verl: rejected tokens leave the denominator)
    num_tokens, num_seqs = loss_normalisers(keep, ids).tolist()
    assert (num_tokens, num_seqs) == (3, 1)
    adv = torch.tensor([1.0, 7.0, -2.0, 7.0, 3.0])
    loss, _ = policy_loss(old, old, adv, keep, ids, num_global_tokens=num_tokens)
    _close(loss, (-1 + 2 - 3) / 3)


def test_mis_sequence_uses_the_geometric_mean_over_response_tokens():
    # sample 0: ratios 4, 0.25, 1 -> geometric mean 1 (kept; the arithmetic mean 1.75 would be rejected)
    # sample 1: ratios 2, 2 -> 2 > 1.5: rejected whole
    # sample 2: a prompt token (off the mask, ratio e^10) and one response token of ratio 1.2 -> kept
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    rollout = torch.full((7,), -1.0)
    old = rollout + torch.tensor([LN(4), LN(0.25), 0.0, LN(2), LN(2), 10.0, LN(1.2)])
    mask = torch.tensor([True, True, True, True, True, False, True])
    weights, keep, m = rollout_correction(old, rollout, mask, ids, "mis", mis_level="sequence", mis_low=0.5, mis_high=1.5)
    assert keep.tolist() == [True, True, True, False, False, False, True]
    _close(weights, [1, 1, 1, 0, 0, 0, 1])
    _close(m["tokens"], 6)
    _close(m["masked"], 2)
    _close(m["ratio_sum"], 4 + 0.25 + 1 + 2 + 2 + 1.2)
    _close(m["ratio_max"], 4)
    # a fully rejected sequence leaves num_global_seqs too: seq_mean_token_mean over samples 0 and 2
    num_tokens, num_seqs = loss_normalisers(keep, ids).tolist()
    assert (num_tokens, num_seqs) == (4, 2)
    adv = torch.tensor([1.0, 1.0, 1.0, 9.0, 9.0, 9.0, -4.0])
    loss, _ = policy_loss(old, old, adv, keep, ids, aggregation="seq_mean_token_mean", num_global_seqs=num_seqs)
    # sample 0: 3 tokens of -1 each, mean -1; sample 2: one token of +4; mean over the 2 sequences
    _close(loss, (-1 + 4) / 2)


def test_none_keeps_everything_but_reports_the_mismatch():
    old, rollout, mask, ids = _tis_case()
    weights, out_mask, m = rollout_correction(old, rollout, mask, ids, "none")
    _close(weights, [1, 1, 1, 0])
    assert torch.equal(out_mask, mask)
    _close(m["ratio_max"], 3)
    _close(m["truncated"] + m["masked"], 0)


def test_bad_arguments():
    old, rollout, mask, ids = _tis_case()
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_correction(old, rollout, mask, ids, "is")
    with pytest.raises(ValueError, match="mis_level"):
        rollout_correction(old, rollout, mask, ids, "mis", mis_level="geometric")
    with pytest.raises(ValueError, match="expected"):
        rollout_correction(old, rollout[:3], mask, ids, "tis")


# ---- wired into the trainer: the rollout's logprobs (-4 for every token) against the trainer's own (about -4.6) ----
def _trainer_step(ps, **algo):
    torch.manual_seed(0)
    trainer = PolicyTrainer(Policy(CFG, ps.tp_group), OptimConfig(lr=1e-2, micro_batch_tokens=40), AlgoConfig(**algo), ps,
                            total_steps=1)
    samples = make_samples(ps)
    return trainer.step(samples, plan_micro_batches([len(s.tokens) for s in samples], 40), max_response_len=16)[0]


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_applies_the_correction_and_reports_the_mismatch():
    ps = init_parallel()
    plain = _trainer_step(ps)
    assert 0.3 < plain["rollout_ratio_mean"] < 1 and plain["rollout_kl_k3"] > 0 and plain["logprob_gap_rollout"] > 0
    assert "rollout_truncated_frac" not in plain and "rollout_masked_frac" not in plain
    # a cap below every ratio: every weight is the cap, so the on-policy loss (ratio 1) scales by it exactly
    tis = _trainer_step(ps, rollout_correction="tis", tis_cap=1e-3)
    assert tis["rollout_truncated_frac"] == 1 and tis["loss"] == pytest.approx(1e-3 * plain["loss"], rel=1e-5)
    assert tis["rollout_tis_weight_mean"] == pytest.approx(1e-3)
    capped = _trainer_step(ps, rollout_correction="tis", tis_cap=2.0)  # the cap above every ratio: the weights are the ratios
    assert capped["rollout_tis_weight_mean"] == pytest.approx(capped["rollout_ratio_mean"], rel=1e-6)
    assert capped["rollout_ratio_max"] < 2.0
    assert tis["rollout_ratio_mean"] == plain["rollout_ratio_mean"]  # the diagnostics do not depend on the mode
    # bounds above every ratio: every token rejected, no loss and no gradient
    mis = _trainer_step(ps, rollout_correction="mis", mis_low=2.0, mis_high=3.0)
    assert mis["rollout_masked_frac"] == 1 and mis["loss"] == 0 and mis["grad_norm"] == 0
    assert mis["train_tokens"] == plain["train_tokens"] > 0
