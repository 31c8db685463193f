"""The stages of an RL step, as functions the driver (`megatron_tlt/train.py`) calls in order.

Set-up (tokenizer, policy, datasets), rollout to `Sample`s, scoring in the reward pool, advantages
with overlong handling and dynamic-sampling filters, gathering the global batch across DP ranks,
greedy held-out evaluation, supervised warm-up, and run checkpoints (save / find latest / resume).
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tlt.checkpoint.dcp import (
    init_adam_state, is_tlt_checkpoint, load_checkpoint, module_state, optimizer_state, save_checkpoint,
)
from megatron_tlt.config.schema import AlgoConfig, Config, RolloutConfig
from megatron_tlt.data.datasets import PromptDataset, PromptExample
from megatron_tlt.data.packing import pack_sequences, plan_micro_batches
from megatron_tlt.data.synthetic import get_task
from megatron_tlt.data.tokenizer import TOKENIZER_FILES, build_test_tokenizer, load_tokenizer
from megatron_tlt.models.transformer import Policy
from megatron_tlt.models.packed import packed_forward
from megatron_tlt.parallel.grads import all_reduce_grads_, clip_grads_, global_grad_norm
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.algorithms import advantage_fn, filter_groups, overlong_mask, overlong_penalty
from megatron_tlt.rl.sample import Sample
from megatron_tlt.rollout import DEFAULT_SHAPES, DraftSelector, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)


# ---- set-up ----
def build_tokenizer(cfg: Config, run_dir: Path, ps: ParallelState):
    """The tokenizer dir: data.tokenizer, else the model dir, else a built-in test tokenizer that the main
    rank writes into the run dir."""
    tok_dir = cfg.data.tokenizer or cfg.run.model_path
    if tok_dir is None:
        tok_dir = run_dir / "tokenizer"
        if ps.is_main:
            build_test_tokenizer(tok_dir, vocab_size=cfg.model.vocab_size)
        if ps.world_size > 1:
            dist.barrier()
    return load_tokenizer(tok_dir), Path(tok_dir)


def build_policy(cfg: Config, ps: ParallelState) -> Policy:
    if cfg.run.model_path is None:
        return Policy(cfg.model, ps.tp_group).to(ps.device)
    from megatron_tlt.checkpoint.loading import load_model

    model = load_model(cfg.run.model_path, tp_group=ps.tp_group, device=ps.device, attention_backend=cfg.model.attention_backend)
    cfg.model = model.cfg
    return model


def build_engine(cfg: Config, model: Policy, ps: ParallelState):
    """The rollout engine over the policy's own weights (colocated), with the drafter when SD is on.
    Returns (engine, drafter or None)."""
    drafter, selector = None, None
    if cfg.rollout.spec != "off":
        from megatron_tlt.drafter.io import load_drafter
        from megatron_tlt.drafter.model import Drafter

        drafter = load_drafter(cfg.drafter.path, model) if cfg.drafter.path else Drafter(model).to(ps.device)
    if cfg.rollout.spec == "adaptive":
        selector = DraftSelector(list(DEFAULT_SHAPES.values()), max_spec_batch=cfg.rollout.max_spec_batch, seed=cfg.run.seed)
    engine = RolloutEngine(
        model, cache_budget_bytes=int(cfg.rollout.kv_cache_gb * 2**30), drafter=drafter, spec=cfg.rollout.spec, selector=selector,
        cuda_graphs=cfg.rollout.cuda_graphs,
        max_seq_len=min(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, model.cfg.max_position_embeddings),
    )
    return engine, drafter


def build_tlt(cfg: Config, drafter, ps: ParallelState):
    """The online drafter trainer (TLT spot training on idle DP ranks), or None without an online drafter."""
    if drafter is None or not cfg.drafter.online:
        return None
    from megatron_tlt.coordinator.spot import SpotTrainer
    from megatron_tlt.drafter.data import DrafterBuffer
    from megatron_tlt.drafter.trainer import DrafterTrainer

    trainer = DrafterTrainer(drafter, lr=cfg.drafter.lr, max_tokens_per_micro_batch=cfg.drafter.micro_batch_tokens)
    return SpotTrainer(trainer, DrafterBuffer(int(cfg.drafter.buffer_gb * 2**30)), ps, seed=cfg.run.seed)


def frozen_copy(model: Policy) -> Policy:
    """A frozen reference policy with the same weights (for the KL term)."""
    ref = Policy(model.cfg, model.tp_group, init_weights=False).to(next(model.parameters()).device)
    ref.load_state_dict(model.state_dict())
    return ref.requires_grad_(False).eval()


def build_datasets(cfg: Config, tokenizer) -> tuple[PromptDataset, PromptDataset]:
    """(train, held-out) prompt datasets; a file's last `eval_examples` rows are held out."""
    d = cfg.data
    kw = dict(max_prompt_tokens=d.max_prompt_tokens, apply_chat_template=d.apply_chat_template)
    if d.path is None:
        if d.task is None:
            raise ValueError("set data.path (a jsonl/parquet file) or data.task (a built-in task)")
        train = PromptDataset.from_task(d.task, d.num_examples, cfg.run.seed, tokenizer, d.task_args, **kw)
        held_out = PromptDataset.from_task(d.task, d.eval_examples, cfg.run.seed + 1, tokenizer, d.task_args, **kw)
        return train, held_out
    full = PromptDataset.from_file(d.path, tokenizer, prompt_key=d.prompt_key, answer_key=d.answer_key, **kw)
    k = min(d.eval_examples, len(full) // 10)
    if k == 0:
        return full, PromptDataset(full.examples[-1:])
    return PromptDataset(full.examples[:-k]), PromptDataset(full.examples[-k:])


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=8).digest(), "little") >> 1


