"""Typed configuration: nested dataclasses that OmegaConf turns into strict structured configs.

Every field has a comment saying what it is; cross-field checks live in `__post_init__`
(they run when the dataclass is instantiated with `OmegaConf.to_object`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RopeScalingConfig:
    rope_type: str = "llama3"  # only Llama-3 frequency scaling is supported
    factor: float = 8.0  # wavelength stretch for low frequencies
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported (supported: 'llama3')")


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

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.params_dtype not in DTYPES:
            raise ValueError(f"model.params_dtype={self.params_dtype!r}; expected one of {', '.join(DTYPES)}")
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
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1  # only 1 is implemented today; stages cut between layer groups later
    seed: int = 1234
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("parallel sizes must be >= 1")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend={self.backend!r}; expected auto, nccl or gloo")


@dataclass
class DataConfig:
    task: Optional[str] = "arithmetic"  # built-in synthetic task (megatron_tlt.data.synthetic.TASKS), used when path is unset
    task_args: dict[str, int] = field(default_factory=dict)  # keyword arguments of the task's generator, e.g. max_terms
    path: Optional[str] = None  # jsonl / parquet prompt dataset
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    apply_chat_template: bool = True
    max_prompt_tokens: int = 256  # longer prompts are skipped and counted
    num_examples: int = 4096  # size of a synthetic task's training set
    eval_examples: int = 64  # held-out prompts for accuracy (synthetic task, or the file's last rows)
    tokenizer: Optional[str] = None  # tokenizer dir; default: the model dir, or a built-in test tokenizer for fresh models


@dataclass
class RolloutConfig:
    n: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    kv_cache_gb: float = 1.0  # KV-cache budget per rank
    spec: str = "off"  # off | chain | tree | adaptive (speculative decoding with the drafter)
    max_spec_batch: int = 32  # adaptive: live batches above this decode plainly
    cuda_graphs: str = "auto"  # auto (capture on GPU) | off | eager (static shapes, no capture) | capture

    def __post_init__(self):
        if self.spec in ("False", "false"):  # YAML reads a bare `off` as a boolean
            self.spec = "off"
        if self.spec not in ("off", "chain", "tree", "adaptive"):
            raise ValueError(f"rollout.spec={self.spec!r}; expected off, chain, tree or adaptive")
        if self.cuda_graphs in ("False", "false"):
            self.cuda_graphs = "off"
        if self.cuda_graphs not in ("auto", "off", "eager", "capture"):
            raise ValueError(f"rollout.cuda_graphs={self.cuda_graphs!r}; expected auto, off, eager or capture")


@dataclass
class DrafterConfig:
    path: Optional[str] = None  # warm-start drafter dir (`megatron-tlt train-drafter`); None = freshly initialised
    online: bool = True  # TLT: train the drafter on DP ranks that finished their rollouts (spot training)
    lr: float = 1e-4
    buffer_gb: float = 0.5  # online buffer of (tokens, target hidden states) per rank; oldest RL steps evicted first
    micro_batch_tokens: int = 2048  # tokens per drafter step (the unit of preemption)
    warmup_steps: int = 0  # offline drafter steps on the policy's own samples before RL (after the policy warm-up)
    warmup_prompts: int = 64  # training prompts the policy answers for the drafter warm-up


@dataclass
class RewardItem:
    name: str = "math"  # built-in (math, countdown, format) or a dotted path 'pkg.module:function'
    weight: float = 1.0


@dataclass
class RewardConfig:
    fns: list[RewardItem] = field(default_factory=lambda: [RewardItem()])
    num_workers: int = 2  # reward process pool; 0 = inline (no timeout)
    timeout_s: float = 10.0  # per call; a timeout or crash gives reward 0 and is counted


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # grpo | drgrpo | rloo
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO)
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_coef: float = 0.0  # k3 KL to a frozen copy of the initial policy; 0 = no reference model
    dynamic_sampling: bool = False  # drop groups with equal rewards and refill from the next prompts
    max_refill_rounds: int = 2
    overlong: str = "none"  # none | mask (truncated samples get no loss) | penalty (DAPO soft punishment)
    overlong_buffer: int = 32  # tokens before max_new_tokens where the penalty ramps up
    overlong_penalty: float = 1.0


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


@dataclass
class RunConfig:
    dir: str = "runs/grpo"  # run directory: checkpoints, metrics.jsonl, tensorboard, plots
    steps: int = 10  # RL steps
    prompts_per_step: int = 8
    model_path: Optional[str] = None  # HF dir or megatron_tlt checkpoint to start from; None = fresh model from `model`
    save_every: int = 0  # RL steps between checkpoints; 0 = only at the end
    eval_every: int = 0  # RL steps between held-out evaluations; 0 = only before and after
    resume: bool = False  # continue from the latest checkpoint in `dir`
    seed: int = 1234
    sft_steps: int = 0  # supervised warm-up on the synthetic task's worked solutions before RL (demo)
    sft_lr: float = 3e-3
    sft_batch: int = 32  # sequences per warm-up step
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb_project: Optional[str] = None  # log to wandb when installed and set


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
