"""Before RL: a supervised warm-up of the policy on the synthetic task's worked solutions (`run.sft_steps`),
then an offline warm-up of the drafter on the policy's own samples (`drafter.warmup_steps`).

    warm_up(cfg, model, weights, drafter, engine, tokenizer, train_ds, ps)   # weights: coordinator.reshard.RolloutWeights
"""
from __future__ import annotations

import logging

from megatron_tlt.config.schema import Config
from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.data.synthetic import get_task
from megatron_tlt.data.tokenizer import encode_prompt
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.seeds import derive_seed
from megatron_tlt.step.setup import sampling_params
from megatron_tlt.trainer.sft import supervised_warmup

log = logging.getLogger(__name__)


def warm_up(cfg: Config, model, weights, drafter, engine, tokenizer, train_ds: PromptDataset, ps: ParallelState) -> None:
    """The policy's SFT in the training layout (`ps`), then the drafter's in the rollout layout."""
    if cfg.run.sft_steps > 0:
        seqs, masks = _task_solutions(cfg, tokenizer)
        losses = supervised_warmup(model, seqs, masks, ps, steps=cfg.run.sft_steps, lr=cfg.run.sft_lr, batch_size=cfg.run.sft_batch,
                                   micro_batch_tokens=cfg.optim.micro_batch_tokens, grad_clip=cfg.optim.grad_clip, seed=cfg.run.seed,
                                   distributed=cfg.optim.distributed)
        if ps.is_main:
            log.info("supervised warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    if drafter is not None and cfg.drafter.warmup_steps > 0:
        from megatron_tlt.drafter.trainer import train_drafter_offline

        prompts = [train_ds[i].prompt_ids for i in range(min(cfg.drafter.warmup_prompts, len(train_ds)))]
        params = sampling_params(cfg.rollout, tokenizer, derive_seed(cfg.run.seed, "drafter_warmup"))
        params.n = 1
        last = {}
        with weights.acquired(version=0) as rollout_model:
            seqs = [p + cs[0].token_ids for p, cs in zip(prompts, engine.generate(prompts, params))]
            train_drafter_offline(rollout_model, seqs, cfg.drafter.warmup_steps, lr=cfg.drafter.lr, drafter=drafter, seed=cfg.run.seed,
                                  max_tokens_per_micro_batch=cfg.drafter.micro_batch_tokens, on_step=lambda i, m: last.update(m),
                                  ttt_steps=cfg.drafter.ttt_steps, ttt_hidden_weight=cfg.drafter.ttt_hidden_weight)
        if ps.is_main:
            log.info("drafter warm-up: %d steps on %d policy samples, top-1 agreement %.2f", cfg.drafter.warmup_steps,
                     len(seqs), last.get("top1", float("nan")))


def _task_solutions(cfg: Config, tokenizer) -> tuple[list[list[int]], list[list[bool]]]:
    """(prompt + solution + eos tokens, train mask: True on the solution and eos) of the synthetic task's examples."""
    examples = get_task(cfg.data.task)(cfg.data.num_examples, cfg.run.seed, **cfg.data.task_args)
    seqs, masks = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt, apply_chat_template=cfg.data.apply_chat_template)
        response = tokenizer.encode(ex.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        masks.append([False] * len(prompt) + [True] * len(response))
    return seqs, masks
