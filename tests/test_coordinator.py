"""TLT spot training: the online drafter buffer (byte cap, oldest steps evicted first, host copies, newest-first
draws, alignment with the policy trainer's hidden states) and the coordinator in real gloo processes: a rank
whose rollout is done trains until the slow rank finishes and stops within one drafter step, the merge leaves
bit-identical drafter weights and Adam state on both ranks, a rank with nothing to train blocks without
spinning, and TP ranks of a replica (the two processes replaying them) take the same steps. CPU, fp32, one
thread per process.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.config.schema import AlgoConfig, ModelConfig, OptimConfig
from megatron_tlt.coordinator import SpotTrainer
from megatron_tlt.coordinator.spot import buckets
from megatron_tlt.drafter import Drafter
from megatron_tlt.drafter.data import DrafterBuffer, DrafterExample, from_trainer_output, policy_examples
from megatron_tlt.drafter.trainer import DrafterTrainer
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel, set_seed
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.rl.sample import Sample
from megatron_tlt.trainer.policy import PolicyTrainer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
H = 8  # hidden size of the synthetic buffer examples
SLACK_S = 0.25  # scheduling jitter allowed on top of one drafter step


pytestmark = pytest.mark.usefixtures("one_thread")


def example(code: int, length: int) -> DrafterExample:
    """`length` tokens all equal to `code`, hidden states all equal to it: 8 + 4 * H bytes per token."""
    return DrafterExample(torch.full((length,), code, dtype=torch.int64), torch.full((length, H), float(code)))


def stored_codes(buffer: DrafterBuffer) -> list[int]:
    return [int(e.tokens[0]) for step in sorted(buffer._steps) for e in buffer._steps[step]]


def first_codes(batch) -> list[int]:
    return [int(batch.tokens[start]) for start in batch.cu_seqlens[:-1]]


# ---- the buffer ----
def test_buffer_stays_under_its_cap_and_evicts_the_oldest_steps_first(caplog):
    size = example(0, 5).tokens.numel() * 8 + 5 * H * 4  # 200 bytes
    buffer = DrafterBuffer(max_bytes=5 * size)
    buffer.add(0, [example(c, 5) for c in (0, 1, 2)])
    buffer.add(1, [example(c, 5) for c in (10, 11, 12)] + [example(13, 1)])  # 1 token: nothing to train, not kept
    assert stored_codes(buffer) == [1, 2, 10, 11, 12]
    buffer.add(2, [example(c, 5) for c in (20, 21, 22, 23)])
    assert stored_codes(buffer) == [12, 20, 21, 22, 23]  # step 0 first, then the oldest of step 1
    assert (buffer.bytes, buffer.num_examples, buffer.num_tokens) == (5 * size, 5, 25)
    with caplog.at_level(logging.WARNING):
        buffer.add(3, [example(30, 30), example(31, 30)])  # each larger than the whole cap
    assert stored_codes(buffer) == [12, 20, 21, 22, 23] and buffer.bytes <= buffer.max_bytes
    assert len(caplog.records) == 1 and "dropped 2 example(s)" in caplog.text


def test_buffer_keeps_detached_host_copies_in_their_dtype():
    packed = torch.randn(20, H, dtype=torch.bfloat16, requires_grad=True) * 2  # a trainer's packed [T, H]
    buffer = DrafterBuffer(max_bytes=2**20)
    buffer.add(0, [DrafterExample(torch.arange(5), packed[4:9])])
    (stored,) = buffer._steps[0]
    assert stored.hidden.dtype == torch.bfloat16 and stored.hidden.device.type == "cpu" and not stored.hidden.requires_grad
    assert torch.equal(stored.hidden, packed[4:9].detach())
    assert stored.hidden.untyped_storage().nbytes() == 5 * H * 2  # its own storage, not the packed tensor's
    assert buffer.bytes == 5 * 8 + 5 * H * 2


def test_batches_prefer_the_newest_step():
    buffer = DrafterBuffer(max_bytes=2**20)
    assert next(buffer.batches(10, random.Random(0)), None) is None  # empty: nothing to draw
    buffer.add(0, [example(c, 4) for c in range(10)])
    buffer.add(1, [example(100 + c, 4) for c in range(10)])
    batches = buffer.batches(max_tokens=10, rng=random.Random(0))
    drawn = []
    for _ in range(200):
        batch = next(batches)
        assert batch.num_tokens <= 10 and torch.equal(batch.hidden[:, 0], batch.tokens.float())
        drawn += first_codes(batch)
    assert sorted(drawn[:10]) == list(range(100, 110))  # one pass over the newest step first
    newest_share = sum(c >= 100 for c in drawn[10:]) / len(drawn[10:])
    assert 0.55 < newest_share < 0.8, newest_share  # decay 0.5: 2/3 expected; the older step still drawn
    again = buffer.batches(max_tokens=10, rng=random.Random(0))  # same rng -> same batches (what TP relies on)
    assert [c for _ in range(200) for c in first_codes(next(again))] == drawn


def test_from_trainer_output_aligns_tokens_with_the_update_hidden_states():
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        prompt = torch.randint(0, 64, (3 + i,), generator=gen).tolist()
        response = torch.randint(0, 64, (2 + 3 * i,), generator=gen).tolist()
        samples.append(Sample(prompt, response, [-1.0] * len(response), reward=float(i % 2), advantage=i - 1.5, group=0))
    reference = policy_examples(model, [s.prompt_ids + s.response_ids for s in samples], max_tokens=64)  # before the update
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-2, micro_batch_tokens=24), AlgoConfig(), ps, total_steps=1)
    batch = exchange_for_update(samples, 24, ps)
    assert batch.samples == samples  # one DP rank: the share is the whole batch, in order
    _, hidden = trainer.step(batch.samples, batch.micro_batches, max_response_len=16, collect_hidden=True)
    examples = from_trainer_output(samples, hidden, CFG.hidden_size)
    assert len(examples) == len(samples)
    for s, ex, ref in zip(samples, examples, reference):
        start = len(s.prompt_ids) - 1
        assert ex.tokens.tolist() == (s.prompt_ids + s.response_ids)[start:]
        assert ex.hidden.shape == (len(s.response_ids) + 1, CFG.hidden_size)
        torch.testing.assert_close(ex.hidden, ref.hidden[start:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="hidden states for"):
        from_trainer_output(samples, {0: hidden[0][:-1]}, CFG.hidden_size)


def test_merge_buckets_group_consecutive_tensors_under_a_size():
    sizes = [3, 4, 10, 2, 2, 1]
    groups = buckets([torch.zeros(n) for n in sizes], max_numel=7)
    assert [[t.numel() for t in g] for g in groups] == [[3, 4], [10], [2, 2, 1]]


# ---- the coordinator, two gloo processes ----
def drafter_setup(ps, max_tokens: int = 48):
    """A trainer of the same tiny drafter on every rank, and a function making examples from its policy."""
    set_seed(0)
    policy = Policy(CFG, ps.tp_group)
    drafter = Drafter(policy)
    trainer = DrafterTrainer(drafter, lr=1e-3, max_tokens_per_micro_batch=max_tokens)

    def examples(seed: int) -> list[DrafterExample]:
        gen = torch.Generator().manual_seed(seed)
        return policy_examples(policy, [torch.randint(0, 64, (n,), generator=gen).tolist() for n in (12, 20, 9, 16)], 64)

    return trainer, examples


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def drafter_state(trainer: DrafterTrainer) -> torch.Tensor:
    """Weights, then each weight's Adam state in key order, flattened."""
    state = trainer.optimizer.state
    return flat([*trainer.params, *(state[p][k] for p in trainer.params for k in sorted(state[p]))])


