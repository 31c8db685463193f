"""The policy: one decoder for the Llama-3, Qwen2/2.5 and Qwen3 families, tensor-parallel.

RMSNorm, RoPE (theta, Llama-3 scaling), GQA, SwiGLU, optional qkv bias (Qwen2) and q/k RMSNorm
(Qwen3), tied or untied embeddings. Plain PyTorch over the TP layers of `parallel.tensor_parallel`
(`TPLayers`: megatron-core's column / row linears and vocab embedding); the TP group is passed in
explicitly. Without autograd (rollouts) every matmul, the LM head's included, is `ops.linear.linear`,
the function FP8 rollouts replace. Layers live in a `ModuleDict` keyed by their global index, so a pipeline stage can hold any contiguous range (`layer_range`) with the same parameter names.
Parameter names follow Hugging Face's (`layers.3.self_attn.q_proj.weight`) without the `model.` prefix.

Three input modes of `hidden_states` (tokens always `[B, S]`, hidden `[B, S, H]`):
- dense:  `model.hidden_states(tokens)`                      causal attention over each full row;
- packed: `model.hidden_states(tokens[None], position_ids=pos[None], cu_seqlens=cu, max_seqlen=m)` (B = 1);
- cache:  `model.hidden_states(tokens, position_ids=pos, cache=CacheBatch(...))` prefill / decode / verify.
It returns the final normed hidden states (the LM head's input); `compute_logits(hidden)` applies the LM
head, and `model(tokens, **kw)` is the two in one (logits).

Two memory options act only with autograd on (training passes), never on the cache path:
- `model.set_recompute("selective" | "full", every=k)` (`optim.recompute`): activations recomputed in backward
  with `torch.utils.checkpoint` (non-reentrant). selective, as Megatron's: each layer's attention core (between
  q/k/v and o_proj) and MLP activation (silu(gate) * up); full: whole decoder layers, this stage's 0th, k-th,
  2k-th, ... The layers draw no random numbers, and a recomputed layer replays its TP collectives in the same
  order on every rank.
- `Policy(..., sequence_parallel=True)` (`parallel.sequence_parallel`, TP > 1, packed input): the residual
  stream and the layers' norms hold [T / tp, H], this rank's slice of the packed row (padded with one extra
  example of zeros to a multiple of tp); megatron-core's sequence-parallel linears all-gather it before q/k/v
  and gate/up, and reduce-scatter after o_proj and down_proj; the stage's output is gathered back to [1, T, H]
  (the final norm runs on it), so callers see the same tensors as without it. The norms' replicated weights get
  their gradients summed over TP in backward. Without autograd (rollouts) the row is not sharded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_tlt.config.schema import RECOMPUTE_MODES, ModelConfig
from megatron_tlt.models.kv_cache import CacheBatch
from megatron_tlt.ops.attention import cache_attention_mask, cached_attention, dense_causal_attention, packed_attention
from megatron_tlt.ops.linear import linear
from megatron_tlt.ops.rope import apply_rope, inverse_frequencies, rope_cos_sin
from megatron_tlt.parallel.sharding import full_shape, partition_dim, shard_of
from megatron_tlt.parallel.tensor_parallel import (
    TPLayers, copy_to_tp_region, gather_from_sp_region, gather_last_dim, scatter_to_sp_region,
)
from megatron_tlt.seeds import derive_seed

@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, out_std: float) -> None:
    """Initialise every parameter from its own name: weights of the full (unsharded) tensor drawn from a generator
    seeded by (seed, name), then this rank's shard kept, so a parameter gets the same values at any TP degree and
    on any pipeline stage. Normal(0, std) weights, `out_std` (Megatron's scaled std, `TPLayers.out_std`) for the
    output projections of the residual branches (row-parallel: o_proj, down_proj), zero biases, unit norm weights."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            g = torch.Generator().manual_seed(derive_seed(seed, name))
            full = torch.randn(full_shape(p, model.tp_size), generator=g) * (out_std if partition_dim(p) == 1 else std)
            p.copy_(shard_of(full, p, model.tp_group))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        # Set when each TP rank normalises a different shard (q/k heads, or the sequence under sequence
        # parallelism) with this replicated weight: its gradient is then summed over the TP group in backward.
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        summed = self.tp_group is not None and torch.is_grad_enabled()
        w = copy_to_tp_region(self.weight, group=self.tp_group) if summed else self.weight
        return w * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, b: TPLayers, cache_index: int):
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
        self.attention_backend = cfg.attention_backend  # packed attention's kernel (ops.attention.select_backend)
        self.recompute = False  # the attention core recomputed in backward (Policy.set_recompute)
        self.q_proj = b.linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.k_proj = b.linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.v_proj = b.linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, parallel="column", bias=cfg.qkv_bias)
        self.o_proj = b.linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, parallel="row")
        if cfg.qk_norm:
            head_shard_group = b.tp_group if b.tp_size > 1 else None
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype, tp_group=head_shard_group)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype, tp_group=head_shard_group)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache: Optional[CacheBatch] = None, cache_mask=None):
        # x: [B, S, H], or [S / tp, H] under sequence parallelism (the q/k/v projections gather the row); cos/sin: [B, S, D]
        B, S = cos.shape[:2]
        q = self.q_proj(x)[0]
        out_shape = q.shape  # o_proj's input: [B, S, heads * D], or [S, heads * D] under sequence parallelism
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x)[0].view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x)[0].view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.write(self.cache_index, k, v)  # [B, kv_len, Hkv, D]
            o = cached_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), cache_mask, self.scale, cache.invariant)
        elif self.recompute and torch.is_grad_enabled():
            o = checkpoint(self._core, q, k, v, cu_seqlens, max_seqlen, use_reentrant=False)
        else:
            o = self._core(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(o.reshape(out_shape))[0]

    def _core(self, q, k, v, cu_seqlens, max_seqlen):
        """The attention core without a cache: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]."""
        if cu_seqlens is None:
            return dense_causal_attention(q, k, v, self.scale)
        return packed_attention(q[0], k[0], v[0], cu_seqlens, max_seqlen, self.scale, self.attention_backend).unsqueeze(0)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, b: TPLayers):
        super().__init__()
        cfg = b.cfg
        self.gate_proj = b.linear(cfg.hidden_size, cfg.intermediate_size, parallel="column")
        self.up_proj = b.linear(cfg.hidden_size, cfg.intermediate_size, parallel="column")
        self.down_proj = b.linear(cfg.intermediate_size, cfg.hidden_size, parallel="row")
        self.recompute = False  # the activation recomputed in backward (Policy.set_recompute)

    def forward(self, x):
        gate, up = self.gate_proj(x)[0], self.up_proj(x)[0]
        if self.recompute and torch.is_grad_enabled():
            return self.down_proj(checkpoint(_swiglu, gate, up, use_reentrant=False))[0]
        return self.down_proj(_swiglu(gate, up))[0]