def sampling_params(r: RolloutConfig, tokenizer, seed: int, greedy: bool = False) -> SamplingParams:
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return SamplingParams(
        temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p, top_k=0 if greedy else r.top_k,
        max_new_tokens=r.max_new_tokens, stop_token_ids=stop, n=1 if greedy else r.n, seed=seed,
    )


# ---- one step ----
def rollout(engine, prompts: dict[int, PromptExample], params: SamplingParams) -> list[Sample]:
    """n samples for each prompt in one engine call; `prompts` maps a global group id to its prompt, which
    also seeds its samples (the same rollouts at any DP size)."""
    groups = list(prompts)
    completions = engine.generate([prompts[g].prompt_ids for g in groups], params, seed_ids=groups)
    return [
        Sample(prompts[g].prompt_ids, c.token_ids, c.logprobs, group=g, finish_reason=c.finish_reason)
        for g, cs in zip(groups, completions)
        for c in cs
    ]


def score(samples: list[Sample], prompts: dict[int, PromptExample], pool, tokenizer):
    """The samples with their rewards from the reward pool (`prompts` by group id), and the batch's RewardStats."""
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    rows = [_reward_row(prompts[s.group], tokenizer) for s in samples]
    rewards, stats = pool.compute(texts, rows)
    return [replace(s, reward=float(r)) for s, r in zip(samples, rewards)], stats


def _reward_row(p: PromptExample, tokenizer) -> dict:
    """The dataset row a reward function receives."""
    return {"prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=True), "answer": p.answer, **p.meta}


def gather_samples(samples: list[Sample], ps: ParallelState) -> list[Sample]:
    """The global batch: every DP rank's samples, in DP-rank order (identical on all ranks)."""
    if ps.dp_size == 1:
        return samples
    parts: list[Optional[list[Sample]]] = [None] * ps.dp_size
    dist.all_gather_object(parts, samples, group=ps.dp_group)
    return [s for part in parts for s in part]


def assign_advantages(samples: list[Sample], algo: AlgoConfig, max_new_tokens: int) -> tuple[list[Sample], dict[str, float]]:
    """Overlong handling, then per-sample advantages (group-relative). Returns (the new samples, metrics)."""
    metrics = {}
    if algo.overlong == "mask":
        keep = overlong_mask([s.finish_reason for s in samples])
        samples = [replace(s, trained=bool(k)) for s, k in zip(samples, keep.tolist())]
        metrics["overlong_masked"] = float(len(samples) - int(keep.sum()))
    elif algo.overlong == "penalty":
        pen = overlong_penalty([len(s.response_ids) for s in samples], max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
        samples = [replace(s, reward=s.reward + p) for s, p in zip(samples, pen.tolist())]
    elif algo.overlong != "none":
        raise ValueError(f"algo.overlong={algo.overlong!r}; expected none, mask or penalty")
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples])
    advantages = advantage_fn(algo.advantage)(rewards, groups).tolist()
    return [replace(s, advantage=a) for s, a in zip(samples, advantages)], metrics


