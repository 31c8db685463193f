"""The policy: one decoder for the Llama-3, Qwen2/2.5 and Qwen3 families, tensor-parallel.

RMSNorm, RoPE (theta, Llama-3 scaling), GQA, SwiGLU, optional qkv bias (Qwen2) and q/k RMSNorm
(Qwen3), tied or untied embeddings. Linears and the embedding are megatron-core's TP layers; the TP
group is passed in explicitly. Every linear is built by `make_linear`, the one seam where an FP8 /
Transformer Engine path can replace the layers; without autograd (rollouts) every matmul, the LM
head's included, is `ops.linear.linear`, the function FP8 rollouts replace. Layers live in a `ModuleDict` keyed by their global
index, so a pipeline stage can hold any contiguous range (`layer_range`) with the same parameter names.
Parameter names follow Hugging Face's (`layers.3.self_attn.q_proj.weight`) without the `model.` prefix.

Three input modes, one forward (tokens always `[B, S]`, hidden `[B, S, H]`):
- dense:  `model(tokens)`                                   causal attention over each full row;
- packed: `model(tokens[None], position_ids=pos[None], cu_seqlens=cu, max_seqlen=m)` (B = 1);
- cache:  `model(tokens, position_ids=pos, cache=CacheBatch(...))` prefill / decode / verify.
The final (normed) hidden states, the LM head's input, come back with `return_hidden=True` at no cost.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.models.kv_cache import CacheBatch
from megatron_tlt.ops.attention import cache_attention_mask, cached_attention, dense_causal_attention, packed_attention
from megatron_tlt.ops.linear import linear
from megatron_tlt.ops.rope import apply_rope, inverse_frequencies, rope_cos_sin

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _group_size(group) -> int:
    return torch.distributed.get_world_size(group)


class _GatherLastDim(torch.autograd.Function):
    """All-gather TP shards along the last dim on any device (megatron-core's gather allocates on CUDA).
    Backward keeps this rank's slice, as megatron-core's does: what consumes the output is replicated."""

    @staticmethod
    def forward(ctx, x, group):
        # x: [..., V_local] -> [..., V_local * tp_size]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        # grad: [..., V_local * tp_size] -> [..., V_local]
        size, rank = torch.distributed.get_world_size(ctx.group), torch.distributed.get_rank(ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        # Set when each TP rank normalises a different shard (q/k heads) with this replicated weight:
        # its gradient is then summed over the TP group in backward.
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight if self.tp_group is None else tensor_parallel.copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        return w * h.to(x.dtype)


def _needs_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear (output sharded over TP). Without autograd (rollouts, no-grad
    logprob passes) the same maths as one `ops.linear.linear` on the local shard, skipping megatron's
    per-call autograd Function (about a fifth of a small model's decode step on CPU)."""

    def forward(self, x: torch.Tensor):
        if _needs_autograd(self, x):
            return super().forward(x)
        return linear(x, self.weight, self.bias), None


class RowLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear (input sharded, output all-reduced over TP); inference fast path
    as `ColumnLinear`'s."""

    def forward(self, x: torch.Tensor):
        if _needs_autograd(self, x):
            return super().forward(x)
        y = linear(x, self.weight)
        if _group_size(self.tp_group) > 1:
            torch.distributed.all_reduce(y, group=self.tp_group)
        return (y if self.bias is None else y + self.bias), None


class _Builder:
    """Everything a layer needs to build its TP linears: megatron config, init, group."""

    def __init__(self, cfg: ModelConfig, tp_group, init_weights: bool):
        if tp_group is None:
            # megatron-core's layers fall back to the global TP group; make that explicit here.
            from megatron_tlt.parallel import get_parallel_state

            tp_group = get_parallel_state().tp_group
        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size = _group_size(tp_group)
        self.dtype = DTYPE[cfg.params_dtype]
        self.mp_config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,  # the full weight is initialised then split: same weights at any TP
            perform_initialization=init_weights,
            params_dtype=self.dtype,
        )
        std = cfg.init_std
        self.init_method = lambda w: nn.init.normal_(w, mean=0.0, std=std)
        # Megatron's scaled init for output projections of residual branches.
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        self.out_init_method = lambda w: nn.init.normal_(w, mean=0.0, std=out_std)

    def make_linear(self, in_features: int, out_features: int, *, parallel: str, bias: bool = False, **kw) -> nn.Module:
        """The one place linears are built. parallel: 'column' (output sharded) or 'row' (input sharded)."""
        if parallel == "column":
            return self.mark_sharded(ColumnLinear(
                in_features, out_features, config=self.mp_config, init_method=self.init_method,
                bias=bias, gather_output=False, tp_group=self.tp_group, **kw,
            ), dim=0)
        return self.mark_sharded(RowLinear(
            in_features, out_features, config=self.mp_config, init_method=self.out_init_method,
            bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group, **kw,
        ), dim=1)

    def mark_sharded(self, module: nn.Module, dim: int) -> nn.Module:
        """megatron-core tags a weight as TP-sharded (`partition_dim`) only when it initialises it; tag it
        when it does not (init_weights=False), or sharding code would take the shard for the full tensor."""
        if not hasattr(module.weight, "partition_dim"):
            tensor_parallel.set_tensor_model_parallel_attributes(module.weight, True, dim, 1)
        return module


