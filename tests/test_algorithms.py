"""RL algorithms: advantages, PPO-clip loss and its aggregations, overlong handling, dynamic sampling, NaN guard.

Expected values are worked out by hand in the comments next to them.
"""
import math

import pytest
import torch

from megatron_tlt.rl.algorithms import (
    ADVANTAGES,
    advantage_fn,
    drgrpo_advantages,
    filter_groups,
    grpo_advantages,
    is_finite_update,
    kl_k3,
    loss_normalisers,
    num_prompts_to_draw,
    overlong_mask,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sample_ids_from_cu_seqlens,
)


def close(actual, expected, atol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float32)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------ advantages


def test_grpo_uses_sample_std():
    # mean 0.5; sample std = sqrt(4 * 0.25 / 3) = 0.57735; 0.5 / 0.57735 = 0.866025
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([7, 7, 7, 7]), eps=0.0)
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025])
    # [2, 0, 1]: mean 1, sample std sqrt((1 + 1 + 0) / 2) = 1
    close(grpo_advantages(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), eps=0.0), [1.0, -1.0, 0.0])


def test_grpo_groups_interleaved_equal_and_singleton():
    # groups: 3 -> [1, 0] (mean .5, std sqrt(.5) = .707107 -> +-.707107), 5 -> [0.1, 0.1, 0.1] (all equal -> 0),
    # 9 -> [4] (group of one -> 0); ids are arbitrary and interleaved
    rewards = torch.tensor([1.0, 0.1, 4.0, 0.1, 0.0, 0.1])
    group_ids = torch.tensor([3, 5, 9, 5, 3, 5])
    adv = grpo_advantages(rewards, group_ids, eps=0.0)
    close(adv, [0.707107, 0.0, 0.0, 0.0, -0.707107, 0.0])
    assert adv[[1, 2, 3, 5]].eq(0).all()  # exactly zero, not an ulp over eps


def test_grpo_eps_and_dtype():
    adv = grpo_advantages(torch.tensor([1, 0], dtype=torch.int64), torch.tensor([0, 0]), eps=0.5)
    assert adv.dtype == torch.float32
    close(adv, [0.5 / (math.sqrt(0.5) + 0.5), -0.5 / (math.sqrt(0.5) + 0.5)])
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0])).dtype == torch.float64


def test_drgrpo_no_std_scaling():
    close(drgrpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0])), [0.5, -0.5, -0.5, 0.5])
    close(drgrpo_advantages(torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([0, 0, 0, 1])), [1.0, -1.0, 0.0, 0.0])


def test_rloo_leave_one_out():
    # [1, 0, 0, 1]: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    close(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0])), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # [2, 0, 1]: 2 - 0.5 = 1.5, 0 - 1.5 = -1.5, 1 - 1 = 0; group of one -> 0
    close(rloo_advantages(torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([1, 1, 1, 2])), [1.5, -1.5, 0.0, 0.0])


def test_reinforce_pp_batch_std():
    # b = r - group mean = [.5, -.5, 1, -1, 0]; batch sample std = sqrt(2.5 / 4) = 0.790569
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1, 1]), eps=0.0)
    close(adv, [0.632456, -0.632456, 1.264911, -1.264911, 0.0])
    close(reinforce_pp_advantages(torch.tensor([3.0]), torch.tensor([0])), [0.0])
    assert reinforce_pp_advantages(torch.full((4,), 0.3), torch.tensor([0, 0, 1, 1]), eps=0.0).eq(0).all()  # no 0 / 0


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_all_equal_rewards_give_zero(name):
    adv = advantage_fn(name)(torch.full((4,), 0.3), torch.tensor([0, 0, 1, 1]))
    assert adv.eq(0).all()


def test_unknown_advantage_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid: grpo, drgrpo, rloo, reinforce_pp"):
        advantage_fn("ppo")


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="rewards \\[N\\] and group_ids \\[N\\]"):
        grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(4), torch.zeros(4))


# ------------------------------------------------------------------------------------------ policy loss