def drop_equal_reward_groups(samples: list[Sample]) -> list[Sample]:
    keep, _ = filter_groups(torch.tensor([s.reward for s in samples]), torch.tensor([s.group for s in samples]))
    return [s for s, k in zip(samples, keep.tolist()) if k]


# ---- per-step bookkeeping ----
@dataclass
class StepTally:
    """Counters and timings of one RL step, summed over its rollout rounds."""

    drawn: int = 0  # prompts drawn (more than prompts_per_step when dynamic sampling refills)
    metrics: dict[str, float] = field(default_factory=dict)
    _accepted: int = 0
    _spec_row_steps: int = 0

    def _add(self, key: str, value: float) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value

    def timed(self, key: str, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        self._add(key, time.perf_counter() - t)
        return out

    def add_engine(self, stats) -> None:
        self._accepted += stats.accepted_drafts
        self._spec_row_steps += stats.spec_row_steps

    def add_rewards(self, stats) -> None:
        self._add("reward_errors", stats.num_errors)
        self._add("reward_timeouts", stats.num_timeouts)

    def summary(self, spec_on: bool) -> dict[str, float]:
        out = {"rollout_time_s": 0.0, "reward_time_s": 0.0, "train_time_s": 0.0, **self.metrics, "prompts_drawn": self.drawn}
        if spec_on:  # accept_len only when some step speculated (the adaptive selector may keep SD off)
            out.update(accepted_drafts=self._accepted, spec_row_steps=self._spec_row_steps)
            if self._spec_row_steps:
                out["accept_len"] = self._accepted / self._spec_row_steps
        return out


def max_over_dp(value: float, ps: ParallelState) -> float:
    """The largest of the DP ranks' values (a collective)."""
    if ps.dp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ps.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.dp_group)
    return t.item()


# ---- evaluation and warm-up ----
def evaluate(engine, dataset: PromptDataset, reward_fn, tokenizer, max_new_tokens: int, ps: ParallelState) -> float:
    """Greedy held-out accuracy (reward >= 1 counts as correct), split across DP ranks."""
    mine = dataset.examples[ps.dp_rank :: ps.dp_size]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    correct = 0
    if mine:
        for p, cs in zip(mine, engine.generate([p.prompt_ids for p in mine], params)):
            text = tokenizer.decode(cs[0].token_ids, skip_special_tokens=True)
            correct += int(reward_fn(text, _reward_row(p, tokenizer)) >= 1.0)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64)
    if ps.dp_size > 1:
        dist.all_reduce(counts, group=ps.dp_group)
    return float(counts[0] / counts[1])


