"""Typed configuration: nested dataclasses that OmegaConf turns into strict structured configs.

Every field has a comment saying what it is; value and cross-field checks live in `__post_init__`
(they run when the dataclass is instantiated with `OmegaConf.to_object`, i.e. in `load_config`), so a
bad value fails when the config is loaded, naming the key and the valid values, not mid-run.

The valid names of every enumerated field are defined here, because config is the lowest layer (it
imports nothing of rl/, data/, ops/ or rollout/). The registries that implement them
(`rl.algorithms.ADVANTAGES`, `data.synthetic.TASKS`, `ops.attention.BACKENDS`, ...) are checked
against these names in tests/test_config.py, so the two cannot drift apart.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("llama3",)  # rope_scaling types; no scaling is rope_scaling: null
ATTENTION_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa_segments")  # ops.attention.BACKENDS + auto
PARALLEL_BACKENDS = ("auto", "nccl", "gloo")
SPEC_MODES = ("off", "chain", "tree", "adaptive")  # rollout.engine.SPEC_MODES
DRAFTER_ARCHS = ("eagle3", "eagle")  # drafter.arch: drafter/eagle3.py (servable) | drafter/model.py (EAGLE-1 style)
DRAFT_MODES = ("coupled", "topk")  # rollout.engine.DRAFT_MODES
CUDA_GRAPH_MODES = ("auto", "off", "eager", "capture")  # rollout.cuda_graphs.GRAPH_MODES + auto
ROLLOUT_PRECISIONS = ("auto", "fp8")  # rollout.precision
FP8_GEMMS = ("auto", "scaled_mm", "triton", "reference")  # rollout.fp8_gemm: ops.fp8.GEMM_PATHS + auto
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")  # algo.rollout_correction
MIS_LEVELS = ("token", "sequence")  # algo.mis_level
ASSIGNMENTS = ("round_robin", "balanced")  # coordinator.assignment
ADMISSIONS = ("in_order", "longest_first")  # coordinator.admission
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp")  # rl.algorithms.ADVANTAGES
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")  # rl.algorithms.AGGREGATIONS
OVERLONG_MODES = ("none", "mask", "penalty")
RESUME_MODES = ("auto", "true", "false")  # run.resume
RECOMPUTE_MODES = ("none", "selective", "full")  # optim.recompute
BUILTIN_REWARDS = ("math", "countdown", "format")  # rl.rewards.BUILTIN_REWARDS
# data.synthetic.TASKS: task name -> the keyword arguments of its generator (data.task_args)
SYNTHETIC_TASKS = {
    "arithmetic": ("max_terms", "max_value"),
    "countdown": ("min_numbers", "max_numbers", "max_value", "max_result", "max_attempts", "attempts_per_number"),
}
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*|\.[A-Za-z_]\w*)")  # pkg.mod:fn | pkg.mod.fn


def check_choice(key: str, value, choices) -> None:
    """ValueError naming `key`, the bad value and the valid ones unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported; supported: {', '.join(map(str, choices))}")