class Attention(nn.Module):
    def __init__(self, b: _Builder, cache_index: int):
        super().__init__()
        cfg = b.cfg
        if cfg.num_kv_heads % b.tp_size or cfg.num_attention_heads % b.tp_size:
            raise ValueError(
                f"tensor_parallel_size={b.tp_size} must divide num_attention_heads={cfg.num_attention_heads} "
                f"and num_kv_heads={cfg.num_kv_heads}"
            )
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // b.tp_size
        self.num_kv_heads = cfg.num_kv_heads // b.tp_size
        self.scale = cfg.head_dim**-0.5
        self.cache_index = cache_index  # position of this layer in a stage-local KV cache
        self.q_proj = b.make_linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.k_proj = b.make_linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.v_proj = b.make_linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.o_proj = b.make_linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, parallel="row")
        if cfg.qk_norm:
            head_shard_group = b.tp_group if b.tp_size > 1 else None
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype, tp_group=head_shard_group)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype, tp_group=head_shard_group)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache: Optional[CacheBatch] = None, cache_mask=None):
        # x: [B, S, H]; cos/sin: [B, S, D]
        B, S, _ = x.shape
        q = self.q_proj(x)[0].view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x)[0].view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x)[0].view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.write(self.cache_index, k, v)  # [B, kv_len, Hkv, D]
            o = cached_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), cache_mask, self.scale)
        elif cu_seqlens is not None:
            o = packed_attention(q[0], k[0], v[0], cu_seqlens, max_seqlen, self.scale).unsqueeze(0)
        else:
            o = dense_causal_attention(q, k, v, self.scale)
        return self.o_proj(o.reshape(B, S, self.num_heads * self.head_dim))[0]


