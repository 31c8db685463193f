"""`megatron-tlt train CONFIG.yaml [key=value ...]`: GRPO-family RL, colocated rollout and training.

One RL step: rollout -> rewards -> advantages -> packed policy update, then log and checkpoint. The
rollout engine and the trainer share the policy module (and so its weights): no weight sync is
needed. Under torchrun each DP rank rolls out its share of the step's prompts; the scored samples
are gathered so every rank sees the global batch, which the trainer splits into token-balanced
micro-batches again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_tlt import pipeline as P
from megatron_tlt.config import Config, to_yaml
from megatron_tlt.data.datasets import PromptSampler
from megatron_tlt.metrics import MetricsLogger, length_stats
from megatron_tlt.parallel import init_parallel, set_seed
from megatron_tlt.rl.rewards import RewardPool, build_reward_fn
from megatron_tlt.rl.trainer import PolicyTrainer

log = logging.getLogger(__name__)


def train(cfg: Config) -> Path:
    ps = init_parallel(cfg.parallel)
    set_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tok_dir = P.build_tokenizer(cfg, run_dir)
    model = P.build_policy(cfg, ps)
    if ps.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_ds, eval_ds = P.build_datasets(cfg, tokenizer)
    sampler = PromptSampler(len(train_ds), seed=cfg.run.seed)
    engine, drafter = P.build_engine(cfg, model, ps)
    reward_fn = build_reward_fn([{"name": r.name, "weight": r.weight} for r in cfg.reward.fns])
    trainer = PolicyTrainer(model, cfg.optim, cfg.algo, ps, total_steps=cfg.run.steps, temperature=cfg.rollout.temperature,
                            ref_model=P.frozen_copy(model) if cfg.algo.kl_coef > 0 else None)

    start = 0
    resume_from = P.latest_checkpoint(run_dir) if cfg.run.resume else None
    if resume_from is not None:
        start = P.load_run_checkpoint(resume_from, model, trainer, sampler, drafter)
        log.info("resumed from %s after %d steps", resume_from, start)
    elif cfg.run.sft_steps > 0:
        losses = P.sft_warmup(model, tokenizer, cfg, ps)
        if ps.is_main:
                log.info("supervised warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])

    def held_out() -> float:
        return P.evaluate(engine, eval_ds, reward_fn, tokenizer, cfg.rollout.max_new_tokens, ps)

    first_accuracy = last_accuracy = held_out()
    if ps.is_main:
        print(f"[train] held-out accuracy before RL: {100 * first_accuracy:.1f}%", flush=True)
    with RewardPool(reward_fn, cfg.reward.num_workers, cfg.reward.timeout_s) as pool, MetricsLogger(
        run_dir, cfg.run.steps, start, enabled=ps.is_main, tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project
    ) as logger:
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            # 1. rollout (dynamic sampling draws more prompts while groups carry no signal)
            samples, rollout_s, reward_s, drawn, failed, timed_out, accepted, spec_row_steps = [], 0.0, 0.0, 0, 0, 0, 0, 0
            for refill in range(1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)):
                want = cfg.run.prompts_per_step - len({s.group for s in samples})
                if want <= 0:
                    break
                ids = sampler.take(want)  # the same draw on every rank; each rolls out its share
                prompts = {drawn + k: train_ds[i] for k, i in enumerate(ids) if k % ps.dp_size == ps.dp_rank}
                t = time.perf_counter()
                params = P.sampling_params(cfg.rollout, tokenizer, P.step_seed(cfg.run.seed, step * 1000 + refill))
                mine = P.rollout(engine, prompts, params)
                rollout_s += time.perf_counter() - t
                accepted += engine.stats.accepted_drafts
                spec_row_steps += engine.stats.spec_row_steps
                # 2. rewards
                t = time.perf_counter()
                stats = P.score(mine, prompts, pool, tokenizer)
                reward_s += time.perf_counter() - t
                failed, timed_out = failed + stats.num_errors, timed_out + stats.num_timeouts
                new = P.gather_samples(mine, ps)
                drawn += want
                samples += P.drop_equal_reward_groups(new) if cfg.algo.dynamic_sampling else new
            # 3. advantages, 4. packed policy update (weights are shared with the engine)
            extra = P.assign_advantages(samples, cfg.algo, cfg.rollout.max_new_tokens)
            t = time.perf_counter()
            train_metrics, _ = trainer.step(samples, max_response_len=cfg.rollout.max_new_tokens) if samples else ({}, None)
            train_s = time.perf_counter() - t
            # 5. log and checkpoint
            lengths = [len(s.response_ids) for s in samples]
            step_s = time.perf_counter() - t0
            metrics = {
                "reward_mean": sum(s.reward for s in samples) / max(len(samples), 1), **length_stats(lengths),
                "rollout_time_s": rollout_s, "reward_time_s": reward_s, "train_time_s": train_s, "step_time_s": step_s,
                "tokens_per_s": sum(lengths) / step_s, "num_samples": len(samples), "prompts_drawn": drawn,
                "reward_errors": failed, "reward_timeouts": timed_out, **extra, **train_metrics,
            }
            if drafter is not None:
                metrics["accept_len"] = accepted / max(spec_row_steps, 1)
                metrics["spec_row_steps"] = spec_row_steps
            done = step + 1
            if done == cfg.run.steps or (cfg.run.eval_every and done % cfg.run.eval_every == 0):
                metrics["eval_accuracy"] = last_accuracy = held_out()
            logger.log(step, metrics, response_lengths=lengths)
            if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.steps:
                P.save_run_checkpoint(run_dir, done, model, trainer, sampler, tok_dir, cfg, drafter)
    if ps.is_main:
        print(f"[train] held-out accuracy after RL: {100 * last_accuracy:.1f}% (before: {100 * first_accuracy:.1f}%)", flush=True)
        print(f"[train] run directory: {run_dir.resolve()}", flush=True)
    return run_dir