# Five tokens of one sample, all in the mask; log-ratios chosen so that ratio = exp(lp - old) is exact.
RATIOS = [1.5, 0.5, 1.25, 0.5, 1.5]
ADVS = [1.0, -1.0, 1.0, 1.0, -1.0]
# per-token loss max(-A r, -A clip(r, 0.8, 1.28)):
#   t0 r=1.5  A=+1: max(-1.5, -1.28) = -1.28  (clipped high)
#   t1 r=0.5  A=-1: max(0.5, 0.8)   = 0.8     (clipped low)
#   t2 r=1.25 A=+1: max(-1.25, -1.25) = -1.25 (inside clip-higher; symmetric 0.2 would clip it)
#   t3 r=0.5  A=+1: max(-0.5, -0.8) = -0.5    (pessimistic: unclipped)
#   t4 r=1.5  A=-1: max(1.5, 1.28)  = 1.5     (unclipped; dual_clip=1.4 caps it at 1.4)
PER_TOKEN = [-1.28, 0.8, -1.25, -0.5, 1.5]


def _five_tokens(requires_grad=True):
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    lp = (old + torch.tensor(RATIOS).log()).requires_grad_(requires_grad)
    return lp, old, torch.tensor(ADVS), torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.int64)


def test_clip_higher_token_mean_values_and_grads():
    lp, old, adv, mask, sid = _five_tokens()
    loss, m = policy_loss(lp, old, adv, mask, sid)
    close(loss, sum(PER_TOKEN) / 5)  # -0.73 / 5 = -0.146
    close(m["clip_frac"], 2 / 5)
    close(m["ratio_mean"], sum(RATIOS) / 5)
    close(m["ratio_max"], 1.5)
    # approx_kl = mean(r - 1 - log r)
    close(m["approx_kl"], sum(r - 1 - math.log(r) for r in RATIOS) / 5)
    assert "kl" not in m and "entropy" not in m
    loss.backward()
    # d/dlp of -A r = -A r where unclipped, 0 where clipped; / 5 tokens
    close(lp.grad, [0.0, 0.0, -1.25 / 5, -0.5 / 5, 1.5 / 5])


def test_symmetric_clip_clips_t2():
    lp, old, adv, mask, sid = _five_tokens()
    loss, m = policy_loss(lp, old, adv, mask, sid, clip_low=0.2, clip_high=0.2)
    close(loss, (-1.2 + 0.8 - 1.2 - 0.5 + 1.5) / 5)
    close(m["clip_frac"], 3 / 5)


def test_dual_clip_caps_negative_advantage_loss():
    lp, old, adv, mask, sid = _five_tokens()
    loss, _ = policy_loss(lp, old, adv, mask, sid, dual_clip=1.4)
    close(loss, (-1.28 + 0.8 - 1.25 - 0.5 + 1.4) / 5)
    loss.backward()
    close(lp.grad, [0.0, 0.0, -1.25 / 5, -0.5 / 5, 0.0])
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, mask, sid, dual_clip=1.0)


def test_k3_kl_values_loss_and_metrics():
    # d = ref - lp = log 2: 2 - 0.693147 - 1 = 0.306853; d = -log 2: 0.5 + 0.693147 - 1 = 0.193147; d = 0: 0
    lp = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.0 + math.log(2), -1.0 - math.log(2), -2.0])
    close(kl_k3(lp, ref), [0.306853, 0.193147, 0.0])
    # ratio 1 and A = 0: the loss is kl_coef * mean(k3)
    loss, m = policy_loss(lp, lp.detach(), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.int64),
                          ref_logprobs=ref, kl_coef=0.1, entropy=torch.tensor([1.0, 2.0, 3.0]))
    close(m["kl"], 0.5 / 3)
    close(loss, 0.1 * 0.5 / 3)
    close(m["entropy"], 2.0)
    loss.backward()
    # d k3 / d lp = 1 - exp(d): 1 - 2 = -1, 1 - 0.5 = 0.5, 0
    close(lp.grad, [-0.1 / 3, 0.05 / 3, 0.0])
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(lp, lp.detach(), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.int64),
                    kl_coef=0.1)


# Two samples at ratio 1: sample 0 has 3 loss tokens with A = +1 (loss -1 each), sample 1 has 1 loss
# token with A = -2 (loss 2) plus one masked token.
#   token_mean:              (-3 + 2) / 4 tokens            = -0.25
#   seq_mean_token_mean:     (-3 / 3 + 2 / 1) / 2 samples    = 0.5
#   seq_mean_token_sum_norm: (-3 + 2) / (2 samples * 4)      = -0.125   (max_response_len = 4)
@pytest.mark.parametrize(
    "aggregation, expected", [("token_mean", -0.25), ("seq_mean_token_mean", 0.5), ("seq_mean_token_sum_norm", -0.125)]
)
def test_aggregation_values(aggregation, expected):
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0])
    mask = torch.tensor([True, True, True, True, False])
    sid = torch.tensor([10, 10, 10, 42, 42])
    loss, _ = policy_loss(lp, lp, adv, mask, sid, aggregation=aggregation, max_response_len=4)
    close(loss, expected)