class MLP(nn.Module):
    def __init__(self, b: _Builder):
        super().__init__()
        cfg = b.cfg
        self.gate_proj = b.make_linear(cfg.hidden_size, cfg.intermediate_size, parallel="column")
        self.up_proj = b.make_linear(cfg.hidden_size, cfg.intermediate_size, parallel="column")
        self.down_proj = b.make_linear(cfg.intermediate_size, cfg.hidden_size, parallel="row")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class DecoderLayer(nn.Module):
    def __init__(self, b: _Builder, cache_index: int):
        super().__init__()
        cfg = b.cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype)
        self.self_attn = Attention(b, cache_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype)
        self.mlp = MLP(b)

    def forward(self, x, cos, sin, **attn_kw):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class Policy(nn.Module):
    """Decoder-only LM. A pipeline stage is `Policy(cfg, layer_range=(a, b), pre_process=..., post_process=...)`."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group=None,  # None: the TP group of megatron_tlt.parallel.init_parallel()
        *,
        layer_range: Optional[tuple[int, int]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        init_weights: bool = True,
    ):
        super().__init__()
        b = _Builder(cfg, tp_group, init_weights)
        tp_group = b.tp_group
        if cfg.padded_vocab_size % b.tp_size:
            raise ValueError(f"padded vocab size {cfg.padded_vocab_size} is not divisible by tensor_parallel_size={b.tp_size}")
        self.cfg, self.tp_group, self.tp_size = cfg, tp_group, b.tp_size
        self.pre_process, self.post_process = pre_process, post_process
        first, last = layer_range or (0, cfg.num_layers)
        self.layer_range = (first, last)
        self.embed_tokens = (
            b.mark_sharded(tensor_parallel.VocabParallelEmbedding(
                cfg.padded_vocab_size, cfg.hidden_size, init_method=b.init_method, config=b.mp_config, tp_group=tp_group
            ), dim=0)
            if pre_process
            else None
        )
        self.layers = nn.ModuleDict({str(i): DecoderLayer(b, i - first) for i in range(first, last)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype) if post_process else None
        self.lm_head = None
        if post_process and not (cfg.tie_word_embeddings and pre_process):
            self.lm_head = b.make_linear(cfg.hidden_size, cfg.padded_vocab_size, parallel="column")
        if cfg.tie_word_embeddings and not pre_process and post_process:
            raise NotImplementedError("tied embeddings across pipeline stages are not implemented yet")
        self.register_buffer("inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    # ---- pieces the trainer, the engine and the drafter use directly ----
    def output_weight(self) -> torch.Tensor:
        """[V_local, H] this rank's shard of the LM head (the embedding when tied)."""
        return self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight

    @property
    def vocab_start(self) -> int:
        return torch.distributed.get_rank(self.tp_group) * (self.cfg.padded_vocab_size // self.tp_size) if self.tp_size > 1 else 0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] -> [B, S, H]."""
        return self.embed_tokens(tokens)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """hidden: [B, S, H] -> logits [B, S, vocab_size] (gather=True) or this rank's [B, S, V_local] with
        padding columns at -inf (gather=False)."""
        w = self.output_weight()
        x = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group) if self.tp_size > 1 else hidden
        logits = linear(x, w)  # [B, S, V_local]
        if gather:
            if self.tp_size > 1:
                logits = _GatherLastDim.apply(logits, self.tp_group)  # [B, S, V_padded]
            return logits[..., : self.cfg.vocab_size]
        pad_from = self.cfg.vocab_size - self.vocab_start
        if pad_from < logits.shape[-1]:
            logits = logits.clone()
            logits[..., max(pad_from, 0):] = float("-inf")
        return logits

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,  # [B, S] (first stage)
        *,
        hidden: Optional[torch.Tensor] = None,  # [B, S, H] input of a later pipeline stage
        position_ids: Optional[torch.Tensor] = None,  # [B, S]; default: arange per row (after cache.start)
        cu_seqlens: Optional[torch.Tensor] = None,  # [N+1] packed mode (B must be 1)
        max_seqlen: Optional[int] = None,
        cache: Optional[CacheBatch] = None,
        return_hidden: bool = False,  # also return the normed final hidden states [B, S, H]
        with_logits: bool = True,  # False: return only the hidden states (e.g. for the chunked logprob op)
        gather_logits: bool = True,
    ):
        x = self.embed(tokens) if self.pre_process else hidden
        B, S = x.shape[:2]
        if position_ids is None:
            start = cache.start.unsqueeze(1) if cache is not None else 0
            position_ids = (start + torch.arange(S, device=x.device)).expand(B, S)
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError("packed input must have batch size 1: tokens [1, T]")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        cache_mask = cache_attention_mask(cache.start, S, cache.kv_len, cache.new_mask) if cache is not None else None
        for layer in self.layers.values():
            x = layer(x, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, cache_mask=cache_mask)
        if not self.post_process:
            return x
        h = self.norm(x)
        if not with_logits:
            return h
        logits = self.compute_logits(h, gather=gather_logits)
        return (logits, h) if return_hidden else logits