def same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], p) for p in parts)


def _preempted_and_merged(rank: int, ps, trainer: DrafterTrainer, examples) -> torch.Tensor:
    """Rollout 0: rank 0 generates 2 s longer, rank 1 trains meanwhile and stops within one drafter step;
    the merge leaves the same drafter on both. Returns the merged drafter state."""
    initial = flat(trainer.params)
    buffer = DrafterBuffer(max_bytes=2**20)
    if rank == 1:  # rank 0 is the long-tail rank; its buffer stays empty
        buffer.add(0, examples(seed=1))
    spot = SpotTrainer(trainer, buffer, ps)
    dist.barrier()  # the rollout starts on both ranks together
    if rank == 0:
        time.sleep(2.0)
    stats = spot.spot_train(0)
    every = [None] * ps.world_size
    dist.all_gather_object(every, stats)
    if rank == 0:
        assert stats.steps == 0, stats  # the last to finish trains nothing
    else:
        assert stats.steps > 0, stats
        assert stats.stop_latency_s <= stats.max_step_time_s + SLACK_S, stats  # preempted within one step
        assert stats.idle_s > 1.0 and 0 < stats.idle_recovered_s <= stats.train_time_s, stats
        print(f"\nspot rank 1: {stats.steps} steps in {stats.train_time_s:.2f} s, "
              f"max step {1e3 * stats.max_step_time_s:.0f} ms, stop latency {1e3 * stats.stop_latency_s:.0f} ms, "
              f"recovered {stats.idle_recovered_s:.2f} of {stats.idle_s:.2f} idle s")
    before = drafter_state(trainer)
    metrics = spot.merge()
    assert metrics["drafter_steps"] == sum(s.steps for s in every)
    assert metrics["stop_latency_s"] == max(s.stop_latency_s for s in every)
    assert trainer.steps == metrics["drafter_steps"]  # the same count on both ranks
    merged = drafter_state(trainer)
    assert same_on_all_ranks(merged), "drafter weights or Adam state differ across DP ranks after the merge"
    assert not torch.equal(flat(trainer.params), initial)
    if rank == 1:  # weights 1 (all the steps) and 0: the merge hands rank 1's drafter and Adam state to both
        assert torch.equal(merged, before)
    return merged


