"""A small trained policy and its drafters (both heads), for the rollout and TLT benchmarks; cached on disk.

Speculative decoding is only as fast as the drafter is accepted, so a benchmark needs a policy whose
outputs are structured and a drafter that learned them. `trained_models(args, ps)` builds both with
the library's own warm-up (`step.warmup.warm_up`): the policy is trained supervised (packed) on a
built-in synthetic task's worked solutions, then it answers training prompts (sampled at the
rollout temperature, as in RL) and the drafter is trained offline on those samples
(`drafter.trainer.train_drafter_offline`). Two drafters are trained at the same budget (steps, learning
rate, micro-batch tokens) on the same samples: the EAGLE head (`drafter`, drafter.arch=eagle) and the
EAGLE-3 head (`eagle3`, drafter.arch=eagle3, with training-time test), so benchmarks can compare them.
Benchmarks then run on the task's held-out prompts, which no model has seen.

The result is saved under --cache-dir in a folder named by a hash of the model and data configs and the
warm-up options: the policy (a megatron_tlt checkpoint with the tokenizer), the EAGLE drafter, and one
EAGLE-3 drafter directory per setting of its own loss options (`eagle3_dir`: --ttt-steps, --ttt-hidden-weight),
so a rerun with the same options loads everything in seconds, and one that changes only the EAGLE-3 loss
trains only that head. Delete the folder after changing the model or warm-up code.

    add_model_args(parser)                     # the options below (--quick: a tiny model for a smoke run)
    models = trained_models(args, ps)          # TrainedModels: policy, drafter, eagle3, tokenizer, prompts
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path


from megatron_tlt.checkpoint.dcp import is_tlt_checkpoint, save_checkpoint
from megatron_tlt.config.schema import Config, DataConfig, DrafterConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig
from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from megatron_tlt.drafter.io import load_drafter, save_drafter
from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.drafter.model import Drafter, build_drafter
from megatron_tlt.checkpoint.loading import load_model
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import set_seed
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.step.setup import build_datasets, build_engine, build_rollout_weights, build_tokenizer
from megatron_tlt.step.warmup import warm_up

POLICY_DIR, DRAFTER_DIR = "policy", "drafter"
QUICK = dict(hidden=64, layers=4, sft_steps=40, drafter_prompts=32, drafter_steps=60, sample_max_new_tokens=96, num_held_out=16)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trained policy and drafter (cached under --cache-dir)")
    g.add_argument("--cache-dir", default="/tmp/megatron_tlt_bench", help="where the trained policy and drafter are kept")
    g.add_argument("--task", default="countdown", help="built-in synthetic task (countdown: long-tailed worked solutions)")
    g.add_argument("--task-args", type=json.loads, default={}, metavar="JSON",
                   help='keyword arguments of the task generator (data.task_args), e.g. \'{"attempts_per_number": 4}\': '
                        "countdown whose solution lengths follow from the prompt")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--vocab", type=int, default=256, help="size of the built-in test tokenizer's vocabulary")
    g.add_argument("--sft-steps", type=int, default=150, help="supervised steps of the policy")
    g.add_argument("--sft-batch", type=int, default=16, help="sequences per supervised step")
    g.add_argument("--sft-lr", type=float, default=2e-3)
    g.add_argument("--drafter-prompts", type=int, default=256, help="training prompts the policy answers for the drafter")
    g.add_argument("--drafter-steps", type=int, default=300)
    g.add_argument("--drafter-lr", type=float, default=1e-3)
    g.add_argument("--ttt-steps", type=int, default=DrafterConfig.ttt_steps, help="the EAGLE-3 head's training-time test steps (drafter.ttt_steps)")
    g.add_argument("--ttt-hidden-weight", type=float, default=DrafterConfig.ttt_hidden_weight,
                   help="the EAGLE-3 head's auxiliary hidden-state regression weight (drafter.ttt_hidden_weight; 0: EAGLE-3's loss)")
    g.add_argument("--sample-max-new-tokens", type=int, default=256, help="response limit of the drafter's training samples")
    g.add_argument("--num-held-out", type=int, default=256, help="held-out prompts to benchmark on")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick-models", action="store_true",
                   help="a tiny model and short warm-ups (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + ")")


def apply_quick_models(args) -> None:
    """--quick-models: the QUICK sizes in place of the model and warm-up options."""
    if args.quick_models:
        for key, value in QUICK.items():
            setattr(args, key, value)


@dataclass
class TrainedModels:
    cfg: Config  # what built them (model, data, warm-up options)
    policy: Policy
    drafter: Drafter  # the EAGLE head
    eagle3: Eagle3Drafter  # the EAGLE-3 head, trained at the same budget on the same samples
    tokenizer: object
    train: PromptDataset  # the prompts the policy and the drafter were trained on
    held_out: PromptDataset  # prompts neither has seen
    checkpoint: Path  # the policy's megatron_tlt checkpoint (tokenizer files included)
    heads: dict[str, Path]  # drafter.arch -> its saved drafter directory
    report: list[str]  # how they were made (cached runs: as recorded when they were made)


def bench_config(args) -> Config:
    """The run config whose warm-up trains the benchmark's policy and drafter."""
    model = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads, max_position_embeddings=1024,
    )
    return Config(
        model=model,
        data=DataConfig(task=args.task, task_args=args.task_args, num_examples=4096, eval_examples=args.num_held_out, max_prompt_tokens=128),
        rollout=RolloutConfig(temperature=1.0, max_new_tokens=args.sample_max_new_tokens, kv_cache_gb=0.5),
        drafter=DrafterConfig(lr=args.drafter_lr, warmup_steps=args.drafter_steps, warmup_prompts=args.drafter_prompts,
                              ttt_steps=args.ttt_steps, ttt_hidden_weight=args.ttt_hidden_weight),
        optim=OptimConfig(micro_batch_tokens=4096),
        run=RunConfig(seed=args.seed, sft_steps=args.sft_steps, sft_lr=args.sft_lr, sft_batch=args.sft_batch),
    )


