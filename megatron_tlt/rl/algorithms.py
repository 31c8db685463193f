"""RL maths for the policy update: advantages, the clipped policy loss, rollout correction, overlong handling, dynamic sampling.

Everything here is a small pure function on tensors; the trainer (`megatron_tlt/train.py`) wires
them together from the config. No function knows about models, parallelism or the rollout engine.

Advantages (one scalar per sample, broadcast to the sample's tokens by the trainer). Input layout:
`rewards [N]` float and `group_ids [N]` int, where samples of the same prompt share a group id (any
integers, in any order; groups need not be contiguous). With r the rewards of one group of n samples:

    grpo          A_i = (r_i - mean(r)) / (std(r) + eps)    std = sample std (Bessel, divides by n - 1),
                                                             as `torch.std` in the GRPO implementations
    drgrpo        A_i = r_i - mean(r)                        Dr.GRPO: no std scaling (its other fix, no
                                                             length normalisation, is the loss aggregation
                                                             "seq_mean_token_sum_norm")
    rloo          A_i = r_i - mean_{j != i}(r_j) = n / (n - 1) * (r_i - mean(r))
    reinforce_pp  A_i = b_i / (std_batch(b) + eps),  b_i = r_i - mean(r)
                  (REINFORCE++-baseline: group-mean baseline, then one std over the whole batch, so
                  pass the global batch; the KL term stays in the loss, not in the reward)

A group whose rewards are all equal (including a group of one) gets exactly 0 advantage.

Policy loss (PPO-clip with clip-higher, DAPO), per response token t of sample i, with
ratio_t = exp(logprobs_t - old_logprobs_t) and A_t = A_i:

    pg_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
    pg_t  = min(pg_t, -A_t * dual_clip)                           only where A_t < 0, if dual_clip is set
    kl_t  = exp(ref_t - lp_t) - (ref_t - lp_t) - 1                k3 estimator of KL(pi || pi_ref), >= 0
    l_t   = pg_t + kl_coef * kl_t

and the loss is sum_t w_t * l_t over loss tokens, with weights from the aggregation:

    token_mean                w_t = 1 / num_global_tokens                     (DAPO token-level)
    seq_mean_token_mean       w_t = 1 / (num_global_seqs * len_i)             (GRPO paper)
    seq_mean_token_sum_norm   w_t = 1 / (num_global_seqs * max_response_len)  (Dr.GRPO: a constant length)

where len_i is the number of loss tokens of sample i. Exact under micro-batching: the weights use
*global* normalisers (counted over the whole optimizer step: every micro-batch of every DP rank, see
`loss_normalisers`), so the sum of the per-micro-batch losses is the full-batch loss and their
gradients add up to its gradient. Each sample must lie whole inside one micro-batch (packing never
splits one), because len_i is counted per call. If the data-parallel gradient reduction *averages*
(torch DDP, megatron DDP by default), multiply the loss by the DP world size before `backward`.

Log-ratios are clamped to [-20, 20] before `exp` and non-loss tokens are zeroed *before* any
arithmetic, so garbage (even inf/NaN) logprobs at masked positions never reach the loss or gradient.

Rollout correction (`rollout_correction`): the rollout engine's policy (another kernel, FP8, ...) is not
exactly the trained one, so its samples are slightly off-policy even before the first update. With
rho_t = exp(old_t - rollout_t) (old: the trainer's own pre-update logprobs; rollout: `Sample.rollout_logprobs`):

    none          nothing changes (the diagnostics below are still reported)
    tis           truncated importance sampling: pg_t multiplied by min(rho_t, tis_cap), detached
                  (`policy_loss(token_weights=...)`; the KL-to-reference term is not reweighted)
    mis  token    masked importance sampling (verl's rejection sampling): tokens with rho_t outside
                  [mis_low, mis_high] leave the loss mask
    mis  sequence the same for whole samples, by the geometric mean exp(mean_t log rho_t) over their loss tokens

MIS follows verl's rejection sampling (docs "Rollout Correction", and PR #3915 "Separate IS Weights from
Rejection Sampling", which applies it through the response mask and excludes the rejected tokens and fully
rejected sequences from the loss denominators): a rejected token leaves the loss mask, so it gets no loss at
all (neither the PG nor the KL term) and is not counted in `loss_normalisers` or in len_i.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

Normaliser = Union[int, float, torch.Tensor]  # a count: Python number or 0-dim tensor (e.g. all-reduced)
AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rewards [N], group_ids [N]) -> advantages [N]
BatchSum = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over the whole batch (e.g. an all-reduce over DP)

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
MIS_LEVELS = ("token", "sequence")
TRUNCATED_FINISH_REASON = "length"  # rollout `Completion.finish_reason` of a response cut at the length limit
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: finite in fp32/bf16, far beyond any clip range


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
# All estimators but REINFORCE++'s are group-local: with whole groups on each DP rank they need no
# communication. REINFORCE++ scales by one batch-wide std: `batch_sum` reduces its three moments.


def _check_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return rewards as (at least) fp32."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"expected rewards [N] and group_ids [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    return rewards.to(torch.promote_types(rewards.dtype, torch.float32))


def _all_equal_groups(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """rewards [N], group_index [N] in [0, G) -> [G] bool, True where all of a group's rewards are equal."""
    group_max = rewards.new_full((num_groups,), -math.inf).scatter_reduce_(0, group_index, rewards, "amax")  # [G]
    group_min = rewards.new_full((num_groups,), math.inf).scatter_reduce_(0, group_index, rewards, "amin")  # [G]
    return group_max == group_min


