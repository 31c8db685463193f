"""The rollout engine's data: what a generation returns, what a decode step produces, and the state of
the requests in flight.

What: `Completion` (one sample of one prompt, the engine's output), `StepOutput` (what one plain or
speculative step produced per live row), `Request` (one queued or live sample), `DecodeRows` (the
decode state of the live rows, as tensors), `OutputBuffers` (the device buffers responses are written
to), `EngineStats` (counters of the last `generate`) and `SharedQueue` (what `generate` needs to share its
queue with other rollout replicas: work stealing, implemented by coordinator/stealing.py).

Why: the engine loop, the speculative step (spec/drafting.py) and the tests all read these; keeping
them apart from the code that fills them lets each import them without importing the other.

How the decode state is laid out: row b of every `DecodeRows` tensor belongs to `requests[b]`, which
owns one KV-cache slot. `lengths` counts the tokens whose K/V are cached (prompt + response fed so far),
`last_tokens` is the newest token of the row (the newest response token, or the prompt's last token
right after admission), never cached yet, and `last_hidden` the target's final hidden state that
produced it, which an EAGLE drafter consumes. `host_lengths` is `lengths` as of the engine's last
per-step sync, so kv_len, tree sizes and feed widths are sized on the host without another sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from megatron_tlt.rollout.spec.selector import DraftShape


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
class Request:
    """One sample of one prompt, from the queue until its Completion."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    max_new: int  # response-length limit: max_new_tokens, cut to the context window
    seed: int  # its noise seed (seeds.derive_seed of seed, prompt id, sample index): its samples depend on nothing else but its distributions
    slot: int = -1
    admitted_step: int = 0
    shared_prefill: bool = False  # K/V copied from a sibling sample's prefill
    spec_steps: int = 0  # speculative steps this request took part in
    key: tuple[int, int] = (0, 0)  # (seed id, sample index): the request's name across rollout replicas
    claimed: bool = False  # with a SharedQueue: this replica won the right to run it
    foreign: bool = False  # taken from another replica's queue (SharedQueue.steal): its Completion goes back there


