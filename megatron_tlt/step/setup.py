"""Building a run: tokenizer, policy, held-out and training prompts, the rollout engine and its drafter.

    tokenizer, tok_dir = build_tokenizer(cfg, run_dir, ps)
    model = build_policy(cfg, ps)                       # a fresh policy (this rank's pipeline stage), or run.model_path
    weights = build_rollout_weights(cfg, model, ps)     # the rollout layout's copy (the policy itself when layouts agree)
    train_ds, eval_ds = build_datasets(cfg, tokenizer)
    engine, drafter = build_engine(cfg, weights.model, ps.rollout)   # drafter None unless rollout.spec != off
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_tlt.config.schema import Config, RolloutConfig
from megatron_tlt.data.datasets import PromptDataset
from megatron_tlt.data.tokenizer import build_test_tokenizer, load_tokenizer
from megatron_tlt.coordinator.reshard import RolloutWeights
from megatron_tlt.models.pipeline import PolicyStage, build_stage
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rollout import DEFAULT_SHAPES, DraftSelector, RolloutEngine, SamplingParams


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


def build_policy(cfg: Config, ps: ParallelState):
    """A freshly initialised policy from `cfg.model`, or the one at `run.model_path` (then `cfg.model` is set from it):
    a `Policy`, or with PP > 1 this rank's `PolicyStage`; with parallel.sequence_parallel and optim.recompute."""
    p, sp = cfg.parallel, cfg.parallel.sequence_parallel
    if cfg.run.model_path is None:
        if ps.pp_size == 1:
            model = Policy(cfg.model, ps.tp_group, sequence_parallel=sp).to(ps.device)
        else:
            model = build_stage(cfg.model, ps.tp_group, ps.pp_rank, ps.pp_size, p.virtual_pipeline_size, p.pipeline_layout,
                                device=ps.device, sequence_parallel=sp)
    else:
        from megatron_tlt.checkpoint.loading import load_model

        model = load_model(cfg.run.model_path, tp_group=ps.tp_group, device=ps.device, attention_backend=cfg.model.attention_backend,
                           pipeline=(ps.pp_rank, ps.pp_size, p.virtual_pipeline_size, p.pipeline_layout), sequence_parallel=sp)
        cfg.model = model.cfg
    model.set_recompute(cfg.optim.recompute, cfg.optim.recompute_every)  # training passes only (the SFT warm-up too)
    return model


def build_rollout_weights(cfg: Config, model, ps: ParallelState) -> RolloutWeights:
    """The rollout layout's policy (`coordinator.reshard`): the training policy itself when the layouts agree, else a
    whole-model copy at rollout TP, filled before each rollout."""
    rollout_model = model if ps.same_layouts else Policy(model.cfg, ps.rollout.tp_group, init_weights=False).to(ps.device)
    return RolloutWeights(model, rollout_model, ps, keep=cfg.rollout.keep_weights, layout=cfg.parallel.pipeline_layout,
                          vpp=cfg.parallel.virtual_pipeline_size)


def build_engine(cfg: Config, model: Policy, ps: ParallelState):
    """The rollout engine over the policy's own weights (colocated), with the drafter when SD is on.
    Returns (engine, drafter or None)."""
    drafter, selector = None, None
    if cfg.rollout.spec != "off":
        from megatron_tlt.drafter.io import load_drafter
        from megatron_tlt.drafter.model import build_drafter

        d = cfg.drafter
        drafter = load_drafter(d.path, model) if d.path else build_drafter(model, d.arch, d.feature_layers).to(ps.device)
        if drafter.arch != d.arch:
            raise ValueError(f"drafter.path={d.path!r} holds an {drafter.arch} drafter but drafter.arch={d.arch!r}")
    if cfg.rollout.spec == "adaptive":
        selector = DraftSelector(list(DEFAULT_SHAPES.values()), max_spec_batch=cfg.rollout.max_spec_batch, seed=cfg.run.seed)
    engine = RolloutEngine(
        model, cache_budget_bytes=int(cfg.rollout.kv_cache_gb * 2**30), max_batch=cfg.rollout.max_batch, drafter=drafter, spec=cfg.rollout.spec, selector=selector,
        cuda_graphs=cfg.rollout.cuda_graphs, drafts=cfg.rollout.drafts, batch_invariant=cfg.rollout.batch_invariant,
        precision=cfg.rollout.precision, fp8_gemm=cfg.rollout.fp8_gemm, fp8_block=cfg.rollout.fp8_block,
        max_seq_len=rollout_max_seq_len(cfg, model.cfg),
    )
    return engine, drafter


def rollout_max_seq_len(cfg: Config, model_cfg=None) -> int:
    """The rollout engine's context: prompt + response tokens, at most the model's window (`model_cfg`, default
    cfg.model: the built policy's config once build_policy ran)."""
    window = (model_cfg or cfg.model).max_position_embeddings
    return min(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens, window)


def frozen_copy(model):
    """A frozen reference policy (or pipeline stage) with the same weights (for the KL term)."""
    device = next(model.parameters()).device

    def like(c: Policy) -> Policy:
        return Policy(c.cfg, c.tp_group, layer_range=c.layer_range, pre_process=c.pre_process, post_process=c.post_process,
                      init_weights=False).to(device)

    ref = PolicyStage([like(c) for c in model.chunks], model.stage_ids, model.num_stages) if isinstance(model, PolicyStage) else like(model)
    ref.load_state_dict(model.state_dict())
    return ref.requires_grad_(False).eval()


def build_datasets(cfg: Config, tokenizer) -> tuple[PromptDataset, PromptDataset]:
    """(train, held-out) prompt datasets; a file's last `eval_examples` rows are held out. Prompts that leave no
    room for a response in the rollout's context are skipped and counted here, at load (call after build_policy)."""
    d = cfg.data
    kw = dict(max_prompt_tokens=d.max_prompt_tokens, apply_chat_template=d.apply_chat_template,
              max_context=rollout_max_seq_len(cfg))
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


def sampling_params(r: RolloutConfig, tokenizer, seed: int, greedy: bool = False) -> SamplingParams:
    """The rollout's sampling parameters (greedy: temperature 0, one sample per prompt)."""
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return SamplingParams(
        temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p, top_k=0 if greedy else r.top_k,
        max_new_tokens=r.max_new_tokens, stop_token_ids=stop, n=1 if greedy else r.n, seed=seed,
    )
