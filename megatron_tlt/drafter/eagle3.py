"""EAGLE-3 drafter head: fused low / middle / high target features, one decoder layer, trained with training-time test.

What: `Eagle3Drafter(policy, feature_layers)` is the head SGLang's and vLLM's `LlamaForCausalLMEagle3` serve
(drafter/io.py exports it; its docstring records the loaders read). The target's residual stream after three
of its layers (`feature_layers`, low / middle / high) is concatenated into F_t [3H] and fused by fc(3H -> H);
one decoder layer, a plain Llama layer whatever the policy's family (no qkv bias, no q/k norm, as the servers
build it), attends over [input_layernorm(embed(token)); hidden_norm(h)] (2H -> q/k/v) with h as its
residual; then its own final RMSNorm and the policy's LM head:

    h   = fc(F_t)                          at a target position (the input's width is 3H)
        | g                                at a draft position: the drafter's own pre-norm output fed back (width H)
    x   = [input_layernorm(embed(x_{t+1})); hidden_norm(h)]                    [2H]
    a   = h + o_proj(attention(q/k/v_proj(x)))
    g   = a + mlp(post_attention_layernorm(a))                                 the output, fed back as the next h
    logits = lm_head(norm(g))                                                  the policy's head, its vocabulary,
                                                                               or an own head over a draft vocabulary

Draft vocabulary (optional, `draft_vocab`: the target ids it keeps, e.g. `frequent_tokens` of the training
data, as EAGLE-3 / SpecForge choose it): an own LM head [Vd, H] (replicated over TP; initialised from the
policy's rows of those tokens, then trained), and `compute_logits` puts its logits at those target ids, -inf
elsewhere, so drafts only ever propose kept tokens and verification stays exact; exported with EAGLE-3's
maps d2t (target_id = draft_id + d2t[draft_id]) and t2d (drafter/io.py). Without it the head is the policy's.

Alignment is the EAGLE one (drafter/model.py): position t consumes (x_{t+1}, F_t) at position id t and its
logits predict x_{t+2}; a draft node with token y whose parent's output is g runs (y, g) at the parent's
position + 1. `forward` tells the two inputs apart by width (3H: target features, fused by fc; H: a drafter
output), as SGLang's `LlamaModel.forward` does, so the rollout engine (rollout/spec/drafting.py) drives both
heads through one interface: `forward(tokens, hidden, position_ids, cache=...)` -> g, `compute_logits(g)`.

Why: EAGLE-3 (Li et al., 2025) replaces EAGLE-1's top-layer feature regression by a token loss on fused
multi-layer features and trains with training-time test (`unroll`, used by `loss.ttt_loss`): the head is run
k steps on its own outputs, so deep drafts see at training what they see at inference.

Training-time test (`unroll`): step j = 0 .. k-1 over a packed micro-batch; entry t of step j stands for the
j-th draft after a root at t: it consumes (x_{t+1+j}, g^{j-1}_t) (step 0: F_t) at position id t+j and
attends to the step-0 entries 0 .. t of its own example (the committed prefix in the drafter's KV cache)
plus its own entries of steps 1 .. j (its chain of drafts), exactly what draft level j sees in
`spec.drafting.draft_tree` (tests/test_drafter_eagle3.py checks the two agree). The attention core is
dense per example and step: [heads, L, L] fp32 scores plus j diagonal columns (0.5 GB for one L = 2048
example at 32 heads); the drafter's micro-batches bound L.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.models.transformer import MLP, Attention, Policy, RMSNorm
from megatron_tlt.ops.attention import cache_attention_mask
from megatron_tlt.ops.rope import apply_rope, rope_cos_sin
from megatron_tlt.parallel.tensor_parallel import TPLayers, scatter_to_tp_region


def frequent_tokens(sequences: Sequence[Sequence[int]], size: int, vocab_size: int) -> list[int]:
    """The `size` most frequent token ids of `sequences` (ties: the smaller id; unseen ids fill up), sorted: a draft
    vocabulary."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens must be in [1, {vocab_size}]")
    counts = torch.bincount(torch.tensor([t for s in sequences for t in s], dtype=torch.long), minlength=vocab_size)
    order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))
    return sorted(order[:size])


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """The target layers (indices of decoder layers whose output is read) both servers capture by default:
    SGLang's `set_eagle3_layers_to_capture(None)` and vLLM's `get_eagle3_aux_hidden_state_layers` take the
    inputs of layers (2, N // 2, N - 3), i.e. the outputs of (1, N // 2 - 1, N - 4). Models too shallow for
    three distinct ones (N < 7) get (0, (N - 1) // 2, N - 1)."""
    if num_layers >= 7:
        return 1, num_layers // 2 - 1, num_layers - 4
    return 0, (num_layers - 1) // 2, num_layers - 1


