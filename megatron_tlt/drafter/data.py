"""Drafter training data: policy sequences with the policy's hidden states, packed micro-batches, the online buffer.

What: a `DrafterExample` is one policy sequence with the policy's hidden states over it; `make_batches`
packs examples into `DrafterBatch` micro-batches, the unit of a drafter trainer step. Offline,
`policy_examples(policy, sequences, max_tokens)` computes the examples with one packed no-grad forward of
the policy per micro-batch (`models.packed.chunk_forward`). Online, `DrafterBuffer(max_bytes)` keeps
examples grouped by the RL step that produced them, under a cap on host memory, and
`batches(max_tokens, rng)` streams packed micro-batches from it, newest data first;
`from_trainer_output(samples, hidden)` turns the hidden states returned by
`PolicyTrainer.step(..., collect_hidden=True)` into examples.

Why: TLT keeps the drafter aligned with a policy that RL keeps moving; online it needs no extra forward
pass: the policy update already computes the final hidden state at every position. Data from older steps was made by
an older policy, so it is evicted first and drawn less often.

Data. A `DrafterExample` is one policy sequence (prompt + response): tokens x_0..x_{L-1} [L] and
hidden f_0..f_{L-1} [L, H], where f_t is the policy's final normed hidden state at position t, the LM-head
input that predicts x_{t+1} (`Policy.hidden_states`; the trainer's packed forward returns the same).
Examples are packed as the policy is (`megatron_tlt.data.packing`): `make_batches` bin-packs them into
`DrafterBatch`es of at most `max_tokens` tokens with `cu_seqlens` and position ids restarting per example.

How:

    examples = policy_examples(policy, sequences, max_tokens=4096)        # offline: one packed no-grad forward
    batches = make_batches(examples, max_tokens=4096)

    buffer = DrafterBuffer(max_bytes=4 * 2**30)                           # online: the RL update's own forward
    metrics, hidden = policy_trainer.step(samples, max_response_len, collect_hidden=True)
    buffer.add(rl_step, from_trainer_output(samples, hidden))
    batches = buffer.batches(max_tokens=4096, rng=random.Random(seed))  # endless while not empty
    drafter_trainer.step(next(batches))

The online buffer:

Storage. Examples live on the host (device memory belongs to the policy and the rollout's KV cache), as
copies: a view would keep the trainer's whole packed [T, H] hidden tensor alive and break the byte count.
Hidden states keep the dtype they arrive in (bf16 under autocast on GPU, fp32 on CPU): casting down would
change the regression target, casting up would double the memory for no information. `bytes` counts the
storage of tokens (int64) and hidden states; an example shorter than 2 tokens has no position to train
and is not stored.

Sharding. Each DP rank's trainer returns only its own share of the samples, so each rank's buffer is its
shard and nothing is exchanged. The TP ranks of a replica hold identical copies (the final hidden states
are replicated over TP), so identically seeded rngs draw identical micro-batches on them.

Eviction. First in, first out by (RL step, arrival): while over the cap, the oldest example of the oldest
step goes. An example larger than the whole cap is dropped on arrival, logged once per `add`.

Sampling. Over a snapshot taken at the first draw: one shuffled pass over the newest step, then forever a
step chosen with probability proportional to `decay ** age` (age 0 = the newest; with decay 0.5 the newest
step gets at least half the draws) and an example of it uniformly. Draws are packed greedily, in order, into
micro-batches of at most `max_tokens` tokens (a longer example is cut to its first `max_tokens`, as
`make_batches` does).
"""
from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.data.packing import pack_sequences, plan_micro_batches, unpack
from megatron_tlt.models.packed import chunk_forward

if TYPE_CHECKING:
    from megatron_tlt.rl.sample import Sample

log = logging.getLogger(__name__)


# ---- examples and micro-batches ----
@dataclass
class DrafterExample:
    """One policy sequence and the policy's hidden states over it."""

    tokens: torch.Tensor  # [L] int64 prompt + response
    hidden: torch.Tensor  # [L, H] final normed hidden state at each position (hidden[t] predicts tokens[t+1])
    features: Optional[torch.Tensor] = None  # [L, 3H] an EAGLE-3 drafter's target features (drafter/eagle3.py)