def warm_up(cfg: Config, model: Policy, drafter, engine, tokenizer, train_ds: PromptDataset, ps: ParallelState) -> None:
    """Before RL: supervised warm-up of the policy, then of the drafter on the policy's own samples."""
    if cfg.run.sft_steps > 0:
        losses = sft_warmup(model, tokenizer, cfg, ps)
        if ps.is_main:
            log.info("supervised warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    if drafter is not None and cfg.drafter.warmup_steps > 0:
        from megatron_tlt.drafter.trainer import train_drafter_offline

        prompts = [train_ds[i].prompt_ids for i in range(min(cfg.drafter.warmup_prompts, len(train_ds)))]
        params = sampling_params(cfg.rollout, tokenizer, step_seed(cfg.run.seed, -1))
        params.n = 1
        seqs = [p + cs[0].token_ids for p, cs in zip(prompts, engine.generate(prompts, params))]
        last = {}
        train_drafter_offline(model, seqs, cfg.drafter.warmup_steps, lr=cfg.drafter.lr, drafter=drafter, seed=cfg.run.seed,
                              max_tokens_per_micro_batch=cfg.drafter.micro_batch_tokens, on_step=lambda i, m: last.update(m))
        if ps.is_main:
            log.info("drafter warm-up: %d steps on %d policy samples, top-1 agreement %.2f", cfg.drafter.warmup_steps,
                     len(seqs), last.get("top1", float("nan")))


def sft_warmup(model: Policy, tokenizer, cfg: Config, ps: ParallelState) -> list[float]:
    """Supervised warm-up on the synthetic task's worked solutions (response tokens only). Returns losses."""
    from megatron_tlt.data.tokenizer import encode_prompt

    examples = get_task(cfg.data.task)(cfg.data.num_examples, cfg.run.seed, **cfg.data.task_args)
    seqs, masks = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt, apply_chat_template=cfg.data.apply_chat_template)
        response = tokenizer.encode(ex.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + response)
        masks.append([False] * len(prompt) + [True] * len(response))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.run.sft_lr, weight_decay=0.0)
    batch = cfg.run.sft_batch
    losses = []
    g = torch.Generator().manual_seed(cfg.run.seed)
    for _ in range(cfg.run.sft_steps):
        idx = torch.randperm(len(seqs), generator=g)[:batch].tolist()
        idx = idx[ps.dp_rank :: ps.dp_size]
        opt.zero_grad(set_to_none=True)
        num_tokens = torch.tensor(float(sum(sum(masks[i][1:]) for i in idx)))
        if ps.dp_size > 1:
            dist.all_reduce(num_tokens, group=ps.dp_group)
        total = 0.0
        for b in plan_micro_batches([len(seqs[i]) for i in idx], cfg.optim.micro_batch_tokens):
            pb = pack_sequences([seqs[idx[k]] for k in b], train_masks=[masks[idx[k]] for k in b])
            lp = packed_forward(model, pb).logprobs
            loss = -(lp * pb.loss_mask.to(ps.device)).sum() / num_tokens
            loss.backward()
            total += loss.item()
        all_reduce_grads_(model.parameters(), ps.dp_group)
        if ps.dp_size > 1:
            total_t = torch.tensor(total)
            dist.all_reduce(total_t, group=ps.dp_group)
            total = float(total_t)
        clip_grads_(model.parameters(), cfg.optim.grad_clip, global_grad_norm(model.parameters(), model.tp_group))
        opt.step()
        losses.append(total)
    return losses


# ---- run checkpoints ----
_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if _STEP_DIR.match(p.name) and is_tlt_checkpoint(p)]
    return max(ckpts, key=lambda p: int(p.name.split("_")[1]), default=None)


def _run_states(model, trainer, sampler, drafter, drafter_trainer) -> dict:
    """Views of everything a resume restores (loaded in place by DCP). Optimizer state that does not exist
    yet is created as AdamW would on its first step (zeros), so save and load see the same keys."""
    init_adam_state(trainer.optimizer)
    if drafter_trainer is not None:
        init_adam_state(drafter_trainer.optimizer)
    states = {
        "optimizer": optimizer_state(model, trainer.optimizer),
        "trainer": {**trainer.state_dict(), "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state()},
    }
    if drafter is not None:
        states["drafter"] = module_state(drafter, model.tp_group)
    if drafter_trainer is not None:
        states["drafter_optimizer"] = optimizer_state(drafter, drafter_trainer.optimizer, model.tp_group)
        states["trainer"]["drafter_steps"] = drafter_trainer.steps
    return states


def save_run_checkpoint(run_dir: Path, step: int, model, trainer, sampler, tok_dir: Path, cfg: Config,
                        drafter=None, drafter_trainer=None) -> Path:
    """Everything a bit-exact resume needs after `step` completed RL steps (the drafter too, under TLT)."""
    files = {f: tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).is_file()}
    states = _run_states(model, trainer, sampler, drafter, drafter_trainer)
    return save_checkpoint(run_dir / "checkpoints" / f"step_{step}", model, cfg.model, states=states, meta={"step": step}, files=files)


def load_run_checkpoint(path: Path, model, trainer, sampler, drafter=None, drafter_trainer=None) -> int:
    """Restore model, optimizer, scheduler, data position, RNG (and drafter); returns the completed steps."""
    states = _run_states(model, trainer, sampler, drafter, drafter_trainer)
    meta = load_checkpoint(path, model, states=states)
    trainer_state = states["trainer"]
    trainer.load_state_dict(trainer_state)
    sampler.load_state_dict(trainer_state["sampler"])
    torch.set_rng_state(trainer_state["torch_rng"])
    if drafter_trainer is not None:
        drafter_trainer.steps = int(trainer_state["drafter_steps"])
    return int(meta["step"])
