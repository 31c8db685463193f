"""Per-token log-probabilities and entropy of the next token, from hidden states, in chunks of tokens.

The RL loss needs `log p(target)` (and often the entropy) for every response token. Materialising
`[T, V]` fp32 logits for that costs T * V * 4 bytes (16k tokens x 152k vocab = 10 GB), twice over
once autograd keeps softmax for backward. This op never holds more than one chunk of logits:

    logprobs, entropy = vocab_parallel_logprobs(hidden, lm_head_weight, targets,
                                                tp_group=ps.tp_group, vocab_size=cfg.vocab_size,
                                                temperature=rollout_temperature)

How it works. Logits are `z = hidden @ weight.T / temperature`, computed chunk by chunk in fp32
(the matmul runs in the input dtype and its result is upcast). Under vocab-parallel tensor
parallelism each TP rank holds rows `[tp_rank * V_local, (tp_rank + 1) * V_local)` of the output
weight; columns with global index >= `vocab_size` are padding and take no probability. The forward
keeps, per token, the rank-local max, sum of exp, sum of exp * z and target logit (relative to the
local max), then merges them across TP with two all-reduces for the whole batch (MAX, then one SUM
over a [3, T] stack), so the number of collectives does not grow with the number of chunks:
    lse = log sum_j exp(z_j),   logprob = z_target - lse,   entropy = lse - sum_j p_j z_j.

Memory. Saved for backward: `hidden` [T, H] and `weight` [V_local, H] (references to the inputs, no
copies), `targets` [T], and per-token fp32 `lse` [T] and `sum_j p_j z_j` [T] (the latter only with
entropy): O(T) beyond the inputs. Backward recomputes each chunk's logits and forms
    d/dz_j = g_logprob * (onehot_j - p_j) - g_entropy * p_j * (z_j - sum_k p_k z_k),
divided by the temperature, so the peak transient is ~3 * chunk_size * V_local fp32 values, plus
an fp32 [V_local, H] accumulator for the weight gradient when the weight is not fp32. Backward needs
no collective of its own: `lse` and `sum p z` are already global, each rank's weight gradient is its
own shard's, and the partial hidden gradients are summed across TP by megatron-core's
`copy_to_tensor_model_parallel_region`, applied to `hidden` before the op.

Targets at positions you don't care about may hold any value below `vocab_size` (including negative
ignore indices such as -100): their logprob is then meaningless but finite, and mask it in the loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, compute_dtype: torch.dtype) -> torch.Tensor:
    """hidden: [c, H], weight: [V, H] -> z: [c, V] in `compute_dtype`."""
    return (hidden @ weight.t()).to(compute_dtype) / temperature


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, vocab_start, n_valid, chunk_size, temperature, compute_entropy):
        # hidden: [T, H]; weight: [V_local, H]; targets: [T] global ids; rows >= n_valid of weight are padding.
        ctx.set_materialize_grads(False)
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        num_tokens = hidden.shape[0]
        valid_weight = weight[:n_valid]  # [V_valid, H]
        local_target = targets - vocab_start  # [T]
        in_shard = (local_target >= 0) & (local_target < n_valid)  # [T]
        gather_index = local_target.clamp(0, max(n_valid - 1, 0))  # [T]

        # Rank-local statistics, relative to the rank-local max.
        local_max = torch.full((num_tokens,), float("-inf"), dtype=compute_dtype, device=hidden.device)  # [T]
        sums = torch.zeros(3, num_tokens, dtype=compute_dtype, device=hidden.device)  # [3, T]: sum exp, sum exp*z, z_target
        if n_valid > 0:
            for start in range(0, num_tokens, chunk_size):
                end = min(start + chunk_size, num_tokens)
                z = _chunk_logits(hidden[start:end], valid_weight, temperature, compute_dtype)  # [c, V_valid]
                chunk_max = z.amax(dim=-1)  # [c]
                local_max[start:end] = chunk_max
                z_target = z.gather(1, gather_index[start:end, None]).squeeze(1)  # [c]
                sums[2, start:end] = torch.where(in_shard[start:end], z_target, 0.0)
                exp_z = (z - chunk_max[:, None]).exp_()  # [c, V_valid]
                sums[0, start:end] = exp_z.sum(dim=-1)
                if compute_entropy:
                    sums[1, start:end] = (exp_z * z).sum(dim=-1)

        # Merge across TP: rescale each rank's sums from its own max to the global max.
        global_max = local_max.clone()  # [T]
        if tp_group is not None:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        sums[:2] *= (local_max - global_max).exp()  # exp(-inf) = 0 for ranks with no valid column
        if tp_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, sum_exp_z, target_logit = sums  # [T] each

        lse = global_max + sum_exp.log()  # [T]
        logprobs = target_logit - lse  # [T]
        entropy = sum_p_z = None
        if compute_entropy:
            sum_p_z = sum_exp_z / sum_exp  # [T]
            entropy = lse - sum_p_z  # [T]

        ctx.save_for_backward(hidden, weight, targets, lse, sum_p_z)
        ctx.vocab_start, ctx.n_valid, ctx.chunk_size, ctx.temperature = vocab_start, n_valid, chunk_size, temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        # grad_logprobs, grad_entropy: [T] or None (None = that output was not used).
        hidden, weight, targets, lse, sum_p_z = ctx.saved_tensors
        n_valid, chunk_size, temperature = ctx.n_valid, ctx.chunk_size, ctx.temperature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_dtype = lse.dtype
        num_tokens = hidden.shape[0]

        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [T, H]
        grad_weight_acc = None
        if need_weight:  # [V_local, H], accumulated over chunks in (at least) fp32; padding rows stay zero
            acc_dtype = torch.promote_types(weight.dtype, torch.float32)
            grad_weight_acc = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        if (grad_logprobs is None and grad_entropy is None) or n_valid == 0:
            grad_weight = None if grad_weight_acc is None else grad_weight_acc.to(weight.dtype)
            return grad_hidden, grad_weight, None, None, None, None, None, None, None

        valid_weight = weight[:n_valid]  # [V_valid, H]
        local_target = targets - ctx.vocab_start  # [T]
        in_shard = (local_target >= 0) & (local_target < n_valid)  # [T]
        gather_index = local_target.clamp(0, n_valid - 1)  # [T]
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            h = hidden[start:end]  # [c, H]
            z = _chunk_logits(h, valid_weight, temperature, compute_dtype)  # [c, V_valid]
            p = (z - lse[start:end, None]).exp_()  # [c, V_valid]
            # coef = g_lp + g_ent * (z - sum_k p_k z_k); grad_z = onehot * g_lp - p * coef
            if grad_entropy is not None:
                coef = z.sub_(sum_p_z[start:end, None]).mul_(grad_entropy[start:end, None])  # [c, V_valid], reuses z
                if grad_logprobs is not None:
                    coef.add_(grad_logprobs[start:end, None])
            else:
                coef = grad_logprobs[start:end, None]  # [c, 1]
            grad_z = p.mul_(coef).neg_()  # [c, V_valid], reuses p
            if grad_logprobs is not None:
                onehot_grad = torch.where(in_shard[start:end], grad_logprobs[start:end], 0.0).to(compute_dtype)  # [c]
                grad_z.scatter_add_(1, gather_index[start:end, None], onehot_grad[:, None])
            grad_y = grad_z.div_(temperature).to(hidden.dtype)  # [c, V_valid], d loss / d (hidden @ weight.T)
            if need_hidden:
                grad_hidden[start:end] = grad_y @ valid_weight  # [c, H]
            if need_weight:
                grad_weight_acc[:n_valid] += grad_y.t() @ h  # [V_valid, H]
        grad_weight = None if grad_weight_acc is None else grad_weight_acc.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    compute_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of `targets` and entropy of the next-token distribution, chunked over tokens.

    hidden: [T, H] (replicated across TP); weight: [V_local, H] (this TP rank's rows of the LM head);
    targets: [T] int64 global ids, all < `vocab_size`. Returns (logprobs [T], entropy [T] or None),
    fp32 (fp64 for fp64 inputs). Differentiable w.r.t. `hidden` and `weight`; gradients come back in
    their dtypes. `vocab_size` defaults to V_local * tp_size (no padding columns).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V_local, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [T] with T={hidden.shape[0]}, got {tuple(targets.shape)}")
    if chunk_size < 1 or not temperature > 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_vocab = weight.shape[0]
    padded_vocab = local_vocab * tp_size
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {padded_vocab}] (V_local={local_vocab} x tp_size={tp_size})")
    if targets.numel() > 0:
        max_target = int(targets.max())  # one host sync per call
        if max_target >= vocab_size:
            raise ValueError(f"target id {max_target} is out of range for vocab_size={vocab_size}")

    vocab_start = tp_rank * local_vocab
    n_valid = min(max(vocab_size - vocab_start, 0), local_vocab)  # rows of this shard that are real tokens
    if tp_size > 1:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region  # slow import: only under TP

        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)  # identity fwd, all-reduce grad bwd
    else:
        tp_group = None
    return _VocabParallelLogprobs.apply(
        hidden, weight, targets, tp_group, vocab_start, n_valid, chunk_size, float(temperature), compute_entropy
    )
