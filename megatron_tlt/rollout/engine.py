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

`step` is the seam for speculative decoding: a `spec_step(rows, draft_shape)` drafts from
`rows.last_tokens` / `rows.last_hidden`, verifies against `target_logprobs`, and returns the
accepted drafts plus the correction/bonus token of each row as a `StepOutput`, in place of
`plain_step`'s one token. The commit that follows (stop tokens, length limits, output buffers,
row-state update) is shared by both.

Host syncs: one per step, a [3, B] int64 copy (stopped flag, response length, cached length per
row) that decides which rows finish and gives `kv_len`; plus, on steps where rows finish, the copy
of their outputs. Sampling, stop checks and output writes stay on the device.

Randomness: each request has its own torch.Generator seeded from (seed, prompt index, sample
index), so its random draws do not depend on which other requests share its batch (the logits can
still differ in the last bits between batch shapes). The price is one small noise kernel per row per
step; greedy decoding takes the argmax and draws nothing. Every TP rank builds the same generators
and sees the same gathered logits, so all ranks sample the same tokens.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs


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
        self.cache = KVCache.from_memory_budget(cfg, model.tp_size, cache_budget_bytes, max_seq_len, dtype, self.device, num_layers)
        self.stats = EngineStats()

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    # ---- model calls ----
    def _forward(self, tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens [B, S] written after start [B] cached tokens of slots [B] -> final hidden [B, S, H]."""
        return self.model(tokens, cache=CacheBatch(self.cache, slots, start, kv_len), with_logits=False)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] -> fp32 logits [B, S, vocab_size], identical on every TP rank."""
        return self.model.compute_logits(hidden).float()

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
        hidden = self._forward(tokens, slot_ids, start, kv_len=tokens.shape[1])  # [R, W, H]
        ends = torch.tensor([len(prompts[i]) - 2 for i in rows], device=self.device)  # [R]
        last_hidden[idx] = hidden[torch.arange(len(rows), device=self.device), ends].to(last_hidden.dtype)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += tokens.numel()
        return last_hidden

    # ---- decode steps ----
    def plain_step(self, rows: DecodeRows, params: SamplingParams) -> StepOutput:
        """Feed every row's last token, sample one new token per row from the target distribution."""
        hidden = self._forward(rows.last_tokens[:, None], rows.slots, rows.lengths, kv_len=max(rows.host_lengths) + 1)  # [B, 1, H]
        logp = target_logprobs(self._logits(hidden)[:, 0], params)  # [B, V]
        tokens = logp.argmax(dim=-1) if params.greedy else sample(logp, rows.generators)  # [B]
        return StepOutput(
            tokens=tokens[:, None],
            logprobs=logp.gather(-1, tokens[:, None]),
            hidden=hidden,
            num_new=torch.ones_like(tokens),
        )

    def step(self, rows: DecodeRows, params: SamplingParams) -> StepOutput:
        """One decode step over the live rows: the seam where a speculative step replaces the plain one."""
        return self.plain_step(rows, params)

    # ---- the loop ----
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Completions [prompt][sample] for token-id prompts; ValueError on bad input before any work."""
        params.validate()
        self._check_prompts(prompts)
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
                gen = torch.Generator(device=self.device).manual_seed(request_seed(params.seed, i, j))
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
            stopped = self._commit(rows, self.step(rows, params), stop_ids, buffers)  # [B] bool
            steps_done += 1
            synced = torch.stack([stopped.long(), rows.num_generated, rows.lengths]).tolist()  # the per-step sync
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
            for g in groups:
                for r in g[1:]:
                    r.shared_prefill = True
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
        done = []
        for i, b in enumerate(finished):
            req, num = rows.requests[b], synced[1][b]
            self.stats.generated_tokens += num
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
                },
            )
            done.append((req, completion))
        return done