def test_aggregation_errors():
    lp, old, adv, mask, sid = _five_tokens()
    valid = "token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"
    with pytest.raises(ValueError, match=f"unknown loss aggregation 'mean'; valid: {valid}"):
        policy_loss(lp, old, adv, mask, sid, aggregation="mean")
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(lp, old, adv, mask, sid, aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        policy_loss(lp, old, adv, mask.float(), sid)
    with pytest.raises(ValueError, match="expected \\[T\\]"):
        policy_loss(lp, old[:4], adv, mask, sid)


def _random_batch(seed=0):
    """Five samples of lengths 3, 7, 2, 5, 4 with a prompt prefix out of the loss mask and garbage there."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 7, 2, 5, 4]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    sid = sample_ids_from_cu_seqlens(cu_seqlens)
    T = int(cu_seqlens[-1])
    mask = torch.rand(T, generator=g) > 0.3
    mask[cu_seqlens[:-1].long()] = False  # first position of each sample is prompt
    mask[3:10] = torch.tensor([False, True, True, True, False, True, True])  # sample 1 has a masked hole
    old = -torch.rand(T, generator=g) * 3
    lp = old + torch.randn(T, generator=g) * 0.4
    ref = old + torch.randn(T, generator=g) * 0.2
    adv = torch.randn(5, generator=g)[sid]
    ent = torch.rand(T, generator=g) * 2
    return lp, old, adv, mask, sid, ref, ent, cu_seqlens


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_sum_to_full_batch_loss_and_grad(aggregation):
    lp, old, adv, mask, sid, ref, ent, cu = _random_batch()
    kwargs = dict(aggregation=aggregation, max_response_len=8, ref_logprobs=ref, kl_coef=0.05, dual_clip=3.0)

    full_lp = lp.clone().requires_grad_(True)
    full_loss, full_m = policy_loss(full_lp, old, adv, mask, sid, entropy=ent, **kwargs)
    full_loss.backward()

    split = int(cu[2])  # micro-batch 1 = samples 0-1, micro-batch 2 = samples 2-4, local sample ids 0..
    parts = [slice(0, split), slice(split, None)]
    local_sids = [sid[parts[0]], sid[parts[1]] - 2]
    norms = sum(loss_normalisers(mask[p], s) for p, s in zip(parts, local_sids))
    assert norms.tolist() == [float(mask.sum()), 5.0]
    total, grads, metric_sums = 0.0, [], {}
    for p, s in zip(parts, local_sids):
        mb_lp = lp[p].clone().requires_grad_(True)
        loss, m = policy_loss(mb_lp, old[p], adv[p], mask[p], s, entropy=ent[p], num_global_tokens=norms[0],
                              num_global_seqs=norms[1], **{**kwargs, "ref_logprobs": ref[p]})
        loss.backward()
        total = total + loss.detach()
        grads.append(mb_lp.grad)
        for k, v in m.items():  # ratio_max reduces with max, the others with sum
            metric_sums[k] = torch.maximum(metric_sums.get(k, v), v) if k == "ratio_max" else metric_sums.get(k, 0) + v

    torch.testing.assert_close(total, full_loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_lp.grad, atol=1e-7, rtol=1e-6)
    assert set(metric_sums) == set(full_m) == {"clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy"}
    for k in full_m:
        torch.testing.assert_close(metric_sums[k], full_m[k], atol=1e-6, rtol=1e-6)


def test_masked_tokens_contribute_nothing():
    lp, old, adv, mask, sid, ref, ent, _ = _random_batch(seed=1)
    kwargs = dict(aggregation="seq_mean_token_mean", ref_logprobs=ref, kl_coef=0.1)
    x = lp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, sid, entropy=ent, **kwargs)
    loss.backward()

    # garbage (inf / nan / huge) at masked positions changes nothing and gets zero gradient
    bad = lp.clone()
    bad[~mask] = torch.tensor([math.inf, -math.inf, math.nan, 1e9]).repeat(int((~mask).sum()))[: int((~mask).sum())]
    bad_ref, bad_old, bad_adv, bad_ent = (t.clone().masked_fill(~mask, math.nan) for t in (ref, old, adv, ent))
    y = bad.requires_grad_(True)
    loss2, m2 = policy_loss(y, bad_old, bad_adv, mask, sid, entropy=bad_ent, **{**kwargs, "ref_logprobs": bad_ref})
    loss2.backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(y.grad, x.grad)
    assert y.grad[~mask].eq(0).all()
    for k in m:
        torch.testing.assert_close(m2[k], m[k])

    # and equal the loss on the loss tokens alone
    z = lp[mask].clone().requires_grad_(True)
    loss3, _ = policy_loss(z, old[mask], adv[mask], torch.ones(int(mask.sum()), dtype=torch.bool), sid[mask],
                           **{**kwargs, "ref_logprobs": ref[mask]})
    torch.testing.assert_close(loss3, loss)


def test_all_masked_micro_batch_is_zero_and_finite():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, m = policy_loss(lp, lp.detach() + 5, torch.ones(2), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64),
                          aggregation="seq_mean_token_mean")
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
    loss.backward()
    assert lp.grad.eq(0).all()
    empty = torch.zeros(0)
    loss, m = policy_loss(empty, empty, empty, empty.bool(), empty.long())
    assert loss.item() == 0.0 and m["ratio_max"].item() == 0.0


def test_sample_ids_from_cu_seqlens():
    assert sample_ids_from_cu_seqlens(torch.tensor([0, 3, 4, 6], dtype=torch.int32)).tolist() == [0, 0, 0, 1, 2, 2]


def test_loss_normalisers_counts_tokens_and_nonempty_samples():
    mask = torch.tensor([True, True, False, False, True])
    sid = torch.tensor([0, 0, 1, 1, 2])  # sample 1 has no loss token
    assert loss_normalisers(mask, sid).tolist() == [3.0, 2.0]


# ------------------------------------------------------------------------------------------ overlong


def test_overlong_mask():
    assert overlong_mask(["stop", "length", "stop"]).tolist() == [True, False, True]


def test_overlong_penalty_dapo_values():
    # max_len 100, buffer 20: 0 up to 80 tokens, then -(L - 80) / 20 * 0.5, -0.5 at 100 and beyond
    pen = overlong_penalty([10, 80, 85, 90, 100, 120], max_len=100, buffer_len=20, penalty=0.5)
    close(pen, [0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([10], max_len=10, buffer_len=20)


# ------------------------------------------------------------------------------------------ dynamic sampling


def test_filter_groups_drops_zero_variance_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 2.0])
    group_ids = torch.tensor([4, 4, 2, 2, 9, 9, 7, 1, 1])  # 2: all 1, 9: all 0, 7: single -> dropped
    keep, kept = filter_groups(rewards, group_ids)
    assert keep.tolist() == [True, True, False, False, False, False, False, True, True]
    assert kept.tolist() == [1, 4]


def test_num_prompts_to_draw():
    # 3 of 8 kept, target 8: 5 missing at a kept fraction of 3/8 -> ceil(5 * 8 / 3) = 14
    assert num_prompts_to_draw(3, 8, target=8, refills_done=0, max_refills=3, max_draw=64) == 14
    assert num_prompts_to_draw(3, 8, target=8, refills_done=0, max_refills=3, max_draw=10) == 10  # capped
    assert num_prompts_to_draw(0, 8, target=8, refills_done=1, max_refills=3, max_draw=16) == 16  # nothing kept yet
    assert num_prompts_to_draw(8, 20, target=8, refills_done=1, max_refills=3, max_draw=16) == 0  # target reached
    assert num_prompts_to_draw(2, 30, target=8, refills_done=3, max_refills=3, max_draw=16) == 0  # out of rounds
    assert num_prompts_to_draw(7, 7, target=8, refills_done=0, max_refills=1, max_draw=16) == 1
    with pytest.raises(ValueError, match="dynamic-sampling"):
        num_prompts_to_draw(5, 3, target=8, refills_done=0, max_refills=1, max_draw=16)


# ------------------------------------------------------------------------------------------ NaN guard


def test_is_finite_update():
    assert is_finite_update(torch.tensor(0.5), torch.tensor(3.0))
    assert is_finite_update(0.5, 3.0)
    assert not is_finite_update(torch.tensor(math.nan), torch.tensor(3.0))
    assert not is_finite_update(torch.tensor(0.5), torch.tensor(math.inf))
    assert not is_finite_update(torch.tensor(0.5, requires_grad=True) * math.nan, 1.0)