def check_range(key: str, value, *, ge=None, gt=None, le=None, lt=None, integer: bool = False) -> None:
    """ValueError naming `key` and the valid range unless `value` is a finite number within it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        bounds = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
                  f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{key}={value!r} is not supported; supported: {what} {' and '.join(b for b in bounds if b)}".rstrip())


def _yaml_off(value):
    """YAML 1.1 reads a bare `off` as the boolean false, which OmegaConf hands a str field as 'False'."""
    return "off" if value in ("False", "false") else value


@dataclass
class RopeScalingConfig:
    rope_type: str = "llama3"  # only Llama-3 frequency scaling is supported
    factor: float = 8.0  # wavelength stretch for low frequencies
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check_choice("model.rope_scaling.rope_type", self.rope_type, ROPE_TYPES)
        check_range("model.rope_scaling.factor", self.factor, gt=0)
        check_range("model.rope_scaling.low_freq_factor", self.low_freq_factor, gt=0)
        check_range("model.rope_scaling.high_freq_factor", self.high_freq_factor, gt=0)
        check_range("model.rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, ge=1, integer=True)


@dataclass
class ModelConfig:
    arch: str = "llama"  # one of SUPPORTED_ARCHS; selects defaults in HF conversion only
    vocab_size: int = 256  # true vocabulary size (logits are returned at this size)
    hidden_size: int = 64
    intermediate_size: int = 176  # SwiGLU inner size
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2  # GQA when smaller than num_attention_heads
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # context window
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128  # embedding rows are padded to a multiple of this (TP-independent)
    params_dtype: str = "float32"  # one of DTYPES
    init_std: float = 0.02  # std of the normal init for a freshly built model
    # Packed (training) attention kernel, one of ATTENTION_BACKENDS: auto = flash_attn on CUDA with the
    # flash-attn package, else torch_varlen on CUDA, else sdpa_segments (CPU). A runtime choice like
    # megatron-core's TransformerConfig.attention_backend: the HF conversion ignores it.
    attention_backend: str = "auto"

    def __post_init__(self):
        check_choice("model.arch", self.arch, SUPPORTED_ARCHS)
        check_choice("model.params_dtype", self.params_dtype, DTYPES)
        check_choice("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "max_position_embeddings", "make_vocab_size_divisible_by"):
            check_range(f"model.{key}", getattr(self, key), ge=1, integer=True)
        if self.head_dim is not None:
            check_range("model.head_dim", self.head_dim, ge=1, integer=True)
        check_range("model.rope_theta", self.rope_theta, gt=0)
        check_range("model.rms_norm_eps", self.rms_norm_eps, gt=0)
        check_range("model.init_std", self.init_std, ge=0)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("model.hidden_size must be divisible by model.num_attention_heads when head_dim is unset")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError("model.num_attention_heads must be a multiple of model.num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("model.head_dim must be even (RoPE rotates pairs)")

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1  # TP degree of training (kept within a node: TP is the innermost rank dimension)
    pipeline_parallel_size: int = 1  # pipeline stages of training: contiguous layer groups, 1F1B schedule
    # model chunks per pipeline rank (> 1: interleaved 1F1B); the decoder is cut into pp * vpp virtual stages
    virtual_pipeline_size: int = 1
    # layers per virtual stage in schedule order (virtual stage v * pp + r lives on pipeline rank r, chunk v),
    # e.g. [3, 4, 4, 3] for fewer layers on the stages with the embedding and the LM head; None = even cut
    pipeline_layout: Optional[list[int]] = None
    sequence_parallel: bool = False  # with TP > 1: norms and residuals sharded along the sequence over the TP group
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo

    def __post_init__(self):
        check_range("parallel.tensor_parallel_size", self.tensor_parallel_size, ge=1, integer=True)
        check_range("parallel.pipeline_parallel_size", self.pipeline_parallel_size, ge=1, integer=True)
        check_range("parallel.virtual_pipeline_size", self.virtual_pipeline_size, ge=1, integer=True)
        check_choice("parallel.backend", self.backend, PARALLEL_BACKENDS)
        if self.virtual_pipeline_size > 1 and self.pipeline_parallel_size == 1:
            raise ValueError("parallel.virtual_pipeline_size > 1 needs parallel.pipeline_parallel_size > 1 (interleaving is across stages)")
        if self.pipeline_layout is not None:
            self.pipeline_layout = list(self.pipeline_layout)
            want = self.pipeline_parallel_size * self.virtual_pipeline_size
            if len(self.pipeline_layout) != want:
                raise ValueError(f"parallel.pipeline_layout has {len(self.pipeline_layout)} entries; it needs one per virtual "
                                 f"stage: pipeline_parallel_size * virtual_pipeline_size = {want}")
            for i, n in enumerate(self.pipeline_layout):
                check_range(f"parallel.pipeline_layout[{i}]", n, ge=1, integer=True)


@dataclass
class DataConfig:
    task: Optional[str] = "arithmetic"  # built-in synthetic task (SYNTHETIC_TASKS), used when path is unset
    task_args: dict[str, int] = field(default_factory=dict)  # keyword arguments of the task's generator, e.g. max_terms
    path: Optional[str] = None  # jsonl / parquet prompt dataset
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    apply_chat_template: bool = True
    max_prompt_tokens: int = 256  # longer prompts are skipped and counted
    num_examples: int = 4096  # size of a synthetic task's training set
    eval_examples: int = 64  # held-out prompts for accuracy (synthetic task, or the file's last rows)
    tokenizer: Optional[str] = None  # tokenizer dir; default: the model dir, or a built-in test tokenizer for fresh models

    def __post_init__(self):
        for key in ("max_prompt_tokens", "num_examples", "eval_examples"):
            check_range(f"data.{key}", getattr(self, key), ge=1, integer=True)
        for key in ("prompt_key", "answer_key"):
            if not getattr(self, key):
                raise ValueError(f"data.{key}={getattr(self, key)!r} is not supported; supported: a non-empty field name")
        if self.task is not None:
            check_choice("data.task", self.task, tuple(SYNTHETIC_TASKS))
            unknown = sorted(set(self.task_args) - set(SYNTHETIC_TASKS[self.task]))
            if unknown:
                raise ValueError(
                    f"data.task_args.{unknown[0]} is not an argument of task {self.task!r}; "
                    f"supported: {', '.join(SYNTHETIC_TASKS[self.task])}"
                )


@dataclass
class RolloutConfig:
    n: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    kv_cache_gb: float = 1.0  # KV-cache budget per rank
    max_batch: Optional[int] = None  # at most this many requests decode at once per rollout replica (KV slots); None: as many as fit
    spec: str = "off"  # off | chain | tree | adaptive (speculative decoding with the drafter)
    max_spec_batch: int = 32  # adaptive: live batches above this decode plainly
    # SD drafts: coupled = each node's first child is the drafter's sample under the target's position noise
    # (accepted far more often at temperature > 0); topk = the drafter's most likely tokens. Either way the
    # rollout's tokens are plain decoding's (exact-sample verification).
    drafts: str = "coupled"
    # the target's attention per query in fp32 and its linears in float64: a position's logits are bit-identical
    # whatever the batch, the padding or the verify shape, so reduced-precision rollouts (bf16) are the same with
    # SD on or off; slower
    batch_invariant: bool = False
    cuda_graphs: str = "auto"  # auto (capture on GPU) | off | eager (static shapes, no capture) | capture
    # TP degree of the rollout layout: each rollout replica holds the whole model (no pipeline stages), rollout
    # DP = world / this. None = the training TP. With training PP > 1 (or another TP) the weights are resharded
    # from the training layout into this one before every rollout.
    tensor_parallel_size: Optional[int] = None
    keep_weights: bool = False  # keep the resharded rollout copy between rollouts (memory for speed); false: freed
    # auto: the rollout runs in the policy's dtype; fp8: the rollout's linear weights (q/k/v/o, MLP) re-quantized to
    # e4m3 with fp8_block x fp8_block scales after every policy update, activations per token and fp8_block channels
    precision: str = "auto"
    # the FP8 GEMM: auto (scaled_mm on a GPU that has it, else the reference), scaled_mm (torch._scaled_mm), triton
    # (kernels/, CUDA only), reference (dequantize, then matmul in fp32: exact, no speed-up); the path taken is logged
    fp8_gemm: str = "auto"
    fp8_block: int = 128  # FP8 block edge (weights: fp8_block x fp8_block; activations: 1 x fp8_block); a power of 2 >= 16

    def __post_init__(self):
        check_choice("rollout.precision", self.precision, ROLLOUT_PRECISIONS)
        check_choice("rollout.fp8_gemm", self.fp8_gemm, FP8_GEMMS)
        if self.fp8_block < 16 or self.fp8_block & (self.fp8_block - 1):
            raise ValueError(f"rollout.fp8_block={self.fp8_block!r} is not supported; supported: a power of 2 >= 16 (e.g. 128)")
        if self.tensor_parallel_size is not None:
            check_range("rollout.tensor_parallel_size", self.tensor_parallel_size, ge=1, integer=True)
        self.spec, self.cuda_graphs = _yaml_off(self.spec), _yaml_off(self.cuda_graphs)
        check_choice("rollout.spec", self.spec, SPEC_MODES)
        check_choice("rollout.drafts", self.drafts, DRAFT_MODES)
        check_choice("rollout.cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        check_range("rollout.n", self.n, ge=1, integer=True)
        check_range("rollout.temperature", self.temperature, ge=0)  # 0 = greedy
        check_range("rollout.top_p", self.top_p, gt=0, le=1)
        check_range("rollout.top_k", self.top_k, ge=0, integer=True)  # 0 = off
        check_range("rollout.max_new_tokens", self.max_new_tokens, ge=1, integer=True)
        check_range("rollout.kv_cache_gb", self.kv_cache_gb, gt=0)
        if self.max_batch is not None:
            check_range("rollout.max_batch", self.max_batch, ge=1, integer=True)
        check_range("rollout.max_spec_batch", self.max_spec_batch, ge=1, integer=True)


@dataclass
class CoordinatorConfig:
    # The long-tail-aware scheduler (coordinator/scheduler.py). Lossless: a request's samples depend only on its own
    # seed and positions, so where and when it runs changes nothing but time.
    # round_robin: prompt k of a draw to rollout-DP rank k % dp | balanced: whole groups to the ranks that minimise
    # the predicted makespan (each prompt's past response lengths; the rank's KV slots)
    assignment: str = "round_robin"
    admission: str = "in_order"  # in_order (the draw's order) | longest_first (by predicted length)
    # a prompt's predicted lengths: EMAs of its groups' mean and max, ema <- decay * ema + (1 - decay) * observed
    length_decay: float = 0.5
    # work stealing (coordinator/stealing.py): a replica with free slots and an empty queue runs other replicas'
    # queued requests and sends the results back; a replica waits at most steal_timeout_s for its requests' results
    steal: bool = False
    steal_timeout_s: float = 3600.0

    def __post_init__(self):
        check_choice("coordinator.assignment", self.assignment, ASSIGNMENTS)
        check_choice("coordinator.admission", self.admission, ADMISSIONS)
        check_range("coordinator.length_decay", self.length_decay, ge=0, lt=1)
        check_range("coordinator.steal_timeout_s", self.steal_timeout_s, gt=0)


@dataclass
class DrafterConfig:
    path: Optional[str] = None  # warm-start drafter dir (`megatron-tlt train-drafter`); None = freshly initialised
    arch: str = "eagle3"  # eagle3 (fused low/mid/high target features, training-time test, servable) | eagle (DRAFTER_ARCHS)
    feature_layers: Optional[list[int]] = None  # eagle3: the 3 target layers whose outputs it fuses; null = the servers' default
    ttt_steps: int = 3  # eagle3: training-time test steps unrolled per position (1 = plain next-token loss)
    ttt_hidden_weight: float = 1.0  # eagle3: weight of the training-only regression norm(g) ~ target's final hidden (0 = EAGLE-3's loss)
    online: bool = True  # TLT: train the drafter on DP ranks that finished their rollouts (spot training)
    lr: float = 1e-4
    buffer_gb: float = 0.5  # online buffer of (tokens, target hidden states) per rank; oldest RL steps evicted first
    micro_batch_tokens: int = 2048  # tokens per drafter step (the unit of preemption)
    warmup_steps: int = 0  # offline drafter steps on the policy's own samples before RL (after the policy warm-up)
    warmup_prompts: int = 64  # training prompts the policy answers for the drafter warm-up
    max_wait_s: float = 7200.0  # spot training: a rank's rollout end -> every replica's; longer stops the run (a stuck replica)
    peer_timeout_s: float = 60.0  # TLT with >1 process: a rank silent this long is dead; every rank exits non-zero

    def __post_init__(self):
        check_choice("drafter.arch", self.arch, DRAFTER_ARCHS)
        check_range("drafter.ttt_steps", self.ttt_steps, ge=1, integer=True)
        check_range("drafter.ttt_hidden_weight", self.ttt_hidden_weight, ge=0)
        if self.feature_layers is not None:
            if self.arch != "eagle3":
                raise ValueError(f"drafter.feature_layers is an eagle3 option; drafter.arch={self.arch!r} reads the final hidden states")
            if len(self.feature_layers) != 3 or len(set(self.feature_layers)) != 3:
                raise ValueError(f"drafter.feature_layers must be 3 distinct layer indices (low, middle, high), got {self.feature_layers}")
            for i in self.feature_layers:
                check_range("drafter.feature_layers[]", i, ge=0, integer=True)
        check_range("drafter.lr", self.lr, gt=0)
        check_range("drafter.buffer_gb", self.buffer_gb, gt=0)
        check_range("drafter.micro_batch_tokens", self.micro_batch_tokens, ge=2, integer=True)  # a drafter step needs a next token
        check_range("drafter.warmup_steps", self.warmup_steps, ge=0, integer=True)
        check_range("drafter.warmup_prompts", self.warmup_prompts, ge=1, integer=True)
        check_range("drafter.max_wait_s", self.max_wait_s, gt=0)
        check_range("drafter.peer_timeout_s", self.peer_timeout_s, gt=0)


@dataclass
class RewardItem:
    name: str = "math"  # built-in (BUILTIN_REWARDS: math, countdown, format) or an import path 'pkg.module:function'
    weight: float = 1.0

    def __post_init__(self):
        if self.name not in BUILTIN_REWARDS and not _IMPORT_PATH.fullmatch(self.name):
            raise ValueError(
                f"reward.fns[].name={self.name!r} is not supported; supported: {', '.join(BUILTIN_REWARDS)} "
                "or an import path 'pkg.module:function' (or 'pkg.module.function')"
            )
        check_range("reward.fns[].weight", self.weight)


@dataclass
class RewardConfig:
    fns: list[RewardItem] = field(default_factory=lambda: [RewardItem()])
    num_workers: int = 2  # reward process pool; 0 = inline (no timeout)
    timeout_s: float = 10.0  # per call; a timeout or crash gives reward 0 and is counted

    def __post_init__(self):
        check_range("reward.num_workers", self.num_workers, ge=0, integer=True)
        check_range("reward.timeout_s", self.timeout_s, gt=0)


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # grpo | drgrpo | rloo | reinforce_pp (ADVANTAGE_ESTIMATORS)
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO)
    dual_clip: Optional[float] = None  # > 1 (e.g. 3): caps a negative-advantage token's loss at -A * dual_clip; null = off
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (LOSS_AGGREGATIONS)
    kl_coef: float = 0.0  # k3 KL to a frozen copy of the initial policy; 0 = no reference model
    dynamic_sampling: bool = False  # drop groups with equal rewards and refill from the next prompts
    max_refill_rounds: int = 2
    overlong: str = "none"  # none | mask (truncated samples get no loss) | penalty (DAPO soft punishment)
    overlong_buffer: int = 32  # tokens before max_new_tokens where the penalty ramps up
    overlong_penalty: float = 1.0
    # rollout-training mismatch correction (the rollout policy, e.g. FP8, is not exactly the trained one), on the
    # ratio pi_old / pi_rollout of the trainer's own pre-update logprobs to the rollout's: none | tis (each token's
    # policy loss weighted by min(ratio, tis_cap), detached) | mis (tokens, or whole sequences by the geometric mean
    # of their tokens' ratios, leaving [mis_low, mis_high] get no loss)
    rollout_correction: str = "none"
    tis_cap: float = 2.0
    mis_level: str = "token"  # token | sequence
    mis_low: float = 0.5
    mis_high: float = 2.0

    def __post_init__(self):
        check_choice("algo.rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        check_choice("algo.mis_level", self.mis_level, MIS_LEVELS)
        check_range("algo.tis_cap", self.tis_cap, gt=0)
        check_range("algo.mis_low", self.mis_low, ge=0)
        check_range("algo.mis_high", self.mis_high, gt=self.mis_low)
        check_choice("algo.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        check_choice("algo.aggregation", self.aggregation, LOSS_AGGREGATIONS)
        check_choice("algo.overlong", self.overlong, OVERLONG_MODES)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"algo.dual_clip={self.dual_clip!r} is not supported; supported: a number > 1 (e.g. 3), or null (off)")
        check_range("algo.clip_low", self.clip_low, ge=0, lt=1)
        check_range("algo.clip_high", self.clip_high, ge=0)
        check_range("algo.kl_coef", self.kl_coef, ge=0)
        check_range("algo.max_refill_rounds", self.max_refill_rounds, ge=0, integer=True)
        check_range("algo.overlong_buffer", self.overlong_buffer, ge=1 if self.overlong == "penalty" else 0, integer=True)
        check_range("algo.overlong_penalty", self.overlong_penalty, ge=0)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096  # packing budget per micro-batch
    bf16: bool = True  # autocast on GPU (ignored on CPU)
    max_bad_updates: int = 3  # consecutive skipped / rolled-back (non-finite) policy updates before the run stops
    rollback: bool = True  # copy weights + AdamW state to undo a non-finite update; false: no copy, such an update stops the run
    distributed: bool = False  # shard the optimizer state across the DP group (ZeRO-1, Megatron's distributed optimizer)
    # activation recomputation in the policy update and the SFT warm-up, one of RECOMPUTE_MODES: none | selective
    # (attention core and the MLP activation) | full (whole decoder layers, every `recompute_every`-th layer)
    recompute: str = "none"
    recompute_every: int = 1
    # PPO: optimizer steps per rollout batch (each over a disjoint, token-balanced share of the samples) and passes
    # over the batch; with more than one step the old-policy logprobs come from the trainer's own pre-update forward
    mini_batches: int = 1
    epochs: int = 1

    def __post_init__(self):
        check_range("optim.mini_batches", self.mini_batches, ge=1, integer=True)
        check_range("optim.epochs", self.epochs, ge=1, integer=True)
        check_choice("optim.recompute", self.recompute, RECOMPUTE_MODES)
        check_range("optim.recompute_every", self.recompute_every, ge=1, integer=True)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr!r} is not supported; supported: a finite number > 0 (e.g. 1e-5)")
        if self.max_bad_updates < 1:
            raise ValueError(f"optim.max_bad_updates={self.max_bad_updates!r} is not supported; supported: an integer >= 1")
        check_range("optim.weight_decay", self.weight_decay, ge=0)
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, ge=0, lt=1)
        check_range("optim.eps", self.eps, gt=0)
        check_range("optim.warmup_steps", self.warmup_steps, ge=0, integer=True)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("optim.grad_clip", self.grad_clip, ge=0)  # 0 = no clipping
        check_range("optim.micro_batch_tokens", self.micro_batch_tokens, ge=1, integer=True)


@dataclass
class RunConfig:
    dir: str = "runs/grpo"  # run directory: checkpoints, metrics.jsonl, tensorboard, plots
    steps: int = 10  # RL steps
    prompts_per_step: int = 8
    model_path: Optional[str] = None  # HF dir or megatron_tlt checkpoint to start from; None = fresh model from `model`
    save_every: int = 0  # RL steps between checkpoints; 0 = only at the end
    eval_every: int = 0  # RL steps between held-out evaluations; 0 = only before and after
    # auto: continue from the newest checkpoint in `dir` that verifies, else start fresh (refusing a `dir` that
    # holds another run's checkpoints or metrics); true: continue, an error if no checkpoint verifies;
    # false: start fresh (refusing such a `dir` unless run.overwrite=true). One of RESUME_MODES.
    resume: str = "auto"
    overwrite: bool = False  # start fresh, deleting the checkpoints and metrics of the run already in `dir`
    seed: int = 1234
    sft_steps: int = 0  # supervised warm-up on the synthetic task's worked solutions before RL (demo)
    sft_lr: float = 3e-3
    sft_batch: int = 32  # sequences per warm-up step
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb_project: Optional[str] = None  # log to wandb when installed and set
    save_rollouts: bool = False  # each rollout-DP rank appends its scored samples to RUN_DIR/rollouts/rank{R}.jsonl

    def __post_init__(self):
        self.resume = {"True": "true", "False": "false"}.get(self.resume, self.resume)  # YAML booleans arrive as 'True'
        check_choice("run.resume", self.resume, RESUME_MODES)
        if self.overwrite and self.resume == "true":
            raise ValueError("run.overwrite=true starts a fresh run: it cannot be combined with run.resume=true")
        if not self.dir:
            raise ValueError("run.dir='' is not supported; supported: a directory path")
        check_range("run.steps", self.steps, ge=1, integer=True)
        check_range("run.prompts_per_step", self.prompts_per_step, ge=1, integer=True)
        check_range("run.save_every", self.save_every, ge=0, integer=True)
        check_range("run.eval_every", self.eval_every, ge=0, integer=True)
        check_range("run.sft_steps", self.sft_steps, ge=0, integer=True)
        check_range("run.sft_lr", self.sft_lr, gt=0)
        check_range("run.sft_batch", self.sft_batch, ge=1, integer=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        d = self.drafter
        # The layout's fit to the model, at load (the world size is checked when the process groups start). With
        # run.model_path the model's sizes come from the checkpoint: the stages and TP layers check them when built.
        if self.run.model_path is not None:
            return
        m, p = self.model, self.parallel
        if d.feature_layers is not None and max(d.feature_layers) >= m.num_layers:
            raise ValueError(f"drafter.feature_layers={d.feature_layers} must be layer indices below model.num_layers={m.num_layers}")
        stages = p.pipeline_parallel_size * p.virtual_pipeline_size
        if p.pipeline_layout is not None and sum(p.pipeline_layout) != m.num_layers:
            raise ValueError(f"parallel.pipeline_layout={p.pipeline_layout} covers {sum(p.pipeline_layout)} layers; "
                             f"model.num_layers={m.num_layers}: every layer must be in exactly one stage")
        if stages > m.num_layers:
            raise ValueError(f"pipeline_parallel_size * virtual_pipeline_size = {p.pipeline_parallel_size} * "
                             f"{p.virtual_pipeline_size} = {stages} stages for model.num_layers={m.num_layers}: a stage needs a layer")
        for key, tp in (("parallel.tensor_parallel_size", p.tensor_parallel_size),
                        ("rollout.tensor_parallel_size", self.rollout.tensor_parallel_size or p.tensor_parallel_size)):
            if m.num_attention_heads % tp or m.num_kv_heads % tp:
                raise ValueError(f"{key}={tp} must divide model.num_attention_heads={m.num_attention_heads} and "
                                 f"model.num_kv_heads={m.num_kv_heads}")
