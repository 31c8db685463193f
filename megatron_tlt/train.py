"""`megatron-tlt train CONFIG.yaml [key=value ...]`: GRPO-family RL, colocated rollout and training, TLT.

One RL step: rollout -> rewards -> advantages -> packed policy update, then log and checkpoint. The
rollout engine and the trainer share the policy module (and so its weights): no weight sync is
needed. Under torchrun each DP rank rolls out its share of the step's prompts; the scored samples
are gathered so every rank sees the global batch, which the trainer splits into token-balanced
micro-batches again.

TLT (`rollout.spec` != off with `drafter.online`): a rank whose rollout is done trains the drafter on
its buffer of (tokens, target hidden states) while slower ranks still generate, stops within one
drafter step when the last rank finishes, and the drafters are merged so every rank starts the next
rollout with identical weights. The buffer is filled from the policy update's own forward.
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
from megatron_tlt.trainer.policy import PolicyTrainer

log = logging.getLogger(__name__)


def train(cfg: Config) -> Path:
    ps = init_parallel(cfg.parallel)
    set_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tok_dir = P.build_tokenizer(cfg, run_dir, ps)
    model = P.build_policy(cfg, ps)
    if ps.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_ds, eval_ds = P.build_datasets(cfg, tokenizer)
    sampler = PromptSampler(len(train_ds), seed=cfg.run.seed)
    engine, drafter = P.build_engine(cfg, model, ps)
    tlt = P.build_tlt(cfg, drafter, ps)  # None unless the drafter is trained online
    reward_fn = build_reward_fn([{"name": r.name, "weight": r.weight} for r in cfg.reward.fns])
    trainer = PolicyTrainer(model, cfg.optim, cfg.algo, ps, total_steps=cfg.run.steps, temperature=cfg.rollout.temperature,
                            ref_model=P.frozen_copy(model) if cfg.algo.kl_coef > 0 else None)

    start = 0
    resume_from = P.latest_checkpoint(run_dir) if cfg.run.resume else None
    if resume_from is not None:
        start = P.load_run_checkpoint(resume_from, model, trainer, sampler, drafter, tlt and tlt.trainer)
        log.info("resumed from %s after %d steps", resume_from, start)
    else:
        P.warm_up(cfg, model, drafter, engine, tokenizer, train_ds, ps)

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
            tally, samples = P.StepTally(), []
            # 1. rollout, 2. rewards (dynamic sampling draws more prompts while groups carry no signal)
            for refill in range(1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)):
                want = cfg.run.prompts_per_step - len({s.group for s in samples})
                if want <= 0:
                    break
                ids = sampler.take(want)  # the same draw on every rank; each rolls out its share
                prompts = {tally.drawn + k: train_ds[i] for k, i in enumerate(ids) if k % ps.dp_size == ps.dp_rank}
                params = P.sampling_params(cfg.rollout, tokenizer, P.step_seed(cfg.run.seed, step * 1000 + refill))
                mine = tally.timed("rollout_time_s", P.rollout, engine, prompts, params)
                tally.add_engine(engine.stats)
                mine, reward_stats = tally.timed("reward_time_s", P.score, mine, prompts, pool, tokenizer)
                tally.add_rewards(reward_stats)
                if tlt is not None:  # this rank is done: train the drafter until the slowest rank is too
                    tlt.spot_train(step * 1000 + refill)
                new = P.gather_samples(mine, ps)
                tally.drawn += want
                samples += P.drop_equal_reward_groups(new) if cfg.algo.dynamic_sampling else new
            if tlt is not None:
                tally.metrics.update(tlt.merge())
            # 3. advantages, 4. packed policy update (weights are shared with the engine)
            samples, advantage_metrics = P.assign_advantages(samples, cfg.algo, cfg.rollout.max_new_tokens)
            tally.metrics.update(advantage_metrics)
            if samples:
                train_metrics, hidden = tally.timed("train_time_s", trainer.step, samples, cfg.rollout.max_new_tokens,
                                                    collect_hidden=tlt is not None)
                tally.metrics.update(train_metrics)
                if tlt is not None:  # the update's own forward fills the drafter's buffer
                    tlt.add_to_buffer(step, samples, hidden)
            # 5. log and checkpoint
            lengths = [len(s.response_ids) for s in samples]
            step_s = time.perf_counter() - t0
            metrics = {
                "reward_mean": sum(s.reward for s in samples) / max(len(samples), 1), **length_stats(lengths),
                "step_time_s": step_s, "tokens_per_s": sum(lengths) / step_s, "num_samples": len(samples),
                **tally.summary(drafter is not None),
            }
            # the rollout's critical path: the slowest rank's (rollout_time_s is this rank's)
            metrics["rollout_time_max_s"] = P.max_over_dp(metrics["rollout_time_s"], ps)
            done = step + 1
            if done == cfg.run.steps or (cfg.run.eval_every and done % cfg.run.eval_every == 0):
                metrics["eval_accuracy"] = last_accuracy = held_out()
            logger.log(step, metrics, response_lengths=lengths)
            if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.steps:
                P.save_run_checkpoint(run_dir, done, model, trainer, sampler, tok_dir, cfg, drafter, tlt and tlt.trainer)
    if ps.is_main:
        print(f"[train] held-out accuracy after RL: {100 * last_accuracy:.1f}% (before: {100 * first_accuracy:.1f}%)", flush=True)
        print(f"[train] run directory: {run_dir.resolve()}", flush=True)
    return run_dir
