"""EAGLE-style drafter head: one decoder layer over [embed(token); target hidden], on the policy's vocabulary.

What: `Drafter(policy)` predicts the policy's next hidden state from the current token and the
policy's own hidden state: fc(2H -> H) over the concatenation, one `DecoderLayer` (the policy's
config and TP group), then an RMSNorm of its own, then the policy's LM head. The policy's embedding and
LM head are shared, not copied: the drafter holds a plain reference to the policy that is not a
registered submodule, so `drafter.parameters()` / `state_dict()` hold only the drafter's own weights
(`fc`, `layer`, `norm`) and the drafter follows the policy's weight updates for free.

Why: TLT trains this drafter during RL on otherwise idle ranks; one layer keeps drafting cheap, and
sharing the vocabulary projection keeps it small and tied to the current policy. The own final norm
(EAGLE-1 has none) puts the drafter's output in the space of the policy's final *normed* hidden state,
the LM head's input, so the output can be fed back in place of a target hidden state and regressed
onto the next one.

Alignment (EAGLE; the engine and the drafter trainer both rely on it). Let x_0..x_L be a row's
tokens and f_t the policy's final normed hidden state at position t (`Policy.hidden_states`),
the LM-head input that predicts x_{t+1}. Drafter position t consumes (x_{t+1}, f_t) at position id t
and returns g_t, an estimate of f_{t+1}; `compute_logits(g_t)` predicts x_{t+2}:

    training on a row:  tokens = x[1 : L+1], target_hidden = f[0 : L], position_ids = 0 .. L-1
                        logits at t -> label x[t+2] (the last position has none); g_t -> regress f[t+1]
    drafting:           with f_T the newest target hidden and x_{T+1} the newest committed token (the
                        tree root), position T consumes (x_{T+1}, f_T) and g_T gives the root's q; a draft
                        node with token y whose parent's drafter output is g runs (y, g) at the parent's
                        position + 1.

Input modes, as in `Policy.forward`: dense (causal over each row), packed (`cu_seqlens`, B = 1,
position ids restarting per example) and KV cache (`CacheBatch` over `new_cache()`, tree `new_mask`).
Train with the policy frozen (`policy.requires_grad_(False)`): the shared embedding and LM head are
the policy's parameters, so otherwise their gradients would accumulate in the policy's `.grad`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.config.schema import DRAFTER_ARCHS
from megatron_tlt.drafter.eagle3 import Eagle3Drafter
from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.models.transformer import DecoderLayer, Policy, RMSNorm
from megatron_tlt.ops.attention import cache_attention_mask
from megatron_tlt.ops.rope import rope_cos_sin
from megatron_tlt.parallel.tensor_parallel import TPLayers, scatter_to_tp_region


class Drafter(nn.Module):
    arch = "eagle"
    feature_layers = None  # reads the policy's final hidden states, no intermediate layers (cf. drafter/eagle3.py)
    draft_ids = None  # the policy's whole vocabulary

    def __init__(self, policy: Policy, init_weights: bool = True):
        super().__init__()
        if policy.embed_tokens is None or not policy.post_process:
            raise ValueError("the drafter shares the embedding and the LM head: it needs a policy stage holding both")
        cfg = policy.cfg
        b = TPLayers(cfg, policy.tp_group, init_weights)
        object.__setattr__(self, "policy", policy)  # a plain reference: not a submodule, not in state_dict()
        self.cfg, self.tp_group, self.tp_size = cfg, b.tp_group, b.tp_size
        # Row-parallel: each TP rank multiplies its slice of the (replicated) 2H input; the output is all-reduced.
        self.fc = b.linear(2 * cfg.hidden_size, cfg.hidden_size, parallel="row")
        self.layer = DecoderLayer(b, cache_index=0)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, b.dtype)

    def embed_input_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] -> [B, S, H] with the policy's embedding."""
        return self.policy.embed(tokens)

    def project_hidden_states(self, embeds: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
        """embeds, target_hidden: [B, S, H] -> [B, S, H] = fc([embeds; target_hidden])."""
        x = torch.cat([embeds, target_hidden.to(embeds.dtype)], dim=-1)  # [B, S, 2H]
        if self.tp_size > 1:
            x = scatter_to_tp_region(x, group=self.tp_group)  # [B, S, 2H/tp]
        return self.fc(x)[0]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S] x_{t+1}
        target_hidden: torch.Tensor,  # [B, S, H] f_t (or a drafter output standing in for it)
        position_ids: torch.Tensor,  # [B, S] t
        cache: Optional[CacheBatch] = None,  # over `new_cache()`
        cu_seqlens: Optional[torch.Tensor] = None,  # [N+1] packed mode (B must be 1)
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:  # [B, S, H] g_t, in the space of the policy's final normed hidden states
        x = self.project_hidden_states(self.embed_input_ids(tokens), target_hidden)  # [B, S, H]
        B, S = tokens.shape
        if cu_seqlens is not None and B != 1:
            raise ValueError("packed input must have batch size 1: tokens [1, T]")
        cos, sin = rope_cos_sin(position_ids, self.policy.inv_freq, x.dtype)  # [B, S, D]
        cache_mask = cache_attention_mask(cache.start, S, cache.kv_len, cache.new_mask) if cache is not None else None
        x = self.layer(x, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, cache_mask=cache_mask)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, H] -> [B, S, vocab_size] with the policy's LM head (see `Policy.compute_logits`)."""
        return self.policy.compute_logits(hidden)

    vocab_logits = compute_logits  # the drafter's vocabulary is the policy's

    def new_cache(self, num_slots: int, max_seq_len: int, dtype: torch.dtype, device) -> KVCache:
        """The drafter's own KV cache: one layer, this rank's KV heads."""
        return KVCache.for_model(self.cfg, self.tp_size, num_slots, max_seq_len, dtype, device, num_layers=1)


def build_drafter(
    policy: Policy, arch: str = "eagle3", feature_layers: Optional[Sequence[int]] = None, init_weights: bool = True,
    draft_vocab: Optional[Sequence[int]] = None,
) -> "Drafter | Eagle3Drafter":
    """A drafter of `arch` (`drafter.arch`: eagle3, this module's Drafter for eagle) over `policy`; `draft_vocab`:
    an eagle3 drafter's reduced vocabulary (target token ids)."""
    if arch not in DRAFTER_ARCHS:
        raise ValueError(f"drafter arch must be one of {DRAFTER_ARCHS}, got {arch!r}")
    if arch == "eagle3":
        return Eagle3Drafter(policy, feature_layers, init_weights=init_weights, draft_vocab=draft_vocab)
    if feature_layers is not None or draft_vocab is not None:
        raise ValueError("feature_layers and draft_vocab are eagle3 options; the eagle drafter reads the final hidden "
                         "states and drafts over the policy's vocabulary")
    return Drafter(policy, init_weights=init_weights)