@dataclass
class DecodeRows:
    """Decode state of the live requests; row b of every tensor belongs to requests[b]."""

    slots: torch.Tensor  # [B] int64 KV-cache slot
    lengths: torch.Tensor  # [B] int64 tokens whose K/V are in the cache (prompt + response fed so far)
    last_tokens: torch.Tensor  # [B] int64 newest token of the row, not in the cache yet (the next step feeds it)
    last_hidden: torch.Tensor  # [B, H] target final hidden state that produced last_tokens (zeros for a 1-token prompt)
    num_generated: torch.Tensor  # [B] int64 response tokens so far
    max_new: torch.Tensor  # [B] int64 response-length limit of each row
    seeds: torch.Tensor  # [B] int64 noise seed of each row's request (the noise of its position t is keyed by both)
    requests: list[Request]
    host_lengths: list[int]  # `lengths` as of the last sync: sizes kv_len without another sync

    @classmethod
    def empty(cls, hidden_size: int, hidden_dtype: torch.dtype, device) -> "DecodeRows":
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(0), zeros(0), zeros(0), zeros(0, hidden_size, dtype=hidden_dtype), zeros(0), zeros(0), zeros(0), [], [])

    @classmethod
    def admitted(cls, requests: list[Request], last_hidden: torch.Tensor) -> "DecodeRows":
        """Rows for requests whose prompts are cached but for the last token; last_hidden [R, H] the target's
        hidden state at each prompt's second-to-last position."""
        device = last_hidden.device

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        lengths = [len(r.prompt) - 1 for r in requests]
        return cls(
            slots=tensor([r.slot for r in requests]),
            lengths=tensor(lengths),
            last_tokens=tensor([r.prompt[-1] for r in requests]),
            last_hidden=last_hidden,
            num_generated=torch.zeros(len(requests), dtype=torch.long, device=device),
            max_new=tensor([r.max_new for r in requests]),
            seeds=tensor([r.seed for r in requests]),
            requests=requests,
            host_lengths=lengths,
        )

    def __len__(self) -> int:
        return len(self.requests)

    def select(self, keep: list[int]) -> "DecodeRows":
        idx = torch.tensor(keep, dtype=torch.long, device=self.slots.device)
        return DecodeRows(
            self.slots[idx], self.lengths[idx], self.last_tokens[idx], self.last_hidden[idx],
            self.num_generated[idx], self.max_new[idx], self.seeds[idx],
            [self.requests[i] for i in keep], [self.host_lengths[i] for i in keep],
        )

    def cat(self, other: "DecodeRows") -> "DecodeRows":
        return DecodeRows(
            torch.cat([self.slots, other.slots]), torch.cat([self.lengths, other.lengths]),
            torch.cat([self.last_tokens, other.last_tokens]), torch.cat([self.last_hidden, other.last_hidden]),
            torch.cat([self.num_generated, other.num_generated]), torch.cat([self.max_new, other.max_new]),
            torch.cat([self.seeds, other.seeds]), self.requests + other.requests, self.host_lengths + other.host_lengths,
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
    stolen: int = 0  # with a SharedQueue: requests this engine took from other replicas and ran for them
    lost: int = 0  # with a SharedQueue: requests of this call that other replicas took and ran
    # live-batch bucket (power of two) -> step kind ("off" or a DraftShape name) -> decode steps
    arms_by_bucket: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def mean_accept_len(self) -> float:
        """Draft tokens accepted per row per speculative step (each such step commits one more)."""
        return self.accepted_drafts / self.spec_row_steps if self.spec_row_steps else 0.0


@dataclass
class OutputBuffers:
    """Device buffers a row's response is written to, indexed by slot; column `scratch` absorbs ignored writes."""

    tokens: torch.Tensor  # [num_slots, max_new_tokens + 1] int64
    logprobs: torch.Tensor  # [num_slots, max_new_tokens + 1] fp32
    hidden: Optional[torch.Tensor]  # [num_slots, max_new_tokens + 1, H] or None

    @classmethod
    def allocate(
        cls, num_slots: int, max_new_tokens: int, hidden_size: Optional[int], hidden_dtype: torch.dtype, device
    ) -> "OutputBuffers":
        """Buffers for `num_slots` responses of up to `max_new_tokens`; hidden states only with a hidden_size."""
        shape = (num_slots, max_new_tokens + 1)
        hidden = None
        if hidden_size is not None:
            hidden = torch.zeros(*shape, hidden_size, dtype=hidden_dtype, device=device)
        return cls(
            torch.zeros(shape, dtype=torch.long, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device),
            hidden,
        )

    @property
    def scratch(self) -> int:
        return self.tokens.shape[1] - 1


class SharedQueue(Protocol):
    """A rollout's queue shared with the other rollout replicas (work stealing; coordinator/stealing.py).
    Requests are named by `Request.key` = (seed id, sample index), the same on every replica; each is run by
    exactly one replica, the one whose claim wins. Every TP rank of a replica makes the same calls in the
    same order and gets the same answers."""

    def claim(self, keys: list[tuple[int, int]]) -> list[bool]:
        """Before admitting this replica's own queued requests: which of them it may still run (the others
        were stolen: their Completions arrive through `receive`)."""

    def steal(self, limit: int) -> list[tuple[tuple[int, int], list[int]]]:
        """Up to `limit` queued, unclaimed requests of other replicas, now this replica's to run: [(key, prompt)]
        ([] once none is left anywhere)."""

    def send(self, key: tuple[int, int], completion: Completion) -> None:
        """A stolen request's Completion, back to the replica it was taken from."""

    def receive(self, keys: list[tuple[int, int]]) -> list[Completion]:
        """The Completions of this replica's stolen requests, once their thieves sent them (blocks)."""
