"""Rollout engine: batched generation from the policy over a preallocated KV cache.

Why: RL rollouts generate many samples per prompt with a long tail of long responses. The engine
keeps the decode batch equal to the live requests (finished rows leave at once, queued requests
take their slots), shares one prefill among the n samples of a prompt, and returns everything the
trainer and the drafter need: response tokens, the sampling policy's logprob of each, and
optionally the target's final hidden states.

How to use:

    engine = RolloutEngine(model, max_seq_len=4096, cache_budget_bytes=8 << 30)
    params = SamplingParams(temperature=1.0, max_new_tokens=2048, stop_token_ids=(eos,), n=8, seed=step)
    completions = engine.generate(prompt_ids, params)    # [prompt][sample] -> Completion

How it works. Each request owns one KV-cache slot. Per-row decode state lives in tensors
(`DecodeRows`): slot, `lengths` (tokens whose K/V are cached), `last_tokens` (the newest response
token, or the prompt's last token right after admission; never cached yet) and `last_hidden` (the
target's final hidden state that produced it, which an EAGLE drafter consumes). Admission prefills
all prompt tokens but the last, in one right-padded call for several prompts, copies the K/V into
the slots of the prompt's other samples, and the new rows join the decode batch. Every loop
iteration then runs one step over all live rows:

    out = engine.step(rows, params)   # StepOutput: 1..T new tokens per row (plain decoding: T = 1)

`step` picks plain or speculative decoding for the step (`spec`: "off", a fixed "chain" or "tree"
`DraftShape`, or "adaptive": the `DraftSelector`'s choice for the live batch size, rewarded with the
step's committed tokens per wall second). `spec_step(rows, params, draft_shape)` feeds the drafter
what it has not seen, drafts from `rows.last_tokens` / `rows.last_hidden`, verifies the whole tree
in one target forward, and returns the accepted drafts plus the correction/bonus token of each row
as a `StepOutput`, in place of `plain_step`'s one token. The commit that follows (stop tokens,
length limits, output buffers, row-state update) is shared by both. Speculative decoding is
lossless: greedy outputs equal plain decoding's, sampled ones follow the same distribution (though
not the same random draws: with "adaptive", which steps speculate depends on measured timings).

    engine = RolloutEngine(model, drafter=Drafter(model), spec="adaptive")

Host syncs: one per step, a [3, B] int64 copy (stopped flag, response length, cached length per
row) that decides which rows finish and gives `kv_len`; plus, on steps where rows finish, the copy
of their outputs. Speculative steps add none: tree sizes, feed widths and `kv_len` follow from
host-known lengths. Sampling, stop checks and output writes stay on the device.

GPU fast path: the per-step model calls (the target's layers in decode and verify forwards, the
drafter's draft levels) go through `StaticCalls` (cuda_graphs.py): batch padded to a power of two
into an extra KV slot no request owns, kv_len bucketed, one CUDA graph per shape captured lazily in
a shared memory pool and replayed. Prefills and drafter feeds (variable widths) run eagerly.

Randomness: each request has its own torch.Generator seeded from (seed, prompt index or its
`seed_ids` entry, sample index), so its random draws do not depend on which other requests share its
batch (the logits can still differ in the last bits between batch shapes). The price is one small noise kernel per row per
step; greedy plain decoding takes the argmax and draws nothing (speculative steps draw, greedy or
not). Every TP rank builds the same generators and sees the same gathered logits, so all ranks
sample the same tokens; with "adaptive", the ranks share the slowest rank's step time, so their
selectors (same seed, same rewards) pick the same shapes.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.rollout.cuda_graphs import StaticCalls
from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs
from megatron_tlt.rollout.selector import DraftSelector, DraftShape, arm_name, batch_bucket
from megatron_tlt.rollout.spec_engine import DrafterState, draft_tree, feasible_shape, verify_tree

SPEC_MODES = ("off", "chain", "tree", "adaptive")
DEFAULT_SHAPES = {"chain": DraftShape.chain(4), "tree": DraftShape(depth=4, topk=4, num_verify=12)}


@dataclass
class Completion:
    """One sample of one prompt."""

    token_ids: list[int]  # response only; a stop token that ended it is included
    logprobs: list[float]  # target_logprobs of each response token at its position (the sampling policy)
    finish_reason: str  # "stop" | "length" | "prompt_too_long"
    # [L, H] target final hidden state at the position whose logits produced each response token
    # (sequence position prompt_len - 1 + j for token j); only with return_hidden
    hidden_states: Optional[torch.Tensor] = None
    stats: dict = field(default_factory=dict)


@dataclass
class StepOutput:
    """What one decode step (plain or speculative) produced for each live row."""

    tokens: torch.Tensor  # [B, T] int64 new response tokens in order; entries at >= num_new are ignored
    logprobs: torch.Tensor  # [B, T] fp32 target log-prob of each token (target_logprobs at its position)
    hidden: torch.Tensor  # [B, T, H] target final hidden state at the position that produced each token
    num_new: torch.Tensor  # [B] int64 in [1, T]: tokens produced; all but the last are now in the cache
    draft_shape: Optional[DraftShape] = None  # the speculative shape that produced it; None = a plain step


@dataclass
class _Request:
    prompt_index: int
    sample_index: int
    prompt: list[int]
    max_new: int  # response-length limit: max_new_tokens, cut to the context window
    generator: torch.Generator
    slot: int = -1
    admitted_step: int = 0
    shared_prefill: bool = False  # K/V copied from a sibling sample's prefill
    spec_steps: int = 0  # speculative steps this request took part in


@dataclass
class DecodeRows:
    """Decode state of the live requests; row b of every tensor belongs to requests[b]."""

    slots: torch.Tensor  # [B] int64 KV-cache slot
    lengths: torch.Tensor  # [B] int64 tokens whose K/V are in the cache (prompt + response fed so far)
    last_tokens: torch.Tensor  # [B] int64 newest token of the row, not in the cache yet (the next step feeds it)
    last_hidden: torch.Tensor  # [B, H] target final hidden state that produced last_tokens (zeros for a 1-token prompt)
    num_generated: torch.Tensor  # [B] int64 response tokens so far
    max_new: torch.Tensor  # [B] int64 response-length limit of each row
    requests: list[_Request]
    host_lengths: list[int]  # `lengths` as of the last sync: sizes kv_len without another sync

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def generators(self) -> list[torch.Generator]:
        return [r.generator for r in self.requests]

    def select(self, keep: list[int]) -> "DecodeRows":
        idx = torch.tensor(keep, dtype=torch.long, device=self.slots.device)
        return DecodeRows(
            self.slots[idx], self.lengths[idx], self.last_tokens[idx], self.last_hidden[idx],
            self.num_generated[idx], self.max_new[idx],
            [self.requests[i] for i in keep], [self.host_lengths[i] for i in keep],
        )

    def cat(self, other: "DecodeRows") -> "DecodeRows":
        return DecodeRows(
            torch.cat([self.slots, other.slots]), torch.cat([self.lengths, other.lengths]),
            torch.cat([self.last_tokens, other.last_tokens]), torch.cat([self.last_hidden, other.last_hidden]),
            torch.cat([self.num_generated, other.num_generated]), torch.cat([self.max_new, other.max_new]),
            self.requests + other.requests, self.host_lengths + other.host_lengths,
        )


@dataclass
class EngineStats:
    """Counters of the last `generate` call (for tests, benchmarks and the adaptive draft selector)."""

    decode_batch_sizes: list[int] = field(default_factory=list)  # live rows at each decode step
    queued_at_step: list[int] = field(default_factory=list)  # requests still waiting for a slot at each step
    prefill_calls: int = 0
    prefill_tokens: int = 0  # tokens computed by prefill calls, padding included
    generated_tokens: int = 0
    wall_s: float = 0.0
    spec_steps: int = 0  # decode steps that were speculative
    spec_row_steps: int = 0  # speculative steps summed over the requests (each row of a step counts)
    accepted_drafts: int = 0  # draft tokens accepted, summed over the requests
    # live-batch bucket (power of two) -> step kind ("off" or a DraftShape name) -> decode steps
    arms_by_bucket: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def mean_accept_len(self) -> float:
        """Draft tokens accepted per row per speculative step (each such step commits one more)."""
        return self.accepted_drafts / self.spec_row_steps if self.spec_row_steps else 0.0


@dataclass
class _Outputs:
    """Device buffers a row's response is written to, indexed by slot; column `scratch` absorbs ignored writes."""

    tokens: torch.Tensor  # [num_slots, max_new_tokens + 1] int64
    logprobs: torch.Tensor  # [num_slots, max_new_tokens + 1] fp32
    hidden: Optional[torch.Tensor]  # [num_slots, max_new_tokens + 1, H] or None

    @property
    def scratch(self) -> int:
        return self.tokens.shape[1] - 1


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit generator seed for one request, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def copy_slot_prefix(cache: KVCache, src: torch.Tensor, dst: torch.Tensor, num_tokens: int) -> None:
    """Copy the first `num_tokens` cached positions of slots src [M] into slots dst [M], every layer."""
    for k, v in zip(cache.k, cache.v):  # each [num_slots, max_seq_len, Hkv, D]
        k[dst, :num_tokens] = k[src, :num_tokens]
        v[dst, :num_tokens] = v[src, :num_tokens]


