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
class DemoConfig:
    out_dir: str = "runs/demo"  # run directory (checkpoints, metrics)
    steps: int = 30  # supervised steps on the synthetic task
    lr: float = 3e-3
    micro_batch_tokens: int = 512  # packing budget per micro-batch
    num_examples: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