@dataclass
class DrafterBatch:
    """Packed examples: one micro-batch, the unit of a trainer step."""

    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H]
    position_ids: torch.Tensor  # [T] int64, restarting at 0 per example
    cu_seqlens: torch.Tensor  # [N+1] int32
    max_seqlen: int
    loss_mask: torch.Tensor  # [T] bool, position t has a next token in its example
    features: Optional[torch.Tensor] = None  # [T, 3H] (EAGLE-3)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "DrafterBatch":
        return DrafterBatch(
            self.tokens.to(device), self.hidden.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
            self.max_seqlen, self.loss_mask.to(device), None if self.features is None else self.features.to(device),
        )


def make_batches(examples: Sequence[DrafterExample], max_tokens: int) -> list[DrafterBatch]:
    """Bin-pack examples into micro-batches of at most `max_tokens` tokens. A longer example is cut to its
    first `max_tokens` tokens (causal, so the prefix is exact), which keeps every trainer step bounded."""
    examples = [DrafterExample(e.tokens[:max_tokens], e.hidden[:max_tokens], None if e.features is None else e.features[:max_tokens])
                for e in examples]
    bins = plan_micro_batches([e.tokens.shape[0] for e in examples], max_tokens)
    batches = []
    for idx in bins:
        packed = pack_sequences([examples[i].tokens for i in idx])
        batches.append(DrafterBatch(
            tokens=packed.tokens,
            hidden=torch.cat([examples[i].hidden for i in idx]),
            position_ids=packed.position_ids,
            cu_seqlens=packed.cu_seqlens,
            max_seqlen=packed.max_seqlen,
            loss_mask=packed.loss_mask,
            features=None if examples[idx[0]].features is None else torch.cat([examples[i].features for i in idx]),
        ))
    return batches


@torch.no_grad()
def policy_examples(
    policy: nn.Module, sequences: Sequence[Sequence[int]], max_tokens: int, feature_layers: Optional[Sequence[int]] = None
) -> list[DrafterExample]:
    """One packed no-grad forward of the policy per micro-batch of `sequences` -> their DrafterExamples
    (with the outputs of `feature_layers` as their features when given: an EAGLE-3 drafter's).

    The hidden states are kept in host memory (sum of lengths x H x dtype bytes) and moved to the device
    one micro-batch per trainer step. Sequences longer than `max_tokens` get a forward of their own.
    """
    examples: list[Optional[DrafterExample]] = [None] * len(sequences)
    for idx in plan_micro_batches([len(s) for s in sequences], max_tokens):
        packed = pack_sequences([list(sequences[i]) for i in idx])
        out = chunk_forward(policy, packed, feature_layers=feature_layers)
        hidden, features = out if feature_layers is not None else (out, None)  # [T, H], [T, 3H] or None
        per_example = unpack(features.cpu(), packed.cu_seqlens) if features is not None else [None] * len(idx)
        for i, tokens, h, f in zip(idx, unpack(packed.tokens, packed.cu_seqlens), unpack(hidden.cpu(), packed.cu_seqlens), per_example):
            examples[i] = DrafterExample(tokens, h, f)
    return examples


# ---- the online buffer ----
def example_bytes(example: DrafterExample) -> int:
    """Storage bytes of an example's tokens, hidden states and features."""
    return sum(t.numel() * t.element_size() for t in (example.tokens, example.hidden, example.features) if t is not None)