def _centered_by_group(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [N], group_ids [N] -> (r - group mean [N] (exactly 0 in all-equal groups), group index [N], group sizes [G])."""
    _, group_index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # [N], [G]
    sums = rewards.new_zeros(counts.numel()).index_add_(0, group_index, rewards)  # [G]
    centered = rewards - (sums / counts)[group_index]  # [N]
    all_equal = _all_equal_groups(rewards, group_index, counts.numel())[group_index]  # [N]
    return centered.masked_fill(all_equal, 0.0), group_index, counts  # the mean of equal floats may be off by an ulp


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> torch.Tensor:
    """(r - group mean) / (group sample std + eps); `scale_by_std=False` is Dr.GRPO. [N], [N] -> [N]."""
    rewards = _check_rewards(rewards, group_ids)
    centered, group_index, counts = _centered_by_group(rewards, group_ids)
    if not scale_by_std:
        return centered
    sq_sums = rewards.new_zeros(counts.numel()).index_add_(0, group_index, centered.square())  # [G]
    std = (sq_sums / (counts - 1).clamp_min(1)).sqrt()  # [G]
    return centered / (std + eps).masked_fill(std == 0, 1.0)[group_index]  # std == 0 only where centered == 0


def drgrpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: r - group mean, no std scaling. [N], [N] -> [N]."""
    return grpo_advantages(rewards, group_ids, scale_by_std=False)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: r_i - mean of the other samples of its group (0 for a group of one). [N], [N] -> [N]."""
    rewards = _check_rewards(rewards, group_ids)
    centered, group_index, counts = _centered_by_group(rewards, group_ids)
    n = counts[group_index].to(rewards.dtype)  # [N]
    return centered * n / (n - 1).clamp_min(1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, batch_sum: Optional[BatchSum] = None
) -> torch.Tensor:
    """REINFORCE++-baseline: (r - group mean) / (sample std of that over the whole batch + eps). [N], [N] -> [N].

    `batch_sum` sums a tensor over the whole batch when it is spread over DP ranks (each holding whole
    groups); the std then comes from the global count, sum and sum of squares (one [3] reduction)."""
    rewards = _check_rewards(rewards, group_ids)
    centered, _, _ = _centered_by_group(rewards, group_ids)
    moments = torch.stack([centered.new_tensor(float(centered.numel())), centered.sum(), centered.square().sum()])
    count, total, total_sq = (moments if batch_sum is None else batch_sum(moments)).tolist()
    if count < 2:
        return centered
    std = torch.tensor(max(total_sq - total * total / count, 0.0) / (count - 1), dtype=centered.dtype).sqrt()
    return centered / (std + eps).masked_fill(std == 0, 1.0)  # std == 0 only where centered == 0


ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


def advantage_fn(name: str) -> AdvantageFn:
    """The advantage estimator called `name` (a key of ADVANTAGES): fn(rewards [N], group_ids [N]) -> [N]."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor, batch_sum: Optional[BatchSum] = None) -> torch.Tensor:
    """`advantage_fn(name)(rewards, group_ids)`, with the batch-wide reduction `batch_sum` for the estimators
    that need one (reinforce_pp) when the batch is spread over ranks. [N], [N] -> [N]."""
    fn = advantage_fn(name)
    return fn(rewards, group_ids, batch_sum=batch_sum) if fn is reinforce_pp_advantages else fn(rewards, group_ids)


# ----------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------


def sample_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [N+1] of a packed micro-batch -> [T] int64 index (0..N-1) of the example each position belongs to."""
    lengths = torch.diff(cu_seqlens).long()  # [N]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def loss_normalisers(loss_mask: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """[2] float64 (loss tokens, samples with >= 1 loss token) of one micro-batch.

    Sum it over the step's micro-batches and all-reduce (SUM) over DP to get the `num_global_tokens`
    and `num_global_seqs` that `policy_loss` takes. loss_mask: [T] bool; sample_ids: [T] int.
    """
    num_tokens = loss_mask.sum(dtype=torch.float64)
    num_seqs = torch.unique(sample_ids[loss_mask]).numel()
    return torch.stack([num_tokens, num_tokens.new_tensor(float(num_seqs))])


def _as_normaliser(value: Normaliser, like: torch.Tensor) -> torch.Tensor:
    """A positive count as a 0-dim tensor of `like`'s dtype/device; 0 (an all-masked step) becomes 1."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp_min(1)


def aggregation_weights(
    loss_mask: torch.Tensor,
    sample_ids: torch.Tensor,
    aggregation: str,
    num_global_tokens: Normaliser | None = None,
    num_global_seqs: Normaliser | None = None,
    max_response_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[T] weight w_t of each token's loss (0 off the mask), so that loss = sum_t w_t * l_t; see the module docstring.

    A normaliser left as None is counted on this call's tokens (this call is the whole step).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "seq_mean_token_sum_norm" and (max_response_len is None or max_response_len < 1):
        raise ValueError(f"aggregation 'seq_mean_token_sum_norm' needs max_response_len >= 1, got {max_response_len}")
    mask = loss_mask.to(dtype)  # [T]
    if aggregation == "token_mean":
        return mask / _as_normaliser(mask.sum() if num_global_tokens is None else num_global_tokens, mask)
    if num_global_seqs is None:
        num_global_seqs = loss_normalisers(loss_mask, sample_ids)[1]
    seq_norm = _as_normaliser(num_global_seqs, mask)
    if aggregation == "seq_mean_token_sum_norm":
        return mask / (max_response_len * seq_norm)
    samples, sample_index = torch.unique(sample_ids, return_inverse=True)  # [S], [T]; one host sync
    seq_tokens = mask.new_zeros(samples.numel()).index_add_(0, sample_index, mask)  # [S] loss tokens per sample
    return mask / (seq_tokens[sample_index].clamp_min(1) * seq_norm)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - lp clamped to [-20, 20]. [T], [T] -> [T]."""
    d = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return d.exp() - d - 1


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    num_global_tokens: Normaliser | None = None,
    num_global_seqs: Normaliser | None = None,
    max_response_len: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of one micro-batch on flat per-token tensors; formulas in the module docstring.

    logprobs: [T] current policy (differentiable); old_logprobs: [T] the policy that sampled;
    advantages: [T] (each token carries its sample's advantage); loss_mask: [T] bool; sample_ids: [T]
    int, the sample each token belongs to (any ids; `sample_ids_from_cu_seqlens` for a packed batch);
    ref_logprobs, entropy: [T] or None. `num_global_tokens` / `num_global_seqs` (int or 0-dim tensor)
    are the step's totals from `loss_normalisers`; None means this call is the whole step.
    `max_response_len` is the constant of "seq_mean_token_sum_norm". `dual_clip` (> 1, e.g. 3) caps
    the loss of negative-advantage tokens at -A * dual_clip. token_weights: [T] or None, multiplies each
    token's policy-gradient term pg_t (not the KL term), e.g. the TIS weights of `rollout_correction`;
    treated as constants (detached).

    Host syncs: none for "token_mean" and "seq_mean_token_sum_norm" with the normalisers given;
    one (`torch.unique`) for "seq_mean_token_mean" and for a normaliser left to be counted.

    Returns (loss, metrics). loss: 0-dim, this micro-batch's share of the step loss (sum the shares).
    metrics: detached 0-dim tensors. `clip_frac`, `approx_kl` (k3 of KL(old || new)),
    `kl` (with ref_logprobs), `entropy` (with entropy), `ratio_mean` are token sums divided by
    num_global_tokens: sum them over micro-batches and DP ranks for the step's token mean;
    `ratio_max` is a max: reduce it with max.
    """
    per_token_inputs = (logprobs, old_logprobs, advantages, loss_mask, sample_ids, ref_logprobs, entropy, token_weights)
    per_token_inputs = [t for t in per_token_inputs if t is not None]
    if logprobs.dim() != 1 or any(t.shape != logprobs.shape for t in per_token_inputs):
        raise ValueError(
            "expected [T] logprobs, old_logprobs, advantages, loss_mask, sample_ids (and ref_logprobs, entropy, "
            f"token_weights if given); got {[tuple(t.shape) for t in per_token_inputs]}"
        )
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool, got {loss_mask.dtype}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    num_tokens = loss_mask.sum() if num_global_tokens is None else num_global_tokens
    weights = aggregation_weights(loss_mask, sample_ids, aggregation, num_tokens, num_global_seqs, max_response_len, dtype)  # [T]

    def masked(x: torch.Tensor) -> torch.Tensor:  # [T] -> [T] in `dtype`, exactly 0 off the mask (no NaN leaks)
        return torch.where(loss_mask, x.to(dtype), 0.0)

    log_ratio = (masked(logprobs) - masked(old_logprobs)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [T], 0 off the mask
    ratio = log_ratio.exp()  # [T]; 1 off the mask
    adv = masked(advantages)  # [T]
    pg_unclipped = -adv * ratio  # [T]
    pg_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # [T]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [T]
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    per_token = pg if token_weights is None else pg * masked(token_weights.detach())  # [T]
    kl = None
    if ref_logprobs is not None:
        kl = kl_k3(masked(logprobs), masked(ref_logprobs))  # [T]; 0 off the mask
        per_token = per_token + kl_coef * kl
    loss = (weights * per_token).sum()

    metric_norm = _as_normaliser(num_tokens, weights)
    with torch.no_grad():
        mask = loss_mask.to(dtype)
        metrics = {
            "clip_frac": (pg_clipped > pg_unclipped).to(dtype).sum() / metric_norm,  # never true off the mask
            "approx_kl": (ratio - 1 - log_ratio).sum() / metric_norm,  # k3 of KL(old || new); 0 off the mask
            "ratio_mean": (ratio * mask).sum() / metric_norm,
            "ratio_max": (ratio * mask).amax() if ratio.numel() else ratio.new_zeros(()),
        }
        if kl is not None:
            metrics["kl"] = kl.sum() / metric_norm
        if entropy is not None:
            metrics["entropy"] = masked(entropy).sum() / metric_norm
    return loss, metrics


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    sample_ids: torch.Tensor,
    mode: str = "none",
    *,
    tis_cap: float = 2.0,
    mis_level: str = "token",
    mis_low: float = 0.5,
    mis_high: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The rollout-training mismatch correction of one micro-batch (see the module docstring).

    old_logprobs: [T] the trainer's pre-update logprobs; rollout_logprobs: [T] the rollout engine's;
    loss_mask: [T] bool; sample_ids: [T] int (each sample whole in this call, for mis_level "sequence").
    mode: one of ROLLOUT_CORRECTIONS.

    Returns (token_weights [T] fp32, loss_mask [T] bool, metrics): the TIS weights min(rho_t, tis_cap) for
    "tis", else 1 (0 off the mask), for `policy_loss(token_weights=)`; the loss mask with the MIS rejections
    removed ("mis"; the input mask otherwise), for `policy_loss` and `loss_normalisers`. metrics: detached
    0-dim fp32 token sums over the *input* loss mask, to be summed over micro-batches and DP ranks:
    `tokens`, `ratio_sum` (rho), `kl_k3_sum` (k3 of KL(rollout || train): exp(d) - d - 1, d = old - rollout,
    an unbiased estimate on samples of the rollout policy), `truncated` (tis: tokens with rho > tis_cap; else 0),
    `masked` (mis: tokens rejected; else 0); and `ratio_max` (reduce with max; 0 with no loss token).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; valid: {', '.join(ROLLOUT_CORRECTIONS)}")
    if mis_level not in MIS_LEVELS:
        raise ValueError(f"unknown mis_level {mis_level!r}; valid: {', '.join(MIS_LEVELS)}")
    if any(t.shape != old_logprobs.shape for t in (rollout_logprobs, loss_mask, sample_ids)) or old_logprobs.dim() != 1:
        raise ValueError("expected [T] old_logprobs, rollout_logprobs, loss_mask, sample_ids; got "
                         f"{[tuple(t.shape) for t in (old_logprobs, rollout_logprobs, loss_mask, sample_ids)]}")
    mask = loss_mask.float()  # [T]
    d = torch.where(loss_mask, old_logprobs.detach().float() - rollout_logprobs.float(), 0.0)
    d = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [T] log rho, 0 off the mask
    ratio = d.exp()  # [T]; 1 off the mask
    zero = mask.new_zeros(())
    metrics = {
        "tokens": mask.sum(), "ratio_sum": (ratio * mask).sum(), "kl_k3_sum": (torch.expm1(d) - d).sum(),  # 0 off the mask; expm1: no negative rounding
        "ratio_max": (ratio * mask).amax() if ratio.numel() else zero, "truncated": zero, "masked": zero,
    }
    if mode == "tis":
        metrics["truncated"] = ((ratio > tis_cap) & loss_mask).float().sum()
        return ratio.clamp(max=tis_cap) * mask, loss_mask, metrics
    if mode == "mis":
        if mis_level == "sequence":  # geometric mean of each sample's token ratios, broadcast to its tokens
            samples, index = torch.unique(sample_ids, return_inverse=True)  # [S], [T]
            log_sum = d.new_zeros(samples.numel()).index_add_(0, index, d)  # [S]
            count = mask.new_zeros(samples.numel()).index_add_(0, index, mask)  # [S]
            level = (log_sum / count.clamp_min(1)).exp()[index]  # [T]
        else:
            level = ratio
        keep = loss_mask & (level >= mis_low) & (level <= mis_high)
        metrics["masked"] = (loss_mask & ~keep).float().sum()
        return keep.float(), keep, metrics
    return mask, loss_mask, metrics


# ----------------------------------------------------------------------------------------------
# Overlong responses
# ----------------------------------------------------------------------------------------------


def overlong_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """[N] bool, False for responses cut at the length limit (finish_reason "length"): AND it into their loss mask."""
    return torch.tensor([reason != TRUNCATED_FINISH_REASON for reason in finish_reasons], dtype=torch.bool)


def overlong_penalty(lengths: torch.Tensor | Sequence[int], max_len: int, buffer_len: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, [N] response lengths -> [N] fp32 reward terms in [-penalty, 0].

    0 up to `max_len - buffer_len` tokens, then falling linearly to -penalty at `max_len` (and
    -penalty beyond): -penalty * clamp((L - (max_len - buffer_len)) / buffer_len, 0, 1). Add it to the rewards.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    excess = (lengths - (max_len - buffer_len)) / buffer_len
    return -penalty * excess.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO)
# ----------------------------------------------------------------------------------------------


def filter_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop groups whose rewards are all equal (no learning signal; a group of one counts as such).

    rewards [N], group_ids [N] -> (keep [N] bool, kept group ids [K] sorted ascending).
    """
    rewards = _check_rewards(rewards, group_ids)
    group_list, group_index = torch.unique(group_ids, return_inverse=True)  # [G], [N]
    kept = ~_all_equal_groups(rewards, group_index, group_list.numel())  # [G]
    return kept[group_index], group_list[kept]


def num_prompts_to_draw(num_kept: int, num_drawn: int, target: int, refills_done: int, max_refills: int, max_draw: int) -> int:
    """How many more prompts to roll out so that `target` groups survive `filter_groups`; 0 means stop.

    num_kept / num_drawn: groups kept / prompts drawn so far this step; refills_done: refill rounds
    already run (0 after the first draw). Stops when the target is reached or after `max_refills`
    rounds (the trainer then trains on what it has, and on the first `target` groups if it has more).
    Otherwise draws ceil(missing / kept fraction so far), at most `max_draw`, and `max_draw` while
    no group has been kept yet.
    """
    if min(num_kept, num_drawn, refills_done, max_refills) < 0 or num_kept > num_drawn or target < 1 or max_draw < 1:
        raise ValueError(
            f"invalid dynamic-sampling state: num_kept={num_kept}, num_drawn={num_drawn}, target={target}, "
            f"refills_done={refills_done}, max_refills={max_refills}, max_draw={max_draw}"
        )
    if num_kept >= target or refills_done >= max_refills:
        return 0
    if num_kept == 0:
        return max_draw
    return min(max_draw, -(-(target - num_kept) * num_drawn // num_kept))


# ----------------------------------------------------------------------------------------------
# NaN guard
# ----------------------------------------------------------------------------------------------


def is_finite_update(loss: torch.Tensor | float, grad_norm: torch.Tensor | float) -> bool:
    """True when both the step loss and the total gradient norm are finite; else skip the optimizer step.

    Call after backward and gradient clipping (whose total norm is already global over DP/TP), with
    the DP-reduced loss, so every rank takes the same decision; on False zero the gradients, skip
    `optimizer.step()` and the LR-scheduler step, and log it. One host sync per tensor argument.
    """
    return all(math.isfinite(float(x.detach()) if isinstance(x, torch.Tensor) else x) for x in (loss, grad_norm))