class Eagle3Layer(nn.Module):
    """The one decoder layer: parameter names as SGLang's `midlayer` (`input_layernorm` on the embedding,
    `hidden_norm` on h, q/k/v over 2H)."""

    def __init__(self, b: TPLayers):
        super().__init__()
        cfg = b.cfg
        H = cfg.hidden_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps, b.dtype)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps, b.dtype)
        self.self_attn = Attention(b, cache_index=0)
        for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_kv_heads), ("v_proj", cfg.num_kv_heads)):
            setattr(self.self_attn, name, b.linear(2 * H, heads * cfg.head_dim, parallel="column"))
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps, b.dtype)
        self.mlp = MLP(b)

    def attention_input(self, embeds: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """embeds, h: [B, S, H] -> [B, S, 2H]."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(h)], dim=-1)

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual adds and the MLP after the attention: -> g [B, S, H]."""
        a = h + attn_out
        return a + self.mlp(self.post_attention_layernorm(a))

    def forward(self, embeds, h, cos, sin, **attn_kw) -> torch.Tensor:
        return self.finish(h, self.self_attn(self.attention_input(embeds, h), cos, sin, **attn_kw))


class Eagle3Drafter(nn.Module):
    arch = "eagle3"

    def __init__(self, policy: Policy, feature_layers: Optional[Sequence[int]] = None, init_weights: bool = True,
                 draft_vocab: Optional[Sequence[int]] = None):
        super().__init__()
        if policy.embed_tokens is None or not policy.post_process:
            raise ValueError("the drafter shares the embedding and the LM head: it needs a policy stage holding both")
        num_layers = policy.cfg.num_layers
        feature_layers = tuple(default_feature_layers(num_layers) if feature_layers is None else feature_layers)
        if len(feature_layers) != 3 or not all(0 <= i < num_layers for i in feature_layers):
            raise ValueError(f"feature_layers must be 3 layer indices in [0, {num_layers}), got {list(feature_layers)}")
        cfg = dataclasses.replace(policy.cfg, qkv_bias=False, qk_norm=False)  # a plain Llama layer, as served
        b = TPLayers(cfg, policy.tp_group, init_weights)
        object.__setattr__(self, "policy", policy)  # a plain reference: not a submodule, not in state_dict()
        self.cfg, self.tp_group, self.tp_size = cfg, b.tp_group, b.tp_size
        self.feature_layers = feature_layers
        self.feature_size = 3 * cfg.hidden_size  # width of the target features the engine and the buffer hold
        # Row-parallel: each TP rank multiplies its slice of the (replicated) 3H input; the output is all-reduced.
        self.fc = b.linear(3 * cfg.hidden_size, cfg.hidden_size, parallel="row")
        self.midlayer = Eagle3Layer(b)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype)
        self.lm_head = None
        self.register_buffer("draft_ids", None, persistent=False)  # [Vd] target ids (saved by drafter/io.py)
        if draft_vocab is not None:
            ids = torch.tensor(sorted(set(draft_vocab)), dtype=torch.long)
            if len(ids) != len(draft_vocab) or not 0 <= int(ids[0]) <= int(ids[-1]) < cfg.vocab_size:
                raise ValueError(f"draft_vocab must be distinct token ids in [0, {cfg.vocab_size})")
            self.draft_ids = ids
            self.lm_head = nn.Linear(cfg.hidden_size, len(ids), bias=False, dtype=b.dtype)  # [Vd, H], replicated over TP
            if init_weights:
                with torch.no_grad():
                    self.lm_head.weight.copy_(_policy_rows(policy, ids))

    def embed_input_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] -> [B, S, H] with the policy's embedding."""
        return self.policy.embed(tokens)

    def project_hidden_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, 3H] target features -> fc(.) [B, S, H]; [B, S, H] drafter outputs pass unchanged."""
        H = self.cfg.hidden_size
        if hidden.shape[-1] == H:
            return hidden
        if hidden.shape[-1] != self.feature_size:
            raise ValueError(f"hidden must be [.., {self.feature_size}] target features or [.., {H}] drafter outputs, "
                             f"got width {hidden.shape[-1]}")
        x = hidden.to(self.fc.weight.dtype)
        if self.tp_size > 1:
            x = scatter_to_tp_region(x, group=self.tp_group)  # [B, S, 3H/tp]
        return self.fc(x)[0]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S] x_{t+1}
        hidden: torch.Tensor,  # [B, S, 3H] target features F_t, or [B, S, H] drafter outputs standing in for them
        position_ids: torch.Tensor,  # [B, S] t
        cache: Optional[CacheBatch] = None,  # over `new_cache()`
        cu_seqlens: Optional[torch.Tensor] = None,  # [N+1] packed mode (B must be 1)
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:  # [B, S, H] g_t, pre-norm (fed back as the next draft's hidden)
        h = self.project_hidden_states(hidden)
        embeds = self.embed_input_ids(tokens).to(h.dtype)
        B, S = tokens.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError("packed input must have batch size 1: tokens [1, T]")
        cos, sin = rope_cos_sin(position_ids, self.policy.inv_freq, h.dtype)  # [B, S, D]
        cache_mask = cache_attention_mask(cache.start, S, cache.kv_len, cache.new_mask) if cache is not None else None
        return self.midlayer(embeds, h, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, cache_mask=cache_mask)

    def vocab_logits(self, g: torch.Tensor) -> torch.Tensor:
        """g: [B, S, H] drafter outputs -> logits over the drafter's vocabulary [B, S, Vd] (the policy's: V)."""
        if self.lm_head is None:
            return self.policy.compute_logits(self.norm(g))
        return self.lm_head(self.norm(g))

    def compute_logits(self, g: torch.Tensor) -> torch.Tensor:
        """g: [B, S, H] drafter outputs -> logits [B, S, vocab_size] over the target's vocabulary (-inf at tokens
        outside a draft vocabulary)."""
        logits = self.vocab_logits(g)
        if self.draft_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
        full[..., self.draft_ids] = logits
        return full

    def new_cache(self, num_slots: int, max_seq_len: int, dtype: torch.dtype, device) -> KVCache:
        """The drafter's own KV cache: one layer, this rank's KV heads."""
        return KVCache.for_model(self.cfg, self.tp_size, num_slots, max_seq_len, dtype, device, num_layers=1)

    def unroll(
        self,
        tokens: torch.Tensor,  # [k, T] step j's input tokens x_{t+1+j} (anything where unused)
        features: torch.Tensor,  # [T, 3H] the target features F_t
        position_ids: torch.Tensor,  # [T] t, restarting at 0 per example
        cu_seqlens: torch.Tensor,  # [N+1] example boundaries
    ) -> list[torch.Tensor]:
        """Training-time test over one packed micro-batch (module docstring): -> [g^0, .., g^{k-1}], each [T, H]."""
        attn = self.midlayer.self_attn
        T = tokens.shape[1]
        bounds = cu_seqlens.tolist()
        h = self.project_hidden_states(features[None])  # [1, T, H]
        keys: list[torch.Tensor] = []  # per step [T, Hkv, D]
        values: list[torch.Tensor] = []
        outputs = []
        for j in range(tokens.shape[0]):
            x = self.midlayer.attention_input(self.embed_input_ids(tokens[j][None]).to(h.dtype), h)  # [1, T, 2H]
            cos, sin = rope_cos_sin((position_ids + j)[None], self.policy.inv_freq, h.dtype)
            q = apply_rope(attn.q_proj(x)[0].view(1, T, attn.num_heads, attn.head_dim), cos, sin)[0]  # [T, Hq, D]
            keys.append(apply_rope(attn.k_proj(x)[0].view(1, T, attn.num_kv_heads, attn.head_dim), cos, sin)[0])
            values.append(attn.v_proj(x)[0].view(T, attn.num_kv_heads, attn.head_dim))
            o = torch.cat([_ttt_attention(q[a:b], [k[a:b] for k in keys], [v[a:b] for v in values], attn.scale)
                           for a, b in zip(bounds[:-1], bounds[1:])])  # [T, Hq, D], each example on its own
            h = self.midlayer.finish(h, attn.o_proj(o.reshape(1, T, -1))[0])  # [1, T, H]
            outputs.append(h[0])
        return outputs


@torch.no_grad()
def _policy_rows(policy: Policy, ids: torch.Tensor) -> torch.Tensor:
    """The policy's LM-head rows of target ids [Vd] -> [Vd, H] (gathered over its vocabulary shards under TP)."""
    eye = torch.eye(policy.cfg.hidden_size, dtype=policy.output_weight().dtype, device=policy.inv_freq.device)
    return policy.compute_logits(eye[None])[0][:, ids.to(eye.device)].T.cpu()  # row v of W: logits of the basis vectors


def _ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """One example: q [L, Hq, D]; keys / values of steps 0 .. j, each [L, Hkv, D] -> [L, Hq, D]. Query t attends
    to step 0's keys 0 .. t and to its own key of every later step (fp32 softmax)."""
    T, Hq, D = q.shape
    prefix = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [L, L] query t sees key t' <= t
    rep = Hq // keys[0].shape[1]
    qf = q.float()
    k = [kk.float().repeat_interleave(rep, dim=1) for kk in keys]  # [T, Hq, D] each
    v = [vv.float().repeat_interleave(rep, dim=1) for vv in values]
    scores0 = torch.einsum("thd,shd->hts", qf, k[0]) * scale  # [Hq, T, T]
    scores0 = scores0.masked_fill(~prefix, float("-inf"))
    diag = [(qf * kk).sum(-1).T[..., None] * scale for kk in k[1:]]  # [Hq, T, 1] each
    probs = torch.cat([scores0, *diag], dim=-1).softmax(dim=-1)  # [Hq, T, T + j]
    out = torch.einsum("hts,shd->thd", probs[..., :T], v[0])
    for i, vv in enumerate(v[1:]):
        out = out + probs[..., T + i].T[..., None] * vv
    return out.to(q.dtype)