class DecoderLayer(nn.Module):
    def __init__(self, b: TPLayers, cache_index: int):
        super().__init__()
        cfg = b.cfg
        sequence_group = b.tp_group if b.sequence_parallel else None  # the norms see a sequence shard
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype, tp_group=sequence_group)
        self.self_attn = Attention(b, cache_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype, tp_group=sequence_group)
        self.mlp = MLP(b)
        self.recompute = False  # the whole layer recomputed in backward (Policy.set_recompute)

    def forward(self, x, cos, sin, **attn_kw):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class Policy(nn.Module):
    """Decoder-only LM. A pipeline stage is `Policy(cfg, tp_group, layer_range=(a, b), pre_process=..., post_process=...)`."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group,  # the TP group (`ParallelState.tp_group`); a group of one without TP
        *,
        layer_range: Optional[tuple[int, int]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        init_weights: bool = True,
        init_seed: Optional[int] = None,  # default: drawn from torch's global RNG (set_seed makes it the same everywhere)
        sequence_parallel: bool = False,  # with TP > 1: training passes shard the packed row over TP (module docstring)
    ):
        super().__init__()
        b = TPLayers(cfg, tp_group, init_weights=False, sequence_parallel=sequence_parallel)  # weights initialised below, per parameter name
        if cfg.padded_vocab_size % b.tp_size:
            raise ValueError(f"padded vocab size {cfg.padded_vocab_size} is not divisible by tensor_parallel_size={b.tp_size}")
        self.cfg, self.tp_group, self.tp_size = cfg, tp_group, b.tp_size
        self.sequence_parallel = b.sequence_parallel  # False at TP = 1
        self.pre_process, self.post_process = pre_process, post_process
        first, last = layer_range or (0, cfg.num_layers)
        self.layer_range = (first, last)
        # A last pipeline stage of a tied model holds its own copy of the embedding as the LM head, under the
        # embedding's name (so checkpoints and resharding see one tensor); the embedding group keeps the copies equal.
        tied_copy = cfg.tie_word_embeddings and post_process and not pre_process
        self.embed_tokens = b.embedding(cfg.padded_vocab_size, cfg.hidden_size) if pre_process or tied_copy else None
        if tied_copy:
            self.embed_tokens.weight.shared_embedding_copy = True  # counted once in the global gradient norm
        self.layers = nn.ModuleDict({str(i): DecoderLayer(b, i - first) for i in range(first, last)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype) if post_process else None
        self.lm_head = None
        if post_process and not cfg.tie_word_embeddings:
            self.lm_head = b.linear(cfg.hidden_size, cfg.padded_vocab_size, parallel="column")
        self.register_buffer("inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        if init_weights:
            seed = int(torch.randint(0, 2**62, ())) if init_seed is None else init_seed
            init_parameters(self, seed, b.std, b.out_std)

    def set_recompute(self, mode: str, every: int = 1) -> None:
        """Activation recomputation of training passes (`optim.recompute`, `optim.recompute_every`): "none",
        "selective" (every layer's attention core and MLP activation) or "full" (the decoder layers whose index
        within this stage is a multiple of `every`)."""
        if mode not in RECOMPUTE_MODES or every < 1:
            raise ValueError(f"recompute={mode!r}, every={every}: expected one of {RECOMPUTE_MODES} and every >= 1")
        for j, layer in enumerate(self.layers.values()):
            layer.recompute = mode == "full" and j % every == 0
            layer.self_attn.recompute = layer.mlp.recompute = mode == "selective"

    # ---- pieces the trainer, the engine and the drafter use directly ----
    def output_weight(self) -> torch.Tensor:
        """[V_local, H] this rank's shard of the LM head (the embedding when tied)."""
        return self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] -> [B, S, H]."""
        return self.embed_tokens(tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, H] final normed hidden states -> logits [B, S, vocab_size], the same on every TP rank."""
        x = copy_to_tp_region(hidden, group=self.tp_group) if self.tp_size > 1 else hidden
        logits = gather_last_dim(linear(x, self.output_weight()), self.tp_group)  # [B, S, V_padded]
        return logits[..., : self.cfg.vocab_size]

    def hidden_states(
        self,
        tokens: Optional[torch.Tensor] = None,  # [B, S] (first stage)
        *,
        hidden: Optional[torch.Tensor] = None,  # [B, S, H] input of a later pipeline stage
        position_ids: Optional[torch.Tensor] = None,  # [B, S]; default: arange per row (after cache.start)
        cu_seqlens: Optional[torch.Tensor] = None,  # [N+1] packed mode (B must be 1)
        max_seqlen: Optional[int] = None,
        cache: Optional[CacheBatch] = None,
        feature_layers: Optional[Sequence[int]] = None,  # layer indices whose outputs the EAGLE-3 drafter reads
    ):
        """This stage's layers: [B, S, H] the final normed hidden states (the LM head's input) on the last
        stage, the residual stream for the next stage otherwise.

        With `feature_layers`: (hidden [B, S, H], features [B, S, 3H]), the residual stream after each of those
        layers (detached: it feeds the drafter, never a gradient), concatenated in the order given: the target
        features of an EAGLE-3 drafter at no extra forward. A pipeline stage fills the slots of its own layers and
        leaves the others zero (`trainer.schedule` adds the stages' slots up as the activations pass down)."""
        x = self.embed(tokens) if self.pre_process else hidden
        B, S = x.shape[:2]
        if position_ids is None:
            start = cache.start.unsqueeze(1) if cache is not None else 0
            position_ids = (start + torch.arange(S, device=x.device)).expand(B, S)
        if cu_seqlens is not None and B != 1:
            raise ValueError("packed input must have batch size 1: tokens [1, T]")
        sequence_parallel = self.sequence_parallel and torch.is_grad_enabled()
        if sequence_parallel:
            x, position_ids, cu_seqlens, max_seqlen = self._shard_sequence(x, position_ids, cu_seqlens, max_seqlen)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        cache_mask = cache_attention_mask(cache.start, S, cache.kv_len, cache.new_mask) if cache is not None else None
        kw = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, cache_mask=cache_mask)
        recompute = torch.is_grad_enabled() and cache is None
        captured: dict[int, torch.Tensor] = {}
        for i, layer in self.layers.items():
            if layer.recompute and recompute:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False, **kw)
            else:
                x = layer(x, cos, sin, **kw)
            if feature_layers is not None and int(i) in feature_layers:
                captured[int(i)] = x.detach()
        if sequence_parallel:
            x = gather_from_sp_region(x, self.tp_group)[None, :S]  # [1, T, H], the padding dropped
            captured = {i: gather_from_sp_region(c, self.tp_group)[None, :S] for i, c in captured.items()}
        out = self.norm(x) if self.post_process else x
        if feature_layers is None:
            return out
        slots = [captured[i] if i in captured else torch.zeros_like(x) for i in feature_layers]
        return out, torch.cat(slots, dim=-1)  # [B, S, 3H]

    def _shard_sequence(self, x, position_ids, cu_seqlens, max_seqlen):
        """Sequence parallelism's entry: the packed row x [1, T, H] padded to a multiple of tp with one extra
        example (zeros at positions 0), then this rank's [T_pad / tp, H]; the padded row's positions [1, T_pad],
        cu_seqlens and max_seqlen."""
        if cu_seqlens is None:
            raise ValueError("sequence parallelism trains on packed input: with autograd on, pass cu_seqlens")
        T = x.shape[1]
        pad = -T % self.tp_size
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            position_ids = F.pad(position_ids, (0, pad))
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), T + pad)])
            max_seqlen = None if max_seqlen is None else max(max_seqlen, pad)
        return scatter_to_sp_region(x[0], self.tp_group), position_ids, cu_seqlens, max_seqlen

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab_size] (the whole model); `kw` as `hidden_states`'."""
        return self.compute_logits(self.hidden_states(tokens, **kw))