def _blocks_without_spinning(rank: int, ps, trainer: DrafterTrainer, merged: torch.Tensor) -> None:
    """Rollout 1: nothing to train on rank 1, so it sleeps in store.wait until rank 0 is done."""
    spot = SpotTrainer(trainer, DrafterBuffer(max_bytes=2**20), ps)
    if rank == 0:
        time.sleep(1.5)
    wall, cpu = time.perf_counter(), time.process_time()
    stats = spot.spot_train(1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if rank == 1:
        assert stats.steps == 0 and wall > 1.0 and stats.stop_latency_s < SLACK_S, (stats, wall)
        assert cpu < 0.2, f"{cpu:.2f} CPU s during a {wall:.2f} s wait: spinning?"
    spot.merge()
    assert torch.equal(drafter_state(trainer), merged)  # no replica trained: nothing changes


def _tensor_parallel_ranks_agree(rank: int, ps, trainer: DrafterTrainer, examples) -> None:
    """The two processes replay the TP ranks of one replica (the coordinator's TP group is the world; the
    drafter itself stays unsharded), with identical drafters and buffers."""
    tp_ranks = dataclasses.replace(ps, tp_size=2, tp_rank=rank, tp_group=dist.group.WORLD, dp_size=1, dp_rank=0)
    buffer = DrafterBuffer(max_bytes=2**20)
    buffer.add(0, examples(seed=2))
    dist.barrier()
    start = time.perf_counter()  # one DP replica is always the last to finish: no step, no wait
    assert SpotTrainer(trainer, buffer, tp_ranks).spot_train(2).steps == 0
    assert time.perf_counter() - start < 0.5

    # A second DP replica, played by a thread on TP rank 0 that finishes 1 s later. The stop signal lives in
    # rank 0's in-process store, which only TP rank 0 reads: TP rank 1 follows its broadcast decisions.
    two_replicas = dataclasses.replace(tp_ranks, dp_size=2)
    store = dist.HashStore()
    if rank == 0:
        threading.Timer(1.0, SpotTrainer(trainer, buffer, two_replicas, store).rollout_finished, args=(3,)).start()
    stats = SpotTrainer(trainer, buffer, two_replicas, store).spot_train(3)
    every = [None] * ps.world_size
    dist.all_gather_object(every, stats)
    assert every[0].steps == every[1].steps > 0, every
    assert stats.stop_latency_s <= stats.max_step_time_s + SLACK_S, stats
    assert same_on_all_ranks(drafter_state(trainer))  # the same steps on the same micro-batches


def _worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    ps = init_parallel()
    assert ps.dp_size == 2
    trainer, examples = drafter_setup(ps)
    merged = _preempted_and_merged(rank, ps, trainer, examples)
    _blocks_without_spinning(rank, ps, trainer, merged)
    _tensor_parallel_ranks_agree(rank, ps, trainer, examples)


def test_spot_training_in_two_gloo_processes():
    """One spawn for all three scenarios: starting the workers costs more than running them."""
    run_distributed(_worker, world_size=2)
