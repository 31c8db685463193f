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

How it works. This module is the loop only: the queue, admission, the choice of each step (plain or
speculative), the commit and the collection of finished rows. It touches the policy and the drafter
only through `ModelCalls` (model_calls.py: the forwards, the KV caches, CUDA graphs, the LM head).
Each request owns one KV-cache slot; per-row decode state lives in tensors (`DecodeRows`, types.py):
slot, cached length, the newest token (not cached yet) and the target hidden state that produced it.
Admission prefills all prompt tokens but the last, in one right-padded call for several prompts,
copies the K/V into the slots of the prompt's other samples, and the new rows join the decode batch.
Every loop iteration then runs one step over all live rows:

    out = engine.step(rows, params)   # StepOutput: 1..T new tokens per row (plain decoding: T = 1)

`step` picks plain or speculative decoding for the step (`spec`: "off", a fixed "chain" or "tree"
`DraftShape`, or "adaptive": the `DraftSelector`'s choice for the live batch size, rewarded with the
step's committed tokens per wall second). `spec_step(rows, params, draft_shape)` feeds the drafter
what it has not seen, drafts from `rows.last_tokens` / `rows.last_hidden`, verifies the whole tree
in one target forward (spec/drafting.py), and returns the accepted drafts plus the correction/bonus
token of each row as a `StepOutput`, in place of `plain_step`'s one token. The commit that follows
(stop tokens, length limits, output buffers, row-state update) is shared by both. Speculative
decoding is exact: it emits the very tokens plain decoding samples, greedy or not, whatever the drafter,
the draft shape or the selector's choices (see Randomness).

    engine = RolloutEngine(model, drafter=Drafter(model), spec="adaptive")

Host syncs: one per step, a [3, B] int64 copy (stopped flag, response length, cached length per
row) that decides which rows finish and gives `kv_len`; plus, on steps where rows finish, the copy
of their outputs. Speculative steps add none: tree sizes, feed widths and `kv_len` follow from
host-known lengths. Sampling, stop checks and output writes stay on the device.

Randomness: a request's token at response position t is argmax(log p_t + G_t), G_t Gumbel noise that is a
pure function of (the request's seed, t, token id) (`sampling.sample`; the seed `seeds.derive_seed` of
(seed, prompt index or its `seed_ids` entry, sample index)). Its samples therefore depend on nothing but
its own distributions: not on which requests share its batch, its slot, when it was admitted, its DP rank,
or whether a plain step or a verify forward evaluated position t (a verify accepts a draft iff it is that
sample: spec/tree.py). One noise call serves the whole batch and every verify row, with no generator state
and no sync; greedy decoding draws none. `drafts="coupled"` (default) drafts each node's first child with
the same noise on the drafter's distribution, so a chain predicts the target's sample rather than its mode;
`"topk"` drafts the drafter's most likely tokens. Every TP rank computes the same noise over the same
gathered logits, so all ranks sample the same tokens; with "adaptive", the ranks share the slowest rank's
step time, so their selectors (same seed, same rewards) pick the same shapes. The logits themselves can
still differ in the last bits between batch shapes or between a decode and a verify forward, which can
flip a near-tie of the noise: measured on CPU with a random 4-layer model, 128 samples of 128 tokens at
temperature 1, none of 128 sequences differed from plain decoding in fp32, but 24 of 128 did in bf16 (and 6
of 32 between plain decoding at batch 32 and batch 1), from SDPA's shape-dependent reductions.
FP8 rollouts (`precision="fp8"`, rollout/fp8.py) change the target's logits, never this: SD verifies against the FP8
target, so it stays exact with respect to the distribution the rollout samples, and the logprobs are the FP8 policy's.
`batch_invariant=True` runs the target's attention per query in fp32 (`ops.attention.cached_attention`) and
its linears in float64 (`ops.linear.batch_invariant`), which made bf16 identical in both comparisons on CPU:
attention alone did on CPUs whose bf16 GEMM rows do not depend on the batch, but not on an AVX-512 / AMX Xeon,
where a GEMM row changed with the live rows beside it. On GPU the same holds in principle (cuBLAS also picks
kernels by shape; float64 GEMMs are slow there), untested: no GPU was at hand.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Optional

import torch

from megatron_tlt.rollout.cuda_graphs import next_power_of_two
from megatron_tlt.rollout.model_calls import ModelCalls
from megatron_tlt.rollout.sampling import SamplingParams, sample, target_logprobs
from megatron_tlt.rollout.spec.drafting import DrafterState, cache_headroom, feasible_shape, speculative_step
from megatron_tlt.rollout.spec.selector import DraftSelector, DraftShape, arm_name
from megatron_tlt.rollout.types import Completion, DecodeRows, EngineStats, OutputBuffers, Request, SharedQueue, StepOutput
from megatron_tlt.seeds import derive_seed

SPEC_MODES = ("off", "chain", "tree", "adaptive")
DRAFT_MODES = ("coupled", "topk")
# A deep chain: coupled drafts at temperature 1 accept ~6 of 8 on the rollout bench's model (3.4 of 4 at depth 4).
DEFAULT_SHAPES = {"chain": DraftShape.chain(8), "tree": DraftShape(depth=4, topk=4, num_verify=12)}


def pad_right(seqs: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Token lists -> [P, max_len] int64, right-padded (padding sits after each row's tokens, so causal
    attention never lets a real token see it)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)


def next_prefill_groups(pending: deque, num_free: int, max_prefill_tokens: int) -> list[list[Request]]:
    """Pop the queue's head requests that fit in `num_free` slots, grouped by prompt (a group shares one
    prefill); stop adding prompts once the padded prefill would exceed `max_prefill_tokens` (the first
    group always goes)."""
    groups: list[list[Request]] = []
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
        drafts: str = "coupled",  # "coupled": first children use the target's position noise | "topk": the drafter's best
        batch_invariant: bool = False,  # bit-identical target logits whatever the batch / verify shape (see Randomness)
        precision: str = "auto",  # "fp8": the target's linears in FP8 while generating (rollout/fp8.py); "auto": the model's dtype
        fp8_gemm: str = "auto",  # FP8 GEMM path: auto | scaled_mm | triton | reference (ops.fp8.resolve_gemm_path)
        fp8_block: int = 128,  # FP8 block edge (weights block x block, activations 1 x block per token)
    ):
        if drafts not in DRAFT_MODES:
            raise ValueError(f"drafts must be one of {DRAFT_MODES}, got {drafts!r}")
        self.drafts = drafts
        self.model_calls = ModelCalls(
            model, max_seq_len=max_seq_len, cache_budget_bytes=cache_budget_bytes, max_batch=max_batch, dtype=dtype,
            cuda_graphs=cuda_graphs, batch_invariant=batch_invariant, precision=precision, fp8_gemm=fp8_gemm, fp8_block=fp8_block,
        )
        self.device = self.model_calls.device
        self.max_seq_len = self.model_calls.max_seq_len
        self.num_slots = self.model_calls.num_slots  # slots requests can own
        self.return_hidden = return_hidden
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = EngineStats()
        self.spec, self.draft_shape, self.selector = spec, None, None
        self.drafter_state: Optional[DrafterState] = None  # what the drafter has been fed, per slot
        if spec != "off":
            arms = self._configure_spec(model, drafter, spec, draft_shape, selector)
            deepest = max(a.depth for a in arms)
            if drafter_feed_capacity < deepest:
                raise ValueError(f"drafter_feed_capacity={drafter_feed_capacity} must be >= the deepest draft ({deepest})")
            self.model_calls.add_drafter(drafter, self.max_seq_len + cache_headroom(arms, drafter_feed_capacity))
            self.drafter_state = DrafterState(self.model_calls, drafter_feed_capacity)
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

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Cache all tokens but the last of each prompt in its slot, in one padded call.

        Returns [P, H]: the final hidden state at each prompt's second-to-last position (the one that
        predicts its last token), zeros for one-token prompts (nothing to prefill).
        """
        calls = self.model_calls
        H = calls.hidden_size
        last_hidden = torch.zeros(len(prompts), H, dtype=calls.hidden_dtype, device=self.device)  # [P, H]
        rows = [i for i, p in enumerate(prompts) if len(p) > 1]
        if not rows:
            return last_hidden
        tokens = pad_right([prompts[i][:-1] for i in rows]).to(self.device)  # [R, W]
        idx = torch.tensor(rows, device=self.device)
        slot_ids = torch.tensor([slots[i] for i in rows], device=self.device)
        hidden = calls.prefill(tokens, slot_ids)  # [R, W, H]
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
        hidden, logits = self.model_calls.decode(
            rows.last_tokens[:, None], rows.lengths[:, None], rows.slots, rows.lengths, kv_len=max(rows.host_lengths) + 1
        )  # [B, 1, H], [B, 1, V]
        logp = target_logprobs(logits[:, 0], params)  # [B, V]
        tokens = sample(logp[:, None], rows.seeds, rows.num_generated[:, None], greedy=params.greedy)[:, 0]  # [B]
        return StepOutput(
            tokens=tokens[:, None],
            logprobs=logp.gather(-1, tokens[:, None]),
            hidden=hidden,
            num_new=torch.ones_like(tokens),
        )

    def spec_step(self, rows: DecodeRows, params: SamplingParams, draft_shape: DraftShape) -> StepOutput:
        """Speculative step (`spec.drafting.speculative_step`): the accepted drafts of `draft_shape` and the
        correction/bonus token per row, with the target's logprobs and hidden states."""
        out = speculative_step(self.drafter_state, rows, params, draft_shape, self.drafts == "coupled")
        self._accepted[rows.slots] += out.num_new - 1  # all but the last token are accepted drafts
        for r in rows.requests:
            r.spec_steps += 1
        return out

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
        self, prompts: list[list[int]], params: SamplingParams, seed_ids: Optional[list[int]] = None,
        shared: Optional[SharedQueue] = None,
    ) -> list[list[Completion]]:
        """Completions [prompt][sample] for token-id prompts; ValueError on bad input before any work.
        `seed_ids` [P] name the prompts in their request seeds (default: their positions), so that a
        prompt's samples do not depend on which batch or DP rank it lands in. With `shared` (work stealing,
        which needs `seed_ids`) other rollout replicas may run some of these requests, and this engine runs
        other replicas' queued requests once its own queue is empty: the Completions are the same either way."""
        params.validate()
        self._check_prompts(prompts)
        if seed_ids is None:
            if shared is not None:
                raise ValueError("a shared queue names requests by their seed ids: pass seed_ids")
            seed_ids = list(range(len(prompts)))
        elif len(seed_ids) != len(prompts):
            raise ValueError(f"{len(seed_ids)} seed_ids for {len(prompts)} prompts")
        with self.model_calls.target_weights():  # FP8 weights attached for the whole call (precision="fp8")
            return self._generate(prompts, params, seed_ids, shared)

    def fits(self, prompt) -> bool:
        """Whether `prompt` leaves room in this engine's context for a response token (else: "prompt_too_long")."""
        return len(prompt) < self.max_seq_len

    def _request(self, prompt_index: int, sample_index: int, prompt: list[int], seed_id: int, params: SamplingParams) -> Request:
        room = self.max_seq_len - len(prompt)
        return Request(prompt_index, sample_index, prompt, min(params.max_new_tokens, room),
                       derive_seed(params.seed, seed_id, sample_index), key=(seed_id, sample_index))

    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, seed_ids: list[int], shared: Optional[SharedQueue]
    ) -> list[list[Completion]]:
        t0 = time.perf_counter()
        self.stats = EngineStats()
        results: list[list[Optional[Completion]]] = [[None] * params.n for _ in prompts]
        pending: deque[Request] = deque()
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                if not self.fits(prompt):
                    results[i][j] = Completion([], [], "prompt_too_long", stats={"prompt_tokens": len(prompt)})
                else:
                    pending.append(self._request(i, j, prompt, seed_ids[i], params))

        buffers = self._output_buffers(params.max_new_tokens)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=self.device)
        free_slots = list(range(self.num_slots))
        rows = DecodeRows.empty(self.model_calls.hidden_size, self.model_calls.hidden_dtype, self.device)
        lost: list[Request] = []  # own requests another replica runs (work stealing)
        steps_done = 0
        while True:
            if shared is not None and free_slots:
                self._share(shared, pending, len(free_slots), lost, params, len(prompts))
            if pending and free_slots:
                rows = rows.cat(self._admit(pending, free_slots, steps_done))
            if not len(rows):  # nothing queued either: with free slots, every queued request was admitted
                break
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
                    if req.foreign:
                        shared.send(req.key, completion)
                    else:
                        results[req.prompt_index][req.sample_index] = completion
                    free_slots.append(req.slot)
                finished_set = set(finished)
                rows = rows.select([b for b in range(len(rows)) if b not in finished_set])
        if lost:
            self.stats.lost = len(lost)
            for req, completion in zip(lost, shared.receive([r.key for r in lost])):
                results[req.prompt_index][req.sample_index] = completion
        self.stats.wall_s = time.perf_counter() - t0
        return results

    def _share(self, shared: SharedQueue, pending: deque, num_free: int, lost: list, params: SamplingParams, num_prompts: int) -> None:
        """Work stealing, before an admission: claim the head of the own queue (dropping the requests other
        replicas took, into `lost`); with the own queue empty, take queued requests of other replicas instead."""
        while head := [r for r in itertools.islice(pending, num_free) if not r.claimed]:  # admission takes <= num_free
            for r, won in zip(head, shared.claim([r.key for r in head])):
                r.claimed = won
            taken = {id(r) for r in head if not r.claimed}
            if taken:
                lost += [r for r in head if id(r) in taken]
                kept = [r for r in pending if id(r) not in taken]
                pending.clear()
                pending.extend(kept)
        if pending:
            return
        prompt_of: dict[int, int] = {}  # seed id -> its prompt index in this call (after the caller's prompts)
        for (seed_id, sample), prompt in shared.steal(num_free):
            if not self.fits(prompt):
                raise RuntimeError(f"stolen request {(seed_id, sample)}: its prompt of {len(prompt)} tokens does not fit this "
                                   f"engine's context ({self.max_seq_len}); every replica must run the same engine settings")
            index = prompt_of.setdefault(seed_id, num_prompts + len(prompt_of))
            req = self._request(index, sample, prompt, seed_id, params)
            req.claimed = req.foreign = True
            pending.append(req)
            self.stats.stolen += 1

    def _account_step(self, rows: DecodeRows, out: StepOutput, new_lengths: list[int], step_s: float) -> None:
        """Count the step's kind per batch bucket; reward the selector with committed tokens per wall second
        (the step's time ends after the per-step sync, so on GPU it is the device's time too)."""
        counts = self.stats.arms_by_bucket.setdefault(next_power_of_two(len(rows)), {})
        name = arm_name(out.draft_shape)
        counts[name] = counts.get(name, 0) + 1
        self.stats.spec_steps += out.draft_shape is not None
        if self.selector is not None:
            step_s = self.model_calls.tp_max(step_s)  # every TP rank must pick the same shapes: they share one measurement
            self.selector.update(len(rows), out.draft_shape, sum(new_lengths) - sum(rows.host_lengths), step_s)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        vocab = self.model_calls.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {min(p)}, max {max(p)}")

    def _output_buffers(self, max_new_tokens: int) -> OutputBuffers:
        calls = self.model_calls
        hidden_size = calls.model_hidden_size if self.return_hidden else None
        return OutputBuffers.allocate(self.num_slots, max_new_tokens, hidden_size, calls.hidden_dtype, self.device)

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
            self.model_calls.copy_prefix(src, dst, max(len(g[0].prompt) - 1 for g in groups))
            for g in groups:
                for r in g[1:]:
                    r.shared_prefill = True
        if self.drafter_state is not None:
            self.drafter_state.admit([r.slot for r in requests], [len(r.prompt) for r in requests])
        self._accepted[torch.tensor([r.slot for r in requests], device=self.device)] = 0
        group_of_row = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=self.device)
        return DecodeRows.admitted(requests, group_hidden[group_of_row])

    def _commit(self, rows: DecodeRows, out: StepOutput, stop_ids: torch.Tensor, buffers: OutputBuffers) -> torch.Tensor:
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
            buffers.hidden[slot_rows, cols] = out.hidden[..., : buffers.hidden.shape[-1]].to(buffers.hidden.dtype)
        last = num_new - 1  # [B]
        rows.last_tokens = out.tokens.gather(1, last[:, None]).squeeze(1)
        rows.last_hidden = out.hidden[torch.arange(B, device=self.device), last].to(rows.last_hidden.dtype)
        rows.lengths = rows.lengths + num_new
        rows.num_generated = rows.num_generated + num_new
        return first_stop < num_new

    def _collect(
        self, rows: DecodeRows, finished: list[int], synced: list[list[int]], buffers: OutputBuffers, steps_done: int
    ) -> list[tuple[Request, Completion]]:
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