def from_trainer_output(samples: Sequence["Sample"], hidden: dict[int, torch.Tensor], hidden_size: int) -> list[DrafterExample]:
    """Drafter examples from `PolicyTrainer.step(samples, micro_batches, ..., collect_hidden=True)`'s hidden dict.

    hidden[i]: [R + 1, H], the final hidden states of sample i over its `response_window` (rl/sample.py: the
    position that produces the first response token .. the end), paired with the tokens of that window
    ([R + 1]), in sample order; [R + 1, H + 3H] with the trainer's `feature_layers`: the final hidden states,
    then the EAGLE-3 features (H = `hidden_size`).
    """
    examples = []
    for i in sorted(hidden):
        s = samples[i]
        tokens = torch.tensor(s.tokens[s.response_window], dtype=torch.int64)  # [R + 1]
        if hidden[i].shape[0] != tokens.shape[0]:
            raise ValueError(f"sample {i}: {hidden[i].shape[0]} hidden states for {tokens.shape[0]} tokens")
        h = hidden[i]
        examples.append(DrafterExample(tokens, h[:, :hidden_size], h[:, hidden_size:] if h.shape[1] > hidden_size else None))
    return examples


class DrafterBuffer:
    """Drafter examples by RL step, at most `max_bytes` of host memory (see the module docstring)."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._steps: dict[int, deque[DrafterExample]] = {}
        self._bytes = self._tokens = self._examples = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def num_examples(self) -> int:
        return self._examples

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def add(self, rl_step: int, examples: Sequence[DrafterExample]) -> None:
        """Store host copies of `examples` (detached, dtype kept) under `rl_step`, then evict down to the cap."""
        too_big = 0
        for example in examples:
            length = example.tokens.shape[0]
            f = example.features
            if (example.tokens.dim() != 1 or example.hidden.dim() != 2 or example.hidden.shape[0] != length
                    or (f is not None and (f.dim() != 2 or f.shape[0] != length))):
                shapes = f"{tuple(example.tokens.shape)}, {tuple(example.hidden.shape)}"
                shapes += "" if f is None else f" and features {tuple(f.shape)}"
                raise ValueError(f"expected tokens [L], hidden [L, H] and features [L, F] or none, got {shapes}")
            if length < 2:
                continue
            if example_bytes(example) > self.max_bytes:
                too_big += 1
                continue
            copy = DrafterExample(*(None if t is None else t.detach().to("cpu", copy=True)
                                    for t in (example.tokens, example.hidden, f)))
            self._steps.setdefault(rl_step, deque()).append(copy)
            self._count(copy, +1)
        if too_big:
            log.warning("drafter buffer: dropped %d example(s) of RL step %d larger than the whole cap (%d bytes)",
                        too_big, rl_step, self.max_bytes)
        self._evict()

    def _count(self, example: DrafterExample, sign: int) -> None:
        self._bytes += sign * example_bytes(example)
        self._tokens += sign * example.tokens.shape[0]
        self._examples += sign

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            oldest = min(self._steps)
            queue = self._steps[oldest]
            self._count(queue.popleft(), -1)
            if not queue:
                del self._steps[oldest]

    def batches(self, max_tokens: int, rng: random.Random, decay: float = 0.5) -> Iterator[DrafterBatch]:
        """Micro-batches of at most `max_tokens` tokens, newest step first; endless unless the buffer is empty."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        return _pack(self._draws(rng, decay), max_tokens)

    def _draws(self, rng: random.Random, decay: float) -> Iterator[DrafterExample]:
        steps = [list(self._steps[s]) for s in sorted(self._steps, reverse=True)]  # newest first
        if not steps:
            return
        newest = steps[0][:]
        rng.shuffle(newest)
        yield from newest
        weights = [decay**age for age in range(len(steps))]
        while True:
            (chosen,) = rng.choices(steps, weights)
            yield rng.choice(chosen)


def _pack(examples: Iterator[DrafterExample], max_tokens: int) -> Iterator[DrafterBatch]:
    """Group a stream of examples, in order, into micro-batches of at most `max_tokens` tokens. The stream is
    endless or empty (see `DrafterBuffer._draws`), so no partial group is left to flush."""
    group: list[DrafterExample] = []
    group_tokens = 0
    for example in examples:
        length = min(example.tokens.shape[0], max_tokens)
        if group and group_tokens + length > max_tokens:
            yield from make_batches(group, max_tokens)  # one micro-batch: the group fits in max_tokens
            group, group_tokens = [], 0
        group.append(example)
        group_tokens += length