# The options besides the model and data configs that shape the trained models (the cache key hashes only
# these, so config fields the warm-up does not read leave the cache valid); the EAGLE-3 head's loss options
# name its own directory inside (`eagle3_dir`).
WARM_UP_OPTIONS = ("sft_steps", "sft_batch", "sft_lr", "drafter_prompts", "drafter_steps", "drafter_lr", "sample_max_new_tokens", "seed")


def _cache_dir(args, cfg: Config) -> Path:
    shaping = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
               "warm_up": {name: getattr(args, name) for name in WARM_UP_OPTIONS}}
    key = json.dumps(shaping, sort_keys=True, default=str)
    return Path(args.cache_dir) / f"{args.task}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}"


def eagle3_dir(cfg: Config) -> str:
    """The cached EAGLE-3 drafter's directory name: its loss options."""
    return f"drafter_eagle3-ttt{cfg.drafter.ttt_steps}-hidden{cfg.drafter.ttt_hidden_weight:g}"


class _Lines(logging.Handler):
    """Collects the warm-up's log lines (its losses and top-1 agreement) for the report."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _warm_up_head(cfg: Config, ps: ParallelState, policy: Policy, arch: str, tokenizer, train: PromptDataset) -> tuple[Drafter, list[str]]:
    """A fresh drafter of `arch` warmed up with `step.warmup.warm_up` (the policy's own supervised warm-up first when
    cfg.run.sft_steps > 0; each head then gets the same samples, drawn with the same seed from the same policy, and
    the same budget) -> (the drafter, the warm-up's log lines)."""
    engine, _ = build_engine(cfg, policy, ps)  # cfg.rollout.spec is "off": a plain engine for the drafter's samples
    weights = build_rollout_weights(cfg, policy, ps)
    lines = _Lines()
    lines.lines.append(f"drafter head {arch}:")
    logger = logging.getLogger("megatron_tlt.step.warmup")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        set_seed(cfg.run.seed + 1)
        drafter = build_drafter(policy, arch).to(ps.device)
        warm_up(cfg, policy, weights, drafter, engine, tokenizer, train, ps)
    finally:
        logger.removeHandler(lines)
    return drafter, lines.lines


def _train_and_save(cfg: Config, ps: ParallelState, tokenizer, tokenizer_dir: Path, train: PromptDataset, root: Path) -> None:
    """Warm the policy and the EAGLE drafter up from scratch and save them under `root`."""
    set_seed(cfg.run.seed)
    start = time.perf_counter()
    policy = Policy(cfg.model, ps.tp_group).to(ps.device)
    drafter, lines = _warm_up_head(cfg, ps, policy, "eagle", tokenizer, train)
    report = [*lines, f"policy and EAGLE drafter trained in {time.perf_counter() - start:.0f} s"]
    files = {name: tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()}
    save_checkpoint(root / POLICY_DIR, policy, cfg.model, files=files)
    save_drafter(root / DRAFTER_DIR, drafter, meta={"report": report})  # last: its presence marks a complete cache


def _eagle3_head(cfg: Config, ps: ParallelState, tokenizer, train: PromptDataset, root: Path) -> tuple[Path, list[str]]:
    """The cached EAGLE-3 drafter of cfg's loss options (trained now and saved if missing: at the EAGLE head's budget,
    on the same samples, over the saved float32 policy) -> (its directory, its report)."""
    path = root / eagle3_dir(cfg)
    if not (path / "COMPLETE").is_file():
        start = time.perf_counter()
        policy = load_model(root / POLICY_DIR, tp_group=ps.tp_group, device=ps.device)  # fp32, as trained
        drafter, lines = _warm_up_head(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, sft_steps=0)), ps, policy,
                                       "eagle3", tokenizer, train)
        save_drafter(path, drafter, meta={"report": [*lines, f"EAGLE-3 drafter trained in {time.perf_counter() - start:.0f} s"]})
    return path, json.loads((path / "meta.json").read_text())["report"]


def trained_models(args, ps: ParallelState, dtype=None) -> TrainedModels:
    """The benchmark's policy and drafter (trained now, or loaded from the cache; in `dtype`, default the
    trained one: float32) and the task's prompts."""
    cfg = bench_config(args)
    root = _cache_dir(args, cfg)
    cached = is_tlt_checkpoint(root / POLICY_DIR) and (root / DRAFTER_DIR / "COMPLETE").is_file()
    if cached:
        tokenizer = load_tokenizer(root / POLICY_DIR)
    else:
        tokenizer, tokenizer_dir = build_tokenizer(cfg, root, ps)
    train, held_out = build_datasets(cfg, tokenizer)
    if not cached:
        _train_and_save(cfg, ps, tokenizer, tokenizer_dir, train, root)
    report = json.loads((root / DRAFTER_DIR / "meta.json").read_text())["report"]
    if cached:
        report.append(f"(loaded from {root})")
    heads = {"eagle": root / DRAFTER_DIR}
    heads["eagle3"], eagle3_report = _eagle3_head(cfg, ps, tokenizer, train, root)
    report += eagle3_report
    policy = load_model(root / POLICY_DIR, tp_group=ps.tp_group, device=ps.device, dtype=dtype)
    drafter, eagle3 = (load_drafter(heads[arch], policy).eval() for arch in ("eagle", "eagle3"))
    return TrainedModels(cfg, policy, drafter, eagle3, tokenizer, train, held_out, root / POLICY_DIR, heads, report)
