"""`megatron-tlt train CONFIG.yaml [key=value ...]`: GRPO-family RL, colocated rollout and training, TLT.

One RL step: rollout -> rewards -> advantages -> packed policy update, then log and checkpoint. The
rollout engine and the trainer share the policy module (and so its weights): no weight sync is
needed. Under torchrun each DP rank rolls out its share of the step's prompts and keeps their groups:
rewards and advantages are computed where a group lives, and `coordinator.exchange` balances the update's
micro-batches by tokens, moving a sample to another rank only when the balance needs it.

TLT (`rollout.spec` != off with `drafter.online`, `step/tlt.py`): a rank whose rollout is done trains
the drafter on its buffer of (tokens, target hidden states) while slower ranks still generate, stops
within one drafter step when the last rank finishes, and the drafters are merged so every rank starts
the next rollout with identical weights. The buffer is filled from the policy update's own forward.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_tlt.config import Config, to_yaml
from megatron_tlt.coordinator.assignment import RolloutId, RolloutScheduler
from megatron_tlt.coordinator.exchange import exchange_for_update, return_hidden
from megatron_tlt.data.datasets import PromptSampler
from megatron_tlt.data.tokenizer import TOKENIZER_FILES
from megatron_tlt.metrics import MetricsLogger, RolloutLog, TimelineLog
from megatron_tlt.parallel import init_parallel, set_seed
from megatron_tlt.rl.rewards import RewardPool, build_reward_fn
from megatron_tlt.step.checkpointing import RunState, open_run_dir
from megatron_tlt.step.evaluate import evaluate
from megatron_tlt.step.setup import (
    build_datasets, build_engine, build_policy, build_rollout_weights, build_tokenizer, frozen_copy, sampling_params,
)
from megatron_tlt.step.stages import StepTally, assign_advantages, drop_equal_reward_groups, num_groups, rollout, score, step_metrics
from megatron_tlt.step.tlt import build_drafter_training
from megatron_tlt.step.warmup import warm_up
from megatron_tlt.trainer.policy import PolicyTrainer

log = logging.getLogger(__name__)


def train(cfg: Config) -> Path:
    ps = init_parallel(cfg.parallel, cfg.rollout.tensor_parallel_size)
    rps = ps.rollout  # the rollout layout: rollout, rewards, advantages and TLT run here (`ps` itself when layouts agree)
    set_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # run.resume / run.overwrite: the checkpoint to continue from, or None (refuses another run's directory)
    resume_from = open_run_dir(run_dir, cfg.run.resume, cfg.run.overwrite, cfg.run.steps)
    tokenizer, tok_dir = build_tokenizer(cfg, run_dir, ps)
    model = build_policy(cfg, ps)  # the training layout: this rank's TP shard of its pipeline stage
    weights = build_rollout_weights(cfg, model, ps)  # the rollout layout's copy (the policy itself when layouts agree)
    if ps.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    train_ds, eval_ds = build_datasets(cfg, tokenizer)
    sampler = PromptSampler(len(train_ds), seed=cfg.run.seed)
    engine, drafter = build_engine(cfg, weights.model, rps)
    weights.engine = engine
    tlt = build_drafter_training(cfg, drafter, rps)  # does nothing unless the drafter is trained online
    # which rollout replica runs which prompt group, in which order (coordinator.*: round-robin in order by default)
    scheduler = RolloutScheduler(cfg.coordinator, rps, slots=engine.num_slots, n=cfg.rollout.n,
                                 default_length=cfg.rollout.max_new_tokens / 2)
    reward_fn = build_reward_fn([{"name": r.name, "weight": r.weight} for r in cfg.reward.fns])
    trainer = PolicyTrainer(model, cfg.optim, cfg.algo, ps, total_steps=cfg.run.steps, temperature=cfg.rollout.temperature,
                            ref_model=frozen_copy(model) if cfg.algo.kl_coef > 0 else None)
    state = RunState(model, trainer, sampler, drafter, tlt.drafter_trainer, scheduler)
    tokenizer_files = {f: tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()}

    start = 0
    if resume_from is not None:
        start = state.load(resume_from, verify=False)  # open_run_dir verified it
        log.info("resumed from %s after %d steps%s", resume_from, start,
                 " (the run is already complete)" if start == cfg.run.steps else "")
    else:
        warm_up(cfg, model, weights, drafter, engine, tokenizer, train_ds, ps)

    def held_out() -> float:  # scored by the pool: the rollouts' reward timeout and accounting
        with weights.acquired(trainer.version):
            return evaluate(engine, eval_ds, pool, tokenizer, cfg.rollout.max_new_tokens, rps)

    pool = RewardPool(reward_fn, cfg.reward.num_workers, cfg.reward.timeout_s)  # before the first evaluation
    try:
        first_accuracy = last_accuracy = held_out()
    except BaseException:
        pool.close()
        raise
    if ps.is_main:
        print(f"[train] held-out accuracy before RL: {100 * first_accuracy:.1f}%", flush=True)
    with pool, MetricsLogger(
        run_dir, cfg.run.steps, start, enabled=ps.is_main, tensorboard=cfg.run.tensorboard, wandb_project=cfg.run.wandb_project
    ) as logger:
        rollout_log = RolloutLog(run_dir, rps.dp_rank, start, enabled=cfg.run.save_rollouts and rps.tp_rank == 0)
        timeline = TimelineLog(run_dir, rps.dp_rank, start, enabled=rps.tp_rank == 0)  # RUN_DIR/timeline/rank{R}.jsonl
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            timeline.start(t0)  # the spans below: where this rank's step time went
            tally, samples = StepTally(), []
            # 1. rollout, 2. rewards (dynamic sampling draws more prompts while groups carry no signal)
            with weights.acquired(trainer.version):  # training layout -> rollout layout (when they differ)
                tally.metrics.update(weights.last)
                for round_ in range(1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)):
                    want = cfg.run.prompts_per_step - num_groups(samples, rps)
                    if want <= 0:
                        break
                    rid = RolloutId(step, round_)
                    # the same draw on every rank; each rollout replica rolls out its share
                    draw = sampler.take(want)
                    mine = scheduler.assign(draw, tally.drawn)  # {group id: dataset index}, admission order
                    prompts = {g: train_ds[i] for g, i in mine.items()}
                    # coordinator.steal: idle replicas run queued requests of the others, results come back here
                    shared = scheduler.shared_queue(
                        str(rid), {tally.drawn + k: train_ds[i].prompt_ids for k, i in enumerate(draw)}, engine.fits)
                    params = sampling_params(cfg.rollout, tokenizer, rid.seed(cfg.run.seed))
                    with timeline.span("rollout"):
                        new = tally.timed("rollout_time_s", rollout, engine, prompts, params, trainer.version, shared)
                    tally.add_engine(engine.stats)
                    with timeline.span("reward"):
                        new, reward_stats = tally.timed("reward_time_s", score, new, prompts, pool, tokenizer)
                    tally.add_rewards(reward_stats)
                    rollout_log.write(step, new, mine)  # run.save_rollouts: RUN_DIR/rollouts/rank{R}.jsonl
                    with timeline.span("drafter"):
                        tlt.rollout_done(rid)  # TLT: train the drafter until the slowest rank's rollout is done too
                    # the lengths to every replica (a collective, so after the drafter used the idle time): the next draws'
                    # length predictions, and this draw's scheduling metrics
                    tally.metrics.update(scheduler.observe(new, mine, engine.stats))
                    tally.drawn += want
                    samples += drop_equal_reward_groups(new) if cfg.algo.dynamic_sampling else new
                with timeline.span("merge"):
                    tally.metrics.update(tlt.merge())
            # 3. advantages where the groups live, 4. packed policy update in the training layout
            samples, advantage_metrics = assign_advantages(samples, cfg.algo, cfg.rollout.max_new_tokens, rps)
            tally.metrics.update(advantage_metrics)
            batch = exchange_for_update(samples, cfg.optim.micro_batch_tokens, ps)
            if batch.response_lengths:
                with timeline.span("update"):
                    train_metrics, hidden = tally.timed("train_time_s", trainer.step, batch.samples, batch.micro_batches,
                                                        cfg.rollout.max_new_tokens, collect_hidden=tlt.collect_hidden,
                                                        feature_layers=tlt.feature_layers)
                tally.metrics.update(train_metrics)
                # TLT: the update's own forward fills the drafter's buffer (on the rollout replica of each sample)
                if ps.same_layouts:
                    tlt.add_update(step, batch.samples, hidden)
                elif tlt.collect_hidden:
                    tlt.add_update(step, samples, return_hidden(batch, hidden, tlt.hidden_width(model.cfg.hidden_size), ps))
            # 5. log and checkpoint
            step_s = time.perf_counter() - t0
            timeline.write(step, step_s)
            metrics = step_metrics(batch, tally, step_s, cfg.rollout.spec != "off", rps)
            done = step + 1
            if done == cfg.run.steps or (cfg.run.eval_every and done % cfg.run.eval_every == 0):
                metrics["eval_accuracy"] = last_accuracy = held_out()
            logger.log(step, metrics, response_lengths=batch.response_lengths)
            if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.steps:
                state.save(run_dir / "checkpoints" / f"step_{done}", done, tokenizer_files)
    tlt.close()  # this rank ended normally: the peer watchdog stops watching it
    if ps.is_main:
        print(f"[train] held-out accuracy after RL: {100 * last_accuracy:.1f}% (before: {100 * first_accuracy:.1f}%)", flush=True)
        print(f"[train] run directory: {run_dir.resolve()}", flush=True)
    return run_dir
