"""The packed policy update: one optimizer step over a global batch of scored samples.

`PolicyTrainer.step(samples)` over `rl.sample.Sample`s (prompt and response tokens, the rollout's
logprobs, advantage):

1. takes this DP rank's micro-batches, bin-packed by token count (`optim.micro_batch_tokens`) and
   balanced by tokens across DP ranks by `coordinator.exchange` (which also brought the samples here);
2. counts the loss normalisers over the whole step (all-reduced over DP), so the sum of the
   micro-batch losses is exactly the full-batch loss (`rl.algorithms.policy_loss`);
3. per micro-batch: one packed forward to the final hidden states, chunked vocab-parallel logprobs
   and entropy (`ops.logprob`), PPO-clip loss, backward. The hidden states of the response tokens
   come back for the drafter's buffer from this same forward (no second pass);
4. sums gradients over DP, clips by the global norm (TP-sharded parameters counted once per shard),
   and skips the update, logged, if the loss or the norm is not finite;
5. checks the weights after `optimizer.step()`: if any is non-finite on any rank (a finite gradient can
   still overflow, e.g. with a huge lr, or torch refuses the step size as an overflow), the step is
   rolled back to the pre-step weights and AdamW state (kept as a copy for that), logged, and not counted
   as a version. After `optim.max_bad_updates` consecutive skipped or rolled-back updates the run stops
   with `TrainingDiverged` (a UserError: one line at the CLI, exit code 2, the broken state never saved).
   The copy costs the memory of the parameters and the AdamW state once more; `optim.rollback=false`
   saves it and stops the run at the first non-finite update instead.

On-policy with one optimizer step per RL step, the "old" logprobs equal the current ones, so they are
taken detached from the same forward (ratio 1 in value, the PPO gradient intact); the gap to the
rollout's own logprobs is reported as `logprob_gap_rollout` (a check of rollout/trainer numerics).

    trainer = PolicyTrainer(model, cfg.optim, cfg.algo, ps, total_steps=cfg.run.steps, temperature=1.0)
    batch = exchange_for_update(local_samples, cfg.optim.micro_batch_tokens, ps)
    metrics, hidden = trainer.step(batch.samples, batch.micro_batches, max_response_len=512, collect_hidden=True)
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist

from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.data.packing import pack_sequences, unpack
from megatron_tlt.errors import UserError
from megatron_tlt.models.packed import token_logprobs
from megatron_tlt.parallel.collectives import sum_over
from megatron_tlt.parallel.grads import clip_grads_, global_grad_norm, reduce_grads_
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.algorithms import is_finite_update, loss_normalisers, policy_loss, sample_ids_from_cu_seqlens
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_schedule(s, total_steps, optim.warmup_steps, optim.min_lr_ratio)
        )
        self.bad_updates = 0  # consecutive skipped or rolled-back updates

    def _autocast(self):
        if self.ps.device.type == "cuda" and self.optim_cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reference_logprobs(self, packs) -> dict[int, torch.Tensor]:
        """The reference policy's logprobs per pack (on the last stage), forward only, through the same schedule."""
        ref: dict[int, torch.Tensor] = {}
        chunk = head_chunk(self.ref_model)

        def head(k, hidden):
            ref[k] = token_logprobs(chunk, hidden, packs[k].targets, self.temperature)[0]
            return ref[k].sum()

        with torch.no_grad(), self._autocast():
            run_micro_batches(self.ref_model, packs, head, self.ps, backward=False)
        return ref

    @property
    def version(self) -> int:
        """The policy's weight version: optimizer updates applied so far (skipped ones do not count)."""
        return self.scheduler.last_epoch

    def step(self, samples: list[Sample], micro_batches: list[list[int]], max_response_len: int, collect_hidden: bool = False):
        """One optimizer step over the step's batch, of which this DP rank trains `samples` in `micro_batches`
        (index lists into samples; `coordinator.exchange.exchange_for_update` plans both). Every DP rank calls it.

        Returns (metrics, hidden) where hidden maps an index into `samples` to the final hidden states
        [R + 1, H] over the sample's `response_window` (only with collect_hidden): with the tokens of that
        window they make a drafter example.
        """
        model, dev = self.model, self.ps.device
        model.train()
        masks = [[False] * len(s.prompt_ids) + [s.trained] * len(s.response_ids) for s in samples]
        packs = [pack_sequences([samples[i].tokens for i in b], ids=b, train_masks=[masks[i] for i in b]) for b in micro_batches]

        norms = torch.zeros(2, dtype=torch.float64)
        for pb in packs:
            norms += loss_normalisers(pb.loss_mask, sample_ids_from_cu_seqlens(pb.cu_seqlens)).cpu()
        norms = sum_over(self.ps.dp_group, norms, dev)

        ref = self._reference_logprobs(packs) if self.algo.kl_coef > 0 else {}
        sums = torch.zeros(6, dtype=torch.float64)  # loss, clip_frac, approx_kl, entropy, kl, rollout gap
        hidden_out: dict[int, torch.Tensor] = {}
        chunk = head_chunk(model)

        def head(k: int, hidden: torch.Tensor) -> torch.Tensor:  # the last stage: pack k's final hidden [T, H] -> its loss
            nonlocal sums
            pb = packs[k]
            lp, ent = token_logprobs(chunk, hidden, pb.targets, self.temperature, compute_entropy=True)
            sample_ids = sample_ids_from_cu_seqlens(pb.cu_seqlens).to(dev)
            adv = torch.tensor([samples[i].advantage for i in pb.example_ids], dtype=torch.float32, device=dev)[sample_ids]
            loss_mask = pb.loss_mask.to(dev)
            loss, m = policy_loss(
                lp, lp.detach(), adv, loss_mask, sample_ids, clip_low=self.algo.clip_low, clip_high=self.algo.clip_high,
                dual_clip=self.algo.dual_clip,
                aggregation=self.algo.aggregation, num_global_tokens=norms[0], num_global_seqs=norms[1],
                max_response_len=max_response_len, ref_logprobs=ref.get(k), kl_coef=self.algo.kl_coef, entropy=ent,
            )
            gap = (lp.detach() - _rollout_logprobs_at_targets(pb, samples, dev)).abs().where(loss_mask, 0.0).sum()
            sums += torch.stack([loss.detach().double().cpu(), m["clip_frac"].double().cpu(), m["approx_kl"].double().cpu(),
                                 m["entropy"].double().cpu(), m.get("kl", torch.zeros(())).double().cpu(), gap.double().cpu()])
            if collect_hidden:
                for i, h in zip(pb.example_ids, unpack(hidden.detach(), pb.cu_seqlens)):
                    hidden_out[i] = h[samples[i].response_window]
            return loss

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            run_micro_batches(model, packs, head, self.ps, backward=True)
        sums = sum_over(self.ps.dp_group, sums, dev)
        if self.ps.pp_size > 1:  # the metrics are summed on the last stage only
            sums = sum_over(self.ps.pp_group, sums, dev)
        reduce_grads_(model, self.ps)
        grad_norm = float(global_grad_norm(model.parameters(), model.tp_group, self.ps.pp_group))
        loss_value = float(sums[0])
        metrics = {
            "loss": loss_value, "clip_frac": float(sums[1]), "approx_kl": float(sums[2]), "entropy": float(sums[3]),
            "kl_ref": float(sums[4]), "logprob_gap_rollout": float(sums[5] / max(float(norms[0]), 1.0)), "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0], "train_tokens": float(norms[0]), "skipped_update": 0.0,
        }
        if not is_finite_update(loss_value, grad_norm):
            log.warning("non-finite loss (%s) or grad norm (%s): update skipped", loss_value, float(grad_norm))
            return self._reject(metrics, f"non-finite loss ({loss_value}) or grad norm ({grad_norm})"), hidden_out
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
            raise TrainingDiverged(f"{why} (lr {metrics['lr']}) and optim.rollback=false keeps no copy to undo it: stopping. "
                                   "Lower optim.lr or check the data and rewards")
        if why is not None:
            restore(self.optimizer, saved)
            log.warning("%s (lr %s): update rolled back to the pre-step weights and optimizer state", why, metrics["lr"])
            metrics["rolled_back_update"] = 1.0
            return self._reject(metrics, f"{why} (lr {metrics['lr']})"), hidden_out
        self.scheduler.step()
        self.bad_updates = 0
        return metrics, hidden_out

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
