"""The packed policy update: `optim.mini_batches` x `optim.epochs` optimizer steps over a global batch of scored samples.

`PolicyTrainer.step(samples)` over `rl.sample.Sample`s (prompt and response tokens, the rollout's
logprobs, advantage):

1. takes this DP rank's micro-batches, bin-packed by token count (`optim.micro_batch_tokens`) and
   balanced by tokens across DP ranks by `coordinator.exchange` (which also brought the samples here), and
   splits its samples into `optim.mini_batches` disjoint token-balanced shares (`split_mini_batches`; the
   same split every epoch). Global mini-batch j is every DP rank's share j; a rank whose share is empty
   still joins the update's collectives, with zero gradients;
2. the old-policy logprobs: with more than one optimizer step per RL step (or `algo.rollout_correction=mis`,
   whose rejections change the loss masks that step 3 counts), one forward-only pass over all the step's
   packs before the first update (through `run_micro_batches`, as the reference pass: any PP); otherwise the
   detached logprobs of the update's own forward (equal in value, no extra pass). From that first forward:
   the rollout correction against the rollout's logprobs (`rl.algorithms.rollout_correction`, TIS weights or
   MIS masks) and its diagnostics, and the hidden states of the response tokens for the drafter's buffer
   (so always the pre-update weights' hidden states, as the rollout's);
3. counts the loss normalisers per mini-batch (all-reduced over DP), so the sum of a mini-batch's micro-batch
   losses is exactly the loss of a standalone update on that share (`rl.algorithms.policy_loss`);
4. per mini-batch and epoch, per micro-batch: one packed forward to the final hidden states, chunked
   vocab-parallel logprobs and entropy (`ops.logprob`), PPO-clip loss, backward; then
5. sums gradients over DP, clips by the global norm (TP-sharded parameters counted once per shard),
   and skips the update, logged, if the loss or the norm is not finite;
6. checks the weights after `optimizer.step()`: if any is non-finite on any rank (a finite gradient can
   still overflow, e.g. with a huge lr, or torch refuses the step size as an overflow), the step is
   rolled back to the pre-step weights and AdamW state (kept as a copy for that), logged, and not counted
   as a version. After `optim.max_bad_updates` consecutive skipped or rolled-back updates the run stops
   with `TrainingDiverged` (a UserError: one line at the CLI, exit code 2, the broken state never saved).
   The copy costs the memory of the parameters and the AdamW state once more; `optim.rollback=false`
   saves it and stops the run at the first non-finite update instead. Steps 5-6 run per optimizer step.

The lr schedule and `version` count optimizer steps (Megatron's iterations): the schedule spans
run.steps x mini_batches x epochs of them, its warm-up `optim.warmup_steps` x mini_batches x epochs, so both
keep their meaning in RL steps; `version` grows by the updates applied in an RL step.

Metrics: `loss`, `clip_frac`, `approx_kl`, `entropy`, `kl_ref` are means over the step's optimizer steps,
`grad_norm` their maximum, `lr` the first one's, `optimizer_steps` / `skipped_update` (/ `rolled_back_update`)
counts; the mismatch diagnostics over the step's loss tokens under the pre-update weights, whatever the
correction: `rollout_ratio_mean` / `rollout_ratio_max` of exp(old - rollout), `rollout_kl_k3` (k3 of
KL(rollout || train)), `logprob_gap_rollout` (mean |old - rollout|), and with tis `rollout_truncated_frac` and
`rollout_tis_weight_mean` (the mean of min(ratio, cap)), with mis `rollout_masked_frac`.

    trainer = PolicyTrainer(model, cfg.optim, cfg.algo, ps, total_steps=cfg.run.steps, temperature=1.0)
    batch = exchange_for_update(local_samples, cfg.optim.micro_batch_tokens, ps)
    metrics, hidden = trainer.step(batch.samples, batch.micro_batches, max_response_len=512, collect_hidden=True)
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.data.packing import balance_across_ranks, pack_sequences, unpack
from megatron_tlt.errors import UserError
from megatron_tlt.models.packed import token_logprobs
from megatron_tlt.parallel.collectives import max_over, sum_over
from megatron_tlt.parallel.grads import clip_grads_, global_grad_norm, reduce_grads_
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.algorithms import (
    is_finite_update, loss_normalisers, policy_loss, rollout_correction, sample_ids_from_cu_seqlens,
)
from megatron_tlt.rl.sample import Sample
from megatron_tlt.trainer.optimizer import build_optimizer, restore, snapshot
from megatron_tlt.trainer.schedule import head_chunk, run_micro_batches

log = logging.getLogger(__name__)


def lr_schedule(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr: linear warm-up, then cosine decay to `min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_mini_batches(lengths: list[int], micro_batches: list[list[int]], n: int) -> list[list[list[int]]]:
    """This rank's samples (token counts `lengths`) in `n` disjoint token-balanced mini-batches
    (`data.packing.balance_across_ranks`), each as the non-empty parts of `micro_batches` (index lists into
    the samples) that fall into it: n lists of micro-batches. Deterministic; n = 1: the non-empty micro-batches."""
    group = {i: j for j, g in enumerate(balance_across_ranks(lengths, n)) for i in g}
    return [[part for b in micro_batches if (part := [i for i in b if group[i] == j])] for j in range(n)]


def _rollout_logprobs_at_targets(pb, samples: list[Sample], device) -> torch.Tensor:
    """[T] the rollout's logprob of targets[t] (0 where targets[t] is not a response token)."""
    values = [v for i in pb.example_ids for v in samples[i].at_response_positions(samples[i].rollout_logprobs)]
    return torch.tensor(values, dtype=torch.float32, device=device)


