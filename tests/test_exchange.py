"""Samples across DP ranks (`coordinator.exchange`): every sample reaches exactly one training rank intact,
a balanced batch moves no sample, and the plan moves whole micro-batches only while that lowers the larger load."""
import random

import numpy as np
import pytest
import torch
from dist_utils import run_distributed

from megatron_tlt.coordinator.exchange import exchange_for_update, plan_update
from megatron_tlt.data.packing import plan_micro_batches
from megatron_tlt.parallel import init_parallel
from megatron_tlt.rl.sample import FINISH_REASONS, Sample

pytestmark = pytest.mark.usefixtures("one_thread")


def rank_samples(rank: int, n: int) -> list[Sample]:
    """Distinct samples per rank, all fields set (group ids of rank r: r*100 + k // 2)."""
    rng = random.Random(rank)
    out = []
    for k in range(n):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 6))]
        response = [rng.randrange(1000) for _ in range(rng.randint(0, 30))]
        logprobs = [float(np.float32(rng.uniform(-5, 0))) for _ in response]  # fp32 values, as the engine's
        out.append(Sample(prompt, response, logprobs, reward=rng.choice([0.0, 0.1, 1.0]),
                          advantage=rng.gauss(0, 1), group=rank * 100 + k // 2, finish_reason=rng.choice(FINISH_REASONS),
                          trained=rng.random() < 0.8, policy_version=7))
    return out


def _worker(rank, world_size, counts):
    ps = init_parallel()
    everything = [s for r in range(world_size) for s in rank_samples(r, counts[r])]  # DP-rank order
    batch = exchange_for_update(rank_samples(rank, counts[rank]), 64, ps)
    assert batch.response_lengths == [len(s.response_ids) for s in everything]
    assert batch.reward_mean == pytest.approx(sum(s.reward for s in everything) / len(everything))
    # this rank's share arrives intact, in global order
    shares = [None] * world_size
    torch.distributed.all_gather_object(shares, [everything.index(s) for s in batch.samples])
    assert sorted(i for share in shares for i in share) == list(range(len(everything)))  # each sample once
    assert shares[rank] == sorted(shares[rank])
    assert all(isinstance(s, Sample) and s == everything[i] for s, i in zip(batch.samples, shares[rank]))
    assert sorted(i for mb in batch.micro_batches for i in mb) == list(range(len(batch.samples)))
    for mb in batch.micro_batches:
        assert sum(len(batch.samples[i].tokens) for i in mb) <= 64 or len(mb) == 1
    # only samples that changed rank travel: each at most 48 bytes + 8 per token, plus 8 bytes per sample of lengths
    moved = [s for s in batch.samples if s not in rank_samples(rank, counts[rank])]
    assert batch.bytes_received <= 16 + 8 * max(counts) + sum(48 + 8 * len(s.tokens) for s in moved)
    assert moved or batch.bytes_received == 16 + 8 * max(counts)


@pytest.mark.parametrize("counts", [(9, 4), (0, 6)])
def test_exchange_sends_each_sample_to_one_rank_intact(counts):
    run_distributed(_worker, world_size=2, args=(counts,))


def test_one_rank_keeps_its_samples_in_order():
    ps = init_parallel()
    samples = rank_samples(0, 11)
    batch = exchange_for_update(samples, 64, ps)
    assert batch.samples == samples and batch.bytes_received == 0
    lengths = [len(s.tokens) for s in samples]
    assert sorted(map(sorted, batch.micro_batches)) == sorted(map(sorted, plan_micro_batches(lengths, 64)))


def test_plan_keeps_a_balanced_batch_in_place_and_moves_whole_micro_batches():
    assert plan_update([[10, 10], [10, 10]], 40) == [[[0, 1]], [[2, 3]]]  # balanced: nothing moves
    # rank 0 holds 100 tokens in micro-batches of <= 30, rank 1 holds 10: bins move until no move helps
    plan = plan_update([[30, 30, 20, 20], [10]], 30)
    loads = [sum([30, 30, 20, 20, 10][i] for b in bins for i in b) for bins in plan]
    assert sorted(i for bins in plan for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert max(loads) == 60 and min(loads) == 50  # the best split of these bins
    assert plan_update([[50], []], 64) == [[[0]], []]  # one micro-batch: moving it would not help
    assert plan_update([[], []], 64) == [[], []]