def pad_right(seqs: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Token lists -> [P, max_len] int64, right-padded (padding sits after each row's tokens, so causal
    attention never lets a real token see it)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)


def next_prefill_groups(pending: deque, num_free: int, max_prefill_tokens: int) -> list[list[_Request]]:
    """Pop the queue's head requests that fit in `num_free` slots, grouped by prompt (a group shares one
    prefill); stop adding prompts once the padded prefill would exceed `max_prefill_tokens` (the first
    group always goes)."""
    groups: list[list[_Request]] = []
    taken, widest = 0, 0
    while pending and taken < num_free:
        head = pending[0]
        width = max(widest, len(head.prompt) - 1)
        if groups and (len(groups) + 1) * width > max_prefill_tokens:
            break
        group = []
        while pending and pending[0].prompt_index == head.prompt_index and taken < num_free:
            group.append(pending.popleft())
            taken += 1
        groups.append(group)
        widest = width
    return groups


class RolloutEngine:
    """Generates from a Policy (TP-sharded or not, no pipeline stages) with one preallocated KV cache."""

    def __init__(
        self,
        model,
        *,
        max_seq_len: Optional[int] = None,  # tokens per request, prompt + response; default the context window
        cache_budget_bytes: int = 1 << 30,  # KV-cache memory on this rank; slots = budget // bytes per slot
        max_batch: Optional[int] = None,  # at most this many live requests (slots); default as many as fit
        dtype: Optional[torch.dtype] = None,  # KV-cache dtype; default the model's
        return_hidden: bool = False,  # Completion.hidden_states (costs num_slots x max_new_tokens x H on device)
        max_prefill_tokens: int = 8192,  # padded tokens per prefill call (a longer prompt still goes alone)
        drafter=None,  # a drafter.Drafter built over `model`: enables speculative decoding
        spec: str = "off",  # "off" | "chain" | "tree" (a fixed draft_shape) | "adaptive" (the selector picks)
        draft_shape: Optional[DraftShape] = None,  # for "chain"/"tree"; default DEFAULT_SHAPES[spec]
        selector: Optional[DraftSelector] = None,  # for "adaptive"; default a DraftSelector over DEFAULT_SHAPES
        drafter_feed_capacity: int = 64,  # pending target pairs per slot before plain steps feed the drafter
        cuda_graphs: str = "auto",  # "off" | "eager" | "capture" (see cuda_graphs.py); "auto": capture on CUDA, else off
    ):
        if not (model.pre_process and model.post_process):
            raise NotImplementedError("the rollout engine needs the whole model on one rank (no pipeline stages)")
        cfg = model.cfg
        window = cfg.max_position_embeddings
        max_seq_len = window if max_seq_len is None else max_seq_len
        if not 1 < max_seq_len <= window:
            raise ValueError(f"max_seq_len must be in [2, {window}] (the model's context window), got {max_seq_len}")
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.hidden_dtype = param.dtype
        self.max_seq_len = max_seq_len
        self.return_hidden = return_hidden
        self.max_prefill_tokens = max_prefill_tokens
        dtype = dtype or param.dtype
        num_layers = len(model.layers)
        if max_batch is not None:
            per_slot = KVCache.bytes_per_slot(cfg, model.tp_size, max_seq_len, dtype, num_layers)
            cache_budget_bytes = min(cache_budget_bytes, max_batch * per_slot)
        if cuda_graphs == "auto":
            cuda_graphs = "capture" if self.device.type == "cuda" else "off"
        padded = cuda_graphs != "off"  # static shapes pad the batch into one extra slot
        self.cache = KVCache.from_memory_budget(
            cfg, model.tp_size, cache_budget_bytes, max_seq_len, dtype, self.device, num_layers, extra_slots=int(padded)
        )
        self.num_slots = self.cache.num_slots - int(padded)  # slots requests can own; the last one pads static batches
        self.static_calls = StaticCalls(cuda_graphs, pad_slot=self.num_slots, device=self.device)
        self.stats = EngineStats()
        self.spec, self.draft_shape, self.selector = spec, None, None
        self.drafter_state: Optional[DrafterState] = None  # the drafter and its own cache (outside the budget)
        if spec != "off":
            arms = self._configure_spec(model, drafter, spec, draft_shape, selector)
            deepest = max(a.depth for a in arms)
            if drafter_feed_capacity < deepest:
                raise ValueError(f"drafter_feed_capacity={drafter_feed_capacity} must be >= the deepest draft ({deepest})")
            headroom = drafter_feed_capacity + 1 + max(a.topk * a.depth for a in arms)
            self.drafter_state = DrafterState(
                drafter, self.cache.num_slots, max_seq_len, drafter_feed_capacity, headroom, dtype, self.hidden_dtype,
                self.device, self.static_calls,
            )
        self._accepted = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)  # [slots] drafts accepted

    def _configure_spec(self, model, drafter, spec, draft_shape, selector) -> list[DraftShape]:
        """Validate the speculative-decoding options, set draft_shape / selector; returns the shapes in use."""
        if spec not in SPEC_MODES:
            raise ValueError(f"spec must be one of {SPEC_MODES}, got {spec!r}")
        if drafter is None or drafter.policy is not model:
            raise ValueError(f"spec={spec!r} needs a drafter built over this engine's model (it shares its embedding and LM head)")
        if spec == "adaptive":
            if draft_shape is not None:
                raise ValueError("spec='adaptive' takes its draft shapes from the selector's arms, not draft_shape")
            self.selector = selector or DraftSelector(list(DEFAULT_SHAPES.values()))
            return [a for a in self.selector.arms if a is not None]
        if selector is not None:
            raise ValueError(f"a selector is used with spec='adaptive' only, got spec={spec!r}")
        self.draft_shape = draft_shape or DEFAULT_SHAPES[spec]
        if self.draft_shape.is_chain != (spec == "chain"):
            topk = "topk = 1" if spec == "chain" else "topk > 1"
            raise ValueError(f"spec={spec!r} needs a draft shape with {topk}, got {self.draft_shape}")
        return [self.draft_shape]

    # ---- model calls ----
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] -> fp32 logits [B, S, vocab_size], identical on every TP rank."""
        return self.model.compute_logits(hidden).float()

    def target_call(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, kv_len: int,
        tree_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode / verify forward: tokens, positions [B, S] written after start [B] tokens of slots [B],
        optional tree_mask [B, S, S] -> (hidden [B, S, H], fp32 logits [B, S, vocab_size]). The layers go
        through `static_calls` (a CUDA graph on GPU); the LM head runs outside: one large matmul gains
        nothing from a graph, and a graph would keep its [B, S, vocab] output allocated per shape."""
        def fn(x: dict, kv: int) -> torch.Tensor:
            cache = CacheBatch(self.cache, x["slots"], x["start"], kv, new_mask=x.get("tree_mask"))
            return self.model.hidden_states(x["tokens"], position_ids=x["positions"], cache=cache)

        inputs = dict(tokens=tokens, positions=positions, slots=slots, start=start)
        if tree_mask is not None:
            inputs["tree_mask"] = tree_mask
        hidden = self.static_calls("decode" if tree_mask is None else "verify", fn, inputs, kv_len, self.max_seq_len)
        return hidden, self._logits(hidden)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Cache all tokens but the last of each prompt in its slot, in one padded call.

        Returns [P, H]: the final hidden state at each prompt's second-to-last position (the one that
        predicts its last token), zeros for one-token prompts (nothing to prefill).
        """
        H = self.model.cfg.hidden_size
        last_hidden = torch.zeros(len(prompts), H, dtype=self.hidden_dtype, device=self.device)  # [P, H]
        rows = [i for i, p in enumerate(prompts) if len(p) > 1]
        if not rows:
            return last_hidden
        tokens = pad_right([prompts[i][:-1] for i in rows]).to(self.device)  # [R, W]
        idx = torch.tensor(rows, device=self.device)
        slot_ids = torch.tensor([slots[i] for i in rows], device=self.device)
        start = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        cache = CacheBatch(self.cache, slot_ids, start, kv_len=tokens.shape[1])
        hidden = self.model.hidden_states(tokens, cache=cache)  # [R, W, H]
        if self.drafter_state is not None:
            self.drafter_state.prefill(tokens, hidden, slot_ids)
        ends = torch.tensor([len(prompts[i]) - 2 for i in rows], device=self.device)  # [R]
        last_hidden[idx] = hidden[torch.arange(len(rows), device=self.device), ends].to(last_hidden.dtype)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += tokens.numel()
        return last_hidden

    # ---- decode steps ----
    def plain_step(self, rows: DecodeRows, params: SamplingParams) -> StepOutput:
        """Feed every row's last token, sample one new token per row from the target distribution."""
        hidden, logits = self.target_call(
            rows.last_tokens[:, None], rows.lengths[:, None], rows.slots, rows.lengths, kv_len=max(rows.host_lengths) + 1
        )  # [B, 1, H], [B, 1, V]
        logp = target_logprobs(logits[:, 0], params)  # [B, V]
        tokens = logp.argmax(dim=-1) if params.greedy else sample(logp, rows.generators)  # [B]
        return StepOutput(
            tokens=tokens[:, None],
            logprobs=logp.gather(-1, tokens[:, None]),
            hidden=hidden,
            num_new=torch.ones_like(tokens),
        )

    def spec_step(self, rows: DecodeRows, params: SamplingParams, draft_shape: DraftShape) -> StepOutput:
        """Speculative step: feed the drafter its pending pairs and the roots, draft `draft_shape` (it must fit
        every row's context: see `feasible_shape`), verify all drafts in one target forward. Returns per row
        the accepted drafts and the correction/bonus token, with the target's logprobs and hidden states."""
        g_root = self.drafter_state.feed(rows, with_root=True)  # [B, H]
        tree = draft_tree(self.drafter_state, rows, params, draft_shape, g_root)
        result, hidden = verify_tree(self.target_call, self.cache, rows, params, tree)  # hidden: [B, D+1, H]
        self._accepted[rows.slots] += result.accept_lens
        for r in rows.requests:
            r.spec_steps += 1
        return StepOutput(result.tokens, result.logprobs, hidden, result.accept_lens + 1, draft_shape)

    def step(self, rows: DecodeRows, params: SamplingParams) -> StepOutput:
        """One decode step over the live rows: speculative with the shape `spec` picks for it, else plain."""
        shape = self._pick_shape(rows)
        if shape is not None:
            out = self.spec_step(rows, params, shape)
        else:
            if self.drafter_state is not None:
                self.drafter_state.flush_if_full(rows)
            out = self.plain_step(rows, params)
        if self.drafter_state is not None:
            self.drafter_state.record(rows, out)
        return out

    def _pick_shape(self, rows: DecodeRows) -> Optional[DraftShape]:
        if self.spec == "off":
            return None
        shape = self.selector.choose(len(rows)) if self.selector is not None else self.draft_shape
        return None if shape is None else feasible_shape(shape, rows.host_lengths, self.max_seq_len)

    # ---- the loop ----
    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seed_ids: Optional[list[int]] = None
    ) -> list[list[Completion]]:
        """Completions [prompt][sample] for token-id prompts; ValueError on bad input before any work.
        `seed_ids` [P] name the prompts in their request seeds (default: their positions), so that a
        prompt's samples do not depend on which batch or DP rank it lands in."""
        params.validate()
        self._check_prompts(prompts)
        if seed_ids is None:
            seed_ids = list(range(len(prompts)))
        elif len(seed_ids) != len(prompts):
            raise ValueError(f"{len(seed_ids)} seed_ids for {len(prompts)} prompts")
        t0 = time.perf_counter()
        self.stats = EngineStats()
        results: list[list[Optional[Completion]]] = [[None] * params.n for _ in prompts]
        pending: deque[_Request] = deque()
        for i, prompt in enumerate(prompts):
            room = self.max_seq_len - len(prompt)
            for j in range(params.n):
                if room < 1:
                    results[i][j] = Completion([], [], "prompt_too_long", stats={"prompt_tokens": len(prompt)})
                    continue
                gen = torch.Generator(device=self.device).manual_seed(request_seed(params.seed, seed_ids[i], j))
                pending.append(_Request(i, j, prompt, min(params.max_new_tokens, room), gen))

        buffers = self._output_buffers(params.max_new_tokens)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=self.device)
        free_slots = list(range(self.num_slots))
        rows = self._empty_rows()
        steps_done = 0
        while pending or len(rows):
            if pending and free_slots:
                rows = rows.cat(self._admit(pending, free_slots, steps_done))
            self.stats.decode_batch_sizes.append(len(rows))
            self.stats.queued_at_step.append(len(pending))
            step_start = time.perf_counter()
            out = self.step(rows, params)
            stopped = self._commit(rows, out, stop_ids, buffers)  # [B] bool
            steps_done += 1
            synced = torch.stack([stopped.long(), rows.num_generated, rows.lengths]).tolist()  # the per-step sync
            self._account_step(rows, out, synced[2], time.perf_counter() - step_start)
            rows.host_lengths = synced[2]
            finished = [
                b for b, (stop, num, req) in enumerate(zip(synced[0], synced[1], rows.requests)) if stop or num >= req.max_new
            ]
            if finished:
                for req, completion in self._collect(rows, finished, synced, buffers, steps_done):
                    results[req.prompt_index][req.sample_index] = completion
                    free_slots.append(req.slot)
                finished_set = set(finished)
                rows = rows.select([b for b in range(len(rows)) if b not in finished_set])
        self.stats.wall_s = time.perf_counter() - t0
        return results

    def _account_step(self, rows: DecodeRows, out: StepOutput, new_lengths: list[int], step_s: float) -> None:
        """Count the step's kind per batch bucket; reward the selector with committed tokens per wall second
        (the step's time ends after the per-step sync, so on GPU it is the device's time too)."""
        counts = self.stats.arms_by_bucket.setdefault(batch_bucket(len(rows)), {})
        name = arm_name(out.draft_shape)
        counts[name] = counts.get(name, 0) + 1
        self.stats.spec_steps += out.draft_shape is not None
        if self.selector is not None:
            if self.model.tp_size > 1:  # every TP rank must pick the same shapes: they share one measurement
                step_time = torch.tensor([step_s], dtype=torch.float64, device=self.device)
                torch.distributed.all_reduce(step_time, op=torch.distributed.ReduceOp.MAX, group=self.model.tp_group)
                step_s = step_time.item()
            self.selector.update(len(rows), out.draft_shape, sum(new_lengths) - sum(rows.host_lengths), step_s)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        vocab = self.model.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {min(p)}, max {max(p)}")

    def _output_buffers(self, max_new_tokens: int) -> _Outputs:
        shape = (self.num_slots, max_new_tokens + 1)
        hidden = None
        if self.return_hidden:
            hidden = torch.zeros(*shape, self.model.cfg.hidden_size, dtype=self.hidden_dtype, device=self.device)
        return _Outputs(
            torch.zeros(shape, dtype=torch.long, device=self.device),
            torch.zeros(shape, dtype=torch.float32, device=self.device),
            hidden,
        )

    def _empty_rows(self) -> DecodeRows:
        def empty(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        hidden = empty(0, self.model.cfg.hidden_size, dtype=self.hidden_dtype)
        return DecodeRows(empty(0), empty(0), empty(0), hidden, empty(0), empty(0), [], [])

    def _admit(self, pending: deque, free_slots: list[int], steps_done: int) -> DecodeRows:
        """Move queued requests into free slots: one prefill per prompt group, K/V copied to its siblings."""
        groups = next_prefill_groups(pending, len(free_slots), self.max_prefill_tokens)
        requests = [r for g in groups for r in g]
        for r in requests:
            r.slot, r.admitted_step = free_slots.pop(0), steps_done
        leaders = [g[0] for g in groups]
        group_hidden = self.prefill([r.prompt for r in leaders], [r.slot for r in leaders])  # [G, H]
        siblings = [(g[0].slot, r.slot) for g in groups for r in g[1:]]
        if siblings:
            src, dst = (torch.tensor(s, device=self.device) for s in zip(*siblings))
            copy_slot_prefix(self.cache, src, dst, max(len(g[0].prompt) - 1 for g in groups))
            if self.drafter_state is not None:
                copy_slot_prefix(self.drafter_state.cache, src, dst, max(0, *(len(g[0].prompt) - 2 for g in groups)))
            for g in groups:
                for r in g[1:]:
                    r.shared_prefill = True
        if self.drafter_state is not None:
            self.drafter_state.admit([r.slot for r in requests], [len(r.prompt) for r in requests])
        self._accepted[torch.tensor([r.slot for r in requests], device=self.device)] = 0
        group_of_row = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=self.device)

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        lengths = [len(r.prompt) - 1 for r in requests]
        return DecodeRows(
            slots=tensor([r.slot for r in requests]),
            lengths=tensor(lengths),
            last_tokens=tensor([r.prompt[-1] for r in requests]),
            last_hidden=group_hidden[group_of_row],
            num_generated=torch.zeros(len(requests), dtype=torch.long, device=self.device),
            max_new=tensor([r.max_new for r in requests]),
            requests=requests,
            host_lengths=lengths,
        )

    def _commit(self, rows: DecodeRows, out: StepOutput, stop_ids: torch.Tensor, buffers: _Outputs) -> torch.Tensor:
        """Apply a step's output in place: cut at the first stop token and at each row's length limit,
        write the kept tokens to the output buffers, advance the row state. Returns stopped [B] bool."""
        B, T = out.tokens.shape
        offsets = torch.arange(T, device=self.device)  # [T]
        produced = offsets < out.num_new[:, None]  # [B, T]
        is_stop = torch.isin(out.tokens, stop_ids) & produced  # [B, T]
        first_stop = torch.where(is_stop, offsets, T).amin(dim=-1)  # [B]; T = none
        num_new = torch.minimum(torch.minimum(out.num_new, first_stop + 1), rows.max_new - rows.num_generated)  # [B]
        kept = offsets < num_new[:, None]  # [B, T]
        cols = torch.where(kept, rows.num_generated[:, None] + offsets, buffers.scratch)  # [B, T]
        slot_rows = rows.slots[:, None].expand(B, T)
        buffers.tokens[slot_rows, cols] = out.tokens
        buffers.logprobs[slot_rows, cols] = out.logprobs.float()
        if buffers.hidden is not None:
            buffers.hidden[slot_rows, cols] = out.hidden.to(buffers.hidden.dtype)
        last = num_new - 1  # [B]
        rows.last_tokens = out.tokens.gather(1, last[:, None]).squeeze(1)
        rows.last_hidden = out.hidden[torch.arange(B, device=self.device), last].to(rows.last_hidden.dtype)
        rows.lengths = rows.lengths + num_new
        rows.num_generated = rows.num_generated + num_new
        return first_stop < num_new

    def _collect(
        self, rows: DecodeRows, finished: list[int], synced: list[list[int]], buffers: _Outputs, steps_done: int
    ) -> list[tuple[_Request, Completion]]:
        """Copy the finished rows' outputs to the host (one transfer per buffer) and build their Completions."""
        slots = rows.slots[torch.tensor(finished, device=self.device)]  # [F]
        tokens, logprobs = buffers.tokens[slots].tolist(), buffers.logprobs[slots].tolist()
        accepted = self._accepted[slots].tolist() if self.drafter_state is not None else [0] * len(finished)
        done = []
        for i, b in enumerate(finished):
            req, num = rows.requests[b], synced[1][b]
            self.stats.generated_tokens += num
            self.stats.accepted_drafts += accepted[i]
            self.stats.spec_row_steps += req.spec_steps
            completion = Completion(
                token_ids=tokens[i][:num],
                logprobs=logprobs[i][:num],
                finish_reason="stop" if synced[0][b] else "length",
                hidden_states=buffers.hidden[slots[i], :num].clone() if buffers.hidden is not None else None,
                stats={
                    "prompt_tokens": len(req.prompt),
                    "response_tokens": num,
                    "decode_steps": steps_done - req.admitted_step,
                    "prefill_shared": req.shared_prefill,
                    "spec_steps": req.spec_steps,
                    "accepted_drafts": accepted[i],  # draft tokens accepted by verification (before stop/length cuts)
                    "mean_accept_len": accepted[i] / req.spec_steps if req.spec_steps else 0.0,  # per speculative step
                },
            )
            done.append((req, completion))
        return done