class TrainingDiverged(UserError):
    """`optim.max_bad_updates` consecutive policy updates were skipped or rolled back: the run cannot go on."""


class PolicyTrainer:
    def __init__(self, model, optim: OptimConfig, algo: AlgoConfig, ps: ParallelState, total_steps: int,
                 temperature: float = 1.0, ref_model=None):
        if algo.kl_coef > 0 and ref_model is None:
            raise ValueError("algo.kl_coef > 0 needs a reference model")
        self.model, self.optim_cfg, self.algo, self.ps = model, optim, algo, ps
        self.ref_model = ref_model
        self.temperature = temperature if temperature > 0 else 1.0  # greedy rollouts: logprobs at T=1
        self.optimizer = build_optimizer(model.parameters(), optim, ps)
        # the schedule counts optimizer steps (as Megatron counts iterations): run.steps x mini_batches x epochs in all,
        # the warm-up scaled alike, so both keep their meaning in RL steps
        k = optim.mini_batches * optim.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_schedule(s, total_steps * k, optim.warmup_steps * k, optim.min_lr_ratio)
        )
        self.bad_updates = 0  # consecutive skipped or rolled-back updates

    def _autocast(self):
        if self.ps.device.type == "cuda" and self.optim_cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_only(self, model, packs, head, feature_layers=None) -> None:
        """`head(k, hidden[, features])` on every pack's final hidden states, no gradients, through the update's schedule."""
        def run(k, hidden, *features):
            head(k, hidden, *features)
            return hidden.new_zeros(())

        with torch.no_grad(), self._autocast():
            run_micro_batches(model, packs, run, self.ps, backward=False, feature_layers=feature_layers)

    def _reference_logprobs(self, packs) -> dict[int, torch.Tensor]:
        """The reference policy's logprobs [T_k] per pack (on the last stage)."""
        ref: dict[int, torch.Tensor] = {}
        chunk = head_chunk(self.ref_model)

        def head(k, hidden):
            ref[k] = token_logprobs(chunk, hidden, packs[k].targets, self.temperature)[0]

        self._forward_only(self.ref_model, packs, head)
        return ref

    @property
    def version(self) -> int:
        """The policy's weight version: optimizer updates applied so far (skipped ones do not count)."""
        return self.scheduler.last_epoch

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per RL step: optim.mini_batches x optim.epochs."""
        return self.optim_cfg.mini_batches * self.optim_cfg.epochs

    def step(self, samples: list[Sample], micro_batches: list[list[int]], max_response_len: int, collect_hidden: bool = False,
             feature_layers: Optional[Sequence[int]] = None):
        """`optim.mini_batches` x `optim.epochs` optimizer steps over the step's batch, of which this DP rank trains
        `samples` in `micro_batches` (index lists into samples; `coordinator.exchange.exchange_for_update` plans
        both). Every DP rank calls it and takes the same number of optimizer steps.

        Returns (metrics, hidden) where hidden maps an index into `samples` to the final hidden states
        [R + 1, H] over the sample's `response_window` (only with collect_hidden), from the sample's first
        forward (the pre-update weights): with the tokens of that window they make a drafter example. With
        `feature_layers` (an EAGLE-3 drafter's; any PP) each is [R + 1, 4H]: the final hidden states, then the
        outputs of those layers in the same forward (`drafter.data.from_trainer_output` splits them).
        """
        features_of = feature_layers if collect_hidden else None
        model, dev, algo = self.model, self.ps.device, self.algo
        model.train()
        masks = [[False] * len(s.prompt_ids) + [s.trained] * len(s.response_ids) for s in samples]
        shares = split_mini_batches([len(s.tokens) for s in samples], micro_batches, self.optim_cfg.mini_batches)
        packs = [pack_sequences([samples[i].tokens for i in b], ids=b, train_masks=[masks[i] for i in b])
                 for share in shares for b in share]
        bounds = [0, *itertools.accumulate(len(share) for share in shares)]
        share_packs = [list(range(bounds[j], bounds[j + 1])) for j in range(len(shares))]  # mini-batch -> indices into packs
        ref = self._reference_logprobs(packs) if algo.kl_coef > 0 else {}
        chunk = head_chunk(model)

        # each pack's first forward (the last stage): old-policy logprobs, the rollout correction, its diagnostics, hidden
        old: dict[int, torch.Tensor] = {}  # pack -> [T] detached
        corrected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pack -> (token weights [T], loss mask [T])
        diag = torch.zeros(6, dtype=torch.float64)  # loss tokens, ratio sum, k3 sum, truncated or masked tokens, |gap| sum, weight sum
        diag_max = torch.zeros(1, dtype=torch.float64)  # ratio max
        hidden_out: dict[int, torch.Tensor] = {}

        def first_forward(k: int, hidden: torch.Tensor, lp: torch.Tensor, features: Optional[torch.Tensor] = None) -> None:
            pb = packs[k]
            rollout_lp = _rollout_logprobs_at_targets(pb, samples, dev)
            loss_mask = pb.loss_mask.to(dev)
            weights, mask, m = rollout_correction(
                lp, rollout_lp, loss_mask, sample_ids_from_cu_seqlens(pb.cu_seqlens).to(dev), algo.rollout_correction,
                tis_cap=algo.tis_cap, mis_level=algo.mis_level, mis_low=algo.mis_low, mis_high=algo.mis_high)
            old[k], corrected[k] = lp.detach(), (weights, mask)
            gap = (lp.detach() - rollout_lp).abs().where(loss_mask, 0.0).sum()
            dropped = m["truncated"] + m["masked"]  # the one of the mode (0 for none)
            diag.add_(torch.stack([m["tokens"], m["ratio_sum"], m["kl_k3_sum"], dropped, gap, weights.sum()]).double().cpu())
            diag_max.clamp_(min=float(m["ratio_max"]))
            if collect_hidden:
                rows = hidden.detach() if features is None else torch.cat([hidden.detach(), features.to(hidden.dtype)], dim=-1)
                for i, h in zip(pb.example_ids, unpack(rows, pb.cu_seqlens)):
                    hidden_out[i] = h[samples[i].response_window]

        # the old logprobs from a forward-only pass when the batch takes several updates, or when MIS changes the loss
        # masks (the normalisers count them before the update); else from the update's own forward (equal in value)
        # (decided alike on every pipeline stage: the features widen the activations between stages)
        forward_only = self.updates_per_step > 1 or algo.rollout_correction == "mis"
        if forward_only:
            self._forward_only(model, packs, lambda k, h, *f: first_forward(
                k, h, token_logprobs(chunk, h, packs[k].targets, self.temperature)[0], *f), feature_layers=features_of)
        # the loss normalisers of each mini-batch, over DP (the corrected masks, where known: the last stage uses them)
        norms = torch.zeros(len(shares), 2, dtype=torch.float64)
        for j, ks in enumerate(share_packs):
            for k in ks:
                mask = corrected[k][1].cpu() if k in corrected else packs[k].loss_mask
                norms[j] += loss_normalisers(mask, sample_ids_from_cu_seqlens(packs[k].cu_seqlens))
        norms = sum_over(self.ps.dp_group, norms, dev)

        def head(ks: list[int], norm: torch.Tensor, sums: torch.Tensor, k: int, hidden: torch.Tensor,
                 features: Optional[torch.Tensor] = None) -> torch.Tensor:
            k = ks[k]  # the mini-batch's k-th pack: hidden [T, H] -> its loss
            pb = packs[k]
            lp, ent = token_logprobs(chunk, hidden, pb.targets, self.temperature, compute_entropy=True)
            if k not in old:
                first_forward(k, hidden, lp, features)
            sample_ids = sample_ids_from_cu_seqlens(pb.cu_seqlens).to(dev)
            adv = torch.tensor([samples[i].advantage for i in pb.example_ids], dtype=torch.float32, device=dev)[sample_ids]
            weights, loss_mask = corrected[k]
            loss, m = policy_loss(
                lp, old[k], adv, loss_mask, sample_ids, clip_low=algo.clip_low, clip_high=algo.clip_high,
                dual_clip=algo.dual_clip, aggregation=algo.aggregation, num_global_tokens=norm[0], num_global_seqs=norm[1],
                max_response_len=max_response_len, ref_logprobs=ref.get(k), kl_coef=algo.kl_coef, entropy=ent,
                token_weights=weights if algo.rollout_correction == "tis" else None,
            )
            sums.add_(torch.stack([loss.detach(), m["clip_frac"], m["approx_kl"], m["entropy"],
                                   m.get("kl", torch.zeros_like(loss))]).double().cpu())
            return loss

        lr = self.scheduler.get_last_lr()[0]  # at the step's first update
        updates = []
        for _ in range(self.optim_cfg.epochs):
            for ks, norm in zip(share_packs, norms):
                sums = torch.zeros(5, dtype=torch.float64)  # loss, clip_frac, approx_kl, entropy, kl
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    run_micro_batches(model, [packs[k] for k in ks], functools.partial(head, ks, norm, sums), self.ps,
                                      backward=True, feature_layers=None if forward_only else features_of)
                updates.append(self._apply_update(sums))
        diag, diag_max = sum_over(self.ps.dp_group, diag, dev), max_over(self.ps.dp_group, diag_max, dev)
        if self.ps.pp_size > 1:  # computed on the last stage only
            diag, diag_max = sum_over(self.ps.pp_group, diag, dev), max_over(self.ps.pp_group, diag_max, dev)
        tokens, ratio_sum, k3_sum, dropped, gap, weight_sum = diag.tolist()
        per_token = max(tokens, 1.0)
        # over the updates: the mean loss and token statistics, the largest gradient norm, counts of the outcomes
        metrics = {key: sum(u[key] for u in updates) / len(updates)
                   for key in ("loss", "clip_frac", "approx_kl", "entropy", "kl_ref")}
        metrics.update({
            "grad_norm": max(u["grad_norm"] for u in updates), "lr": lr, "train_tokens": tokens,
            "logprob_gap_rollout": gap / per_token, "rollout_ratio_mean": ratio_sum / per_token,
            "rollout_ratio_max": float(diag_max[0]), "rollout_kl_k3": k3_sum / per_token,
            "optimizer_steps": float(sum(1 for u in updates if not u["skipped_update"])),
            "skipped_update": sum(u["skipped_update"] for u in updates),
        })
        if algo.rollout_correction == "tis":
            metrics.update(rollout_truncated_frac=dropped / per_token, rollout_tis_weight_mean=weight_sum / per_token)
        elif algo.rollout_correction == "mis":
            metrics["rollout_masked_frac"] = dropped / per_token
        if any("rolled_back_update" in u for u in updates):
            metrics["rolled_back_update"] = sum(u.get("rolled_back_update", 0.0) for u in updates)
        return metrics, hidden_out

    def _apply_update(self, sums: torch.Tensor) -> dict[str, float]:
        """After one mini-batch's backward: sum the gradients over DP, clip, step (or skip / roll back a non-finite
        update, see the module docstring), and step the lr schedule. sums: this rank's [5] loss, clip_frac,
        approx_kl, entropy, kl (normalised by the mini-batch's global counts). Returns the update's metrics."""
        model, dev = self.model, self.ps.device
        sums = sum_over(self.ps.dp_group, sums, dev)
        if self.ps.pp_size > 1:  # the metrics are summed on the last stage only
            sums = sum_over(self.ps.pp_group, sums, dev)
        reduce_grads_(model, self.ps)
        grad_norm = float(global_grad_norm(model.parameters(), model.tp_group, self.ps.pp_group))
        loss_value, clip_frac, approx_kl, entropy, kl = sums.tolist()
        lr = self.scheduler.get_last_lr()[0]
        metrics = {"loss": loss_value, "clip_frac": clip_frac, "approx_kl": approx_kl, "entropy": entropy, "kl_ref": kl,
                   "grad_norm": grad_norm, "skipped_update": 0.0}
        if not is_finite_update(loss_value, grad_norm):
            log.warning("non-finite loss (%s) or grad norm (%s): update skipped", loss_value, float(grad_norm))
            return self._reject(metrics, f"non-finite loss ({loss_value}) or grad norm ({grad_norm})")
        clip_grads_(model.parameters(), self.optim_cfg.grad_clip, torch.tensor(grad_norm))
        saved = snapshot(self.optimizer) if self.optim_cfg.rollback else None
        try:
            self.optimizer.step()
            why = None if self._weights_finite() else "non-finite weights after the update"
        except RuntimeError as e:  # torch refuses a step size that overflows the parameter dtype (mid-step)
            if "overflow" not in str(e):
                if saved is not None:
                    restore(self.optimizer, saved)
                raise
            why = f"the update overflowed ({e})"
        if why is not None and saved is None:
            raise TrainingDiverged(f"{why} (lr {lr}) and optim.rollback=false keeps no copy to undo it: stopping. "
                                   "Lower optim.lr or check the data and rewards")
        if why is not None:
            restore(self.optimizer, saved)
            log.warning("%s (lr %s): update rolled back to the pre-step weights and optimizer state", why, lr)
            metrics["rolled_back_update"] = 1.0
            return self._reject(metrics, f"{why} (lr {lr})")
        self.scheduler.step()
        self.bad_updates = 0
        return metrics

    # ---- the non-finite guard ----
    def _reject(self, metrics: dict[str, float], why: str) -> dict[str, float]:
        """An update that was not applied (skipped, or rolled back): `metrics` marked and returned, counted, and
        TrainingDiverged after optim.max_bad_updates of them in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics["skipped_update"] = 1.0
        self.bad_updates += 1
        limit = self.optim_cfg.max_bad_updates
        if self.bad_updates >= limit:
            raise TrainingDiverged(
                f"{self.bad_updates} consecutive policy updates skipped or rolled back (optim.max_bad_updates={limit}); "
                f"last: {why}. Stopping: lower optim.lr or check the data and rewards"
            )
        return metrics

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """Every parameter finite on every rank (TP shards differ; one collective over the world)."""
        bad = torch.zeros(1, dtype=torch.float32, device=self.ps.device)
        for p in self.model.parameters():
            bad += (~torch.isfinite(p)).any().float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return float(bad) == 0.0

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
