"""Every model call of the rollout engine: the policy's and the drafter's forwards over their KV caches.

What: `ModelCalls` holds the policy, the drafter (once `add_drafter` is called), their KV caches and
the `StaticCalls` that runs the per-step calls with static shapes. It offers the target's prefill,
decode and verify forwards, the LM head (`logits`, `draft_logits`), the drafter's feed (prefill and
catch-up) and draft-level calls, and the cache operations the engine needs between them (sharing a
prompt's prefill, keeping a verify forward's accepted K/V).

Why: it is the only module of `rollout/` that calls the policy or the drafter, so what changes how a
forward runs (pipeline stages, FP8 weights, another attention kernel) enters here and nowhere else
(`precision="fp8"`: the target's linears multiply by FP8 weights inside `target_weights()`, which the
engine enters for each `generate`; the drafter's own layers stay in the model's dtype);
the engine loop and the speculative step (spec/drafting.py) deal in tokens, positions, slots and
hidden states only.

How to use:

    calls = ModelCalls(model, max_seq_len=4096, cache_budget_bytes=8 << 30, cuda_graphs="auto")
    hidden = calls.prefill(tokens, slots)                                   # [R, W] -> [R, W, H]
    hidden, logits = calls.decode(tokens, positions, slots, start, kv_len)   # [B, 1] -> [B, 1, H], [B, 1, V]
    calls.add_drafter(drafter, cache_len=4096 + headroom)                   # then feed / draft_level / verify

Hidden rows: the target calls return, per position, the final hidden state [H] (the LM head's input) and,
with an EAGLE-3 drafter (drafter/eagle3.py), its target features [3H] after it in the same row, taken from
the same forward (`Policy.hidden_states(feature_layers=...)`): `hidden_size` is the row's width (H or 4H),
`logits` reads the first H, the drafter's feed the rest (`drafter_input`). The engine and spec/ keep
whole rows and never look inside.

GPU fast path: the per-step calls (the target's layers in decode and verify forwards, the drafter's
draft levels) go through `StaticCalls` (cuda_graphs.py): batch padded to a power of two into an extra
KV slot no request owns (`num_slots` is the slots requests may own; the cache has one more), kv_len
bucketed, one CUDA graph per shape captured lazily in a shared memory pool and replayed. Prefills and
drafter feeds (variable widths) run eagerly. The LM head runs outside the graphs: one large matmul
gains nothing from a graph, and a graph would keep its [B, S, vocab] output allocated per shape.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Optional

import torch

from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.ops.linear import batch_invariant
from megatron_tlt.rollout.cuda_graphs import StaticCalls
from megatron_tlt.rollout.fp8 import Fp8Weights

PRECISIONS = ("auto", "fp8")  # the target's weights in the rollout: the model's dtype, or FP8 (rollout/fp8.py)

if TYPE_CHECKING:
    from megatron_tlt.drafter.model import Drafter
    from megatron_tlt.models.transformer import Policy


class ModelCalls:
    """The policy (TP-sharded or not, no pipeline stages) and optionally its drafter, with their KV caches."""

    def __init__(
        self,
        model: "Policy",
        *,
        max_seq_len: Optional[int],  # tokens per request, prompt + response; None: the context window
        cache_budget_bytes: int,  # the policy's KV-cache memory on this rank; slots = budget // bytes per slot
        max_batch: Optional[int],  # at most this many slots; None: as many as fit
        dtype: Optional[torch.dtype],  # KV-cache dtype; None: the model's
        cuda_graphs: str,  # "off" | "eager" | "capture" (see cuda_graphs.py) | "auto": capture on CUDA, else off
        batch_invariant: bool = False,  # the target's attention per query: its logits independent of the call's shapes
        precision: str = "auto",  # "auto": the model's dtype | "fp8": the target's linears in FP8 (rollout/fp8.py)
        fp8_gemm: str = "auto",  # the FP8 GEMM path (ops.fp8.resolve_gemm_path)
        fp8_block: int = 128,  # FP8 block edge
    ):
        if not (model.pre_process and model.post_process):
            raise NotImplementedError("the rollout engine needs the whole model on one rank (no pipeline stages)")
        cfg = model.cfg
        window = cfg.max_position_embeddings
        max_seq_len = window if max_seq_len is None else max_seq_len
        if not 1 < max_seq_len <= window:
            raise ValueError(f"max_seq_len must be in [2, {window}] (the model's context window), got {max_seq_len}")
        param = next(model.parameters())
        self.model, self.batch_invariant = model, batch_invariant
        self.device, self.hidden_dtype = param.device, param.dtype
        self.model_hidden_size = self.hidden_size = cfg.hidden_size  # the hidden row's width: + 3H with an EAGLE-3 drafter
        self.vocab_size = cfg.vocab_size
        self.feature_layers: Optional[tuple[int, ...]] = None  # the EAGLE-3 drafter's target layers
        self.max_seq_len = max_seq_len
        self.cache_dtype = dtype or param.dtype
        num_layers = len(model.layers)
        if max_batch is not None:
            per_slot = KVCache.bytes_per_slot(cfg, model.tp_size, max_seq_len, self.cache_dtype, num_layers)
            cache_budget_bytes = min(cache_budget_bytes, max_batch * per_slot)
        if cuda_graphs == "auto":
            cuda_graphs = "capture" if self.device.type == "cuda" else "off"
        padded = cuda_graphs != "off"  # static shapes pad the batch into one extra slot
        self.cache = KVCache.from_memory_budget(
            cfg, model.tp_size, cache_budget_bytes, max_seq_len, self.cache_dtype, self.device, num_layers,
            extra_slots=int(padded),
        )
        self.num_slots = self.cache.num_slots - int(padded)  # slots requests can own; the last one pads static batches
        self.static_calls = StaticCalls(cuda_graphs, pad_slot=self.num_slots, device=self.device)
        self.drafter: Optional["Drafter"] = None
        self.drafter_cache: Optional[KVCache] = None
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.fp8 = Fp8Weights(model, fp8_block, fp8_gemm) if precision == "fp8" else None

    def target_weights(self) -> contextlib.ExitStack:
        """The context the engine's calls run in: the FP8 weights attached (`rollout.fp8`), the linears in float64
        with `batch_invariant` (ops.linear.batch_invariant), or nothing to do."""
        stack = contextlib.ExitStack()
        if self.fp8 is not None:
            stack.enter_context(self.fp8.active())
        if self.batch_invariant:
            stack.enter_context(batch_invariant())
        return stack

    def add_drafter(self, drafter: "Drafter", cache_len: int) -> None:
        """Speculative decoding: the drafter and its own KV cache (outside the budget), one slot per cache slot."""
        self.drafter = drafter
        self.drafter_cache = drafter.new_cache(self.cache.num_slots, cache_len, self.cache_dtype, self.device)
        self.feature_layers = drafter.feature_layers
        if self.feature_layers is not None:
            self.hidden_size = self.model_hidden_size + drafter.feature_size

    # ---- the target ----
    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens [R, W] right-padded, cached from position 0 of slots [R] -> hidden rows [R, W, hidden_size]."""
        cache = CacheBatch(self.cache, slots, torch.zeros_like(slots), kv_len=tokens.shape[1], invariant=self.batch_invariant)
        return self._rows(tokens, cache=cache)

    def _rows(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """The target's forward -> hidden rows [B, S, hidden_size]: final hidden states (, target features)."""
        out = self.model.hidden_states(tokens, feature_layers=self.feature_layers, **kw)
        return out if self.feature_layers is None else torch.cat([out[0], out[1].to(out[0].dtype)], dim=-1)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, positions [B, S] written after start [B] tokens of slots [B] -> (hidden [B, S, H], fp32
        logits [B, S, vocab_size]); kv_len >= max(start) + S, host-known."""
        return self._target_step("decode", dict(tokens=tokens, positions=positions, slots=slots, start=start), kv_len)

    def verify(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, kv_len: int,
        tree_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` over [root, draft nodes] with tree_mask [B, S, S] (a row sees itself and its ancestors)."""
        inputs = dict(tokens=tokens, positions=positions, slots=slots, start=start, tree_mask=tree_mask)
        return self._target_step("verify", inputs, kv_len)

    def _target_step(self, name: str, inputs: dict, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        def fn(x: dict, kv: int) -> torch.Tensor:
            cache = CacheBatch(self.cache, x["slots"], x["start"], kv, new_mask=x.get("tree_mask"), invariant=self.batch_invariant)
            return self._rows(x["tokens"], position_ids=x["positions"], cache=cache)

        hidden = self.static_calls(name, fn, inputs, kv_len, self.max_seq_len)  # [B, S, hidden_size]
        return hidden, self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden rows [B, S, hidden_size] -> fp32 logits [B, S, vocab_size], identical on every TP rank."""
        return self.model.compute_logits(hidden[..., : self.model_hidden_size]).float()

    def drafter_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden rows [B, S, hidden_size] -> what the drafter reads at a target position: the final hidden
        states [B, S, H] (EAGLE) or the target features [B, S, 3H] (EAGLE-3)."""
        return hidden if self.feature_layers is None else hidden[..., self.model_hidden_size :]

    def keep_verified(self, slots: torch.Tensor, start: torch.Tensor, keep_index: torch.Tensor) -> None:
        """After `verify(..., slots, start, ...)`: move the verify entries keep_index [B, K] (the root and the
        accepted path, `spec.tree.kv_keep_index`) next to the committed ones."""
        self.cache.compact(slots, start, keep_index)

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, num_tokens: int) -> None:
        """Give slots dst [M] the first `num_tokens` cached target positions of slots src [M], and the drafter's
        (one position fewer: drafter position t pairs token t+1 with target position t)."""
        self.cache.copy_prefix(src, dst, num_tokens)
        if self.drafter_cache is not None:
            self.drafter_cache.copy_prefix(src, dst, max(num_tokens - 1, 0))

    def tp_max(self, value: float) -> float:
        """The largest `value` over the model's TP ranks (one all-reduce with TP; `value` itself without)."""
        if self.model.tp_size == 1:
            return value
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=self.model.tp_group)
        return out.item()

    # ---- the drafter ----
    def drafter_feed(
        self, tokens: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Eager causal drafter call: tokens [B, W] with target hidden rows [B, W, hidden_size] at positions
        start [B] + j, cached after start entries of slots [B] -> drafter outputs [B, W, H]."""
        positions = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, W]
        cache = CacheBatch(self.drafter_cache, slots, start, kv_len)
        return self.drafter(tokens, self.drafter_input(hidden), positions, cache=cache)

    def draft_level(
        self, tokens: torch.Tensor, parent_g: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        start: torch.Tensor, kv_len: int, visible: torch.Tensor,
    ) -> torch.Tensor:
        """One draft level through `static_calls`: tokens, positions [B, K], parent_g [B, K, H], cached after
        start [B] entries of slots [B], visible [B, K, E+K] (see `spec.drafting.draft_tree`) -> drafter
        outputs [B, K, H]."""
        def fn(x: dict, kv: int) -> torch.Tensor:
            cache = CacheBatch(self.drafter_cache, x["slots"], x["start"], kv, new_mask=x["visible"])
            return self.drafter(x["tokens"], x["parent_g"], x["positions"], cache=cache)

        inputs = dict(tokens=tokens, parent_g=parent_g, positions=positions, slots=slots, start=start, visible=visible)
        return self.static_calls("draft", fn, inputs, kv_len, self.drafter_cache.max_seq_len)

    def draft_logits(self, g: torch.Tensor) -> torch.Tensor:
        """Drafter outputs g [B, M, H] -> fp32 logits [B, M, vocab_size] (the policy's LM head)."""
        return self.drafter.compute_logits(g).float()
