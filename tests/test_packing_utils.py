"""Sequence packing: exact boundaries, bin-packing budget and coverage, rank balance, unpack."""
import logging
import random

import pytest
import torch

from megatron_tlt.data.packing import balance_across_ranks, pack_sequences, plan_micro_batches, unpack


def test_pack_boundaries_targets_and_positions():
    pb = pack_sequences([[5, 6, 7], [8], [9, 10]], ids=["a", "b", "c"])
    assert pb.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    assert pb.tokens.dtype == torch.int64
    assert pb.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert pb.cu_seqlens.dtype == torch.int32
    assert pb.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert pb.position_ids.dtype == torch.int64
    assert pb.max_seqlen == 3
    assert pb.targets.tolist() == [6, 7, 0, 0, 10, 0]
    assert pb.loss_mask.tolist() == [True, True, False, False, True, False]
    assert pb.loss_mask.dtype == torch.bool
    assert pb.example_ids == ["a", "b", "c"]


def test_pack_with_train_masks_and_tensor_inputs():
    seqs = [torch.tensor([1, 2, 3, 4]), torch.tensor([5]), torch.tensor([6, 7, 8])]
    # prompt/response split: only the masked-in tokens are targets
    masks = [[False, False, True, True], [True], torch.tensor([False, True, False])]
    pb = pack_sequences(seqs, train_masks=masks)
    assert pb.example_ids == [0, 1, 2]
    assert pb.targets.tolist() == [2, 3, 4, 0, 0, 7, 8, 0]
    # position t trains on token t+1 of the same example where that token's mask is True
    assert pb.loss_mask.tolist() == [False, True, True, False, False, True, False, False]


def test_pack_single_length_one_example():
    pb = pack_sequences([[42]])
    assert pb.cu_seqlens.tolist() == [0, 1]
    assert pb.position_ids.tolist() == [0]
    assert pb.targets.tolist() == [0]
    assert pb.loss_mask.tolist() == [False]
    assert pb.max_seqlen == 1


def test_pack_errors():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack_sequences([[1, 2], [], [3]])
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([])
    with pytest.raises(ValueError, match="train_mask 0 has length 1"):
        pack_sequences([[1, 2]], train_masks=[[True]])
    with pytest.raises(ValueError, match="ids"):
        pack_sequences([[1, 2]], ids=[0, 1])


def _assert_partition(bins, n):
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(n))


def test_plan_micro_batches_budget_and_coverage():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    bins = plan_micro_batches(lengths, max_tokens=256)
    _assert_partition(bins, len(lengths))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert all(b for b in bins)
    # first-fit decreasing packs tightly: within one bin of the lower bound here
    assert len(bins) <= -(-sum(lengths) // 256) + 1
    assert plan_micro_batches(lengths, max_tokens=256) == bins


def test_plan_micro_batches_oversize_examples_alone(caplog):
    lengths = [10, 300, 20, 500, 30]
    with caplog.at_level(logging.WARNING, logger="megatron_tlt.data.packing"):
        bins = plan_micro_batches(lengths, max_tokens=100)
    _assert_partition(bins, len(lengths))
    assert [1] in bins and [3] in bins
    assert [0, 2, 4] in bins
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 example" in warnings[0].getMessage()


def test_plan_micro_batches_multiple_of_rounding():
    lengths = [60, 50, 40, 30, 20, 10]
    assert len(plan_micro_batches(lengths, max_tokens=300)) == 1
    bins = plan_micro_batches(lengths, max_tokens=300, num_bins_multiple_of=4)
    assert len(bins) == 4
    assert all(bins), "enough examples to fill every bin"
    _assert_partition(bins, len(lengths))
    assert all(sum(lengths[i] for i in b) <= 300 for b in bins)

    bins = plan_micro_batches([5, 7], max_tokens=100, num_bins_multiple_of=4)
    assert len(bins) == 4
    assert sorted(bins) == [[], [], [0], [1]]

    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(50)]
    for k in (1, 2, 3, 8):
        bins = plan_micro_batches(lengths, max_tokens=128, num_bins_multiple_of=k)
        assert len(bins) % k == 0 and all(bins)
        _assert_partition(bins, len(lengths))
        assert all(sum(lengths[i] for i in b) <= 128 for b in bins)


def test_balance_across_ranks_beats_round_robin():
    lengths = [1000, 900, 10, 10, 10, 10, 10, 800, 10, 10, 10, 10]
    groups = balance_across_ranks(lengths, num_ranks=3)
    assert len(groups) == 3
    _assert_partition(groups, len(lengths))

    def spread(gs):
        sums = [sum(lengths[i] for i in g) for g in gs]
        return max(sums) - min(sums)

    round_robin = [list(range(r, len(lengths), 3)) for r in range(3)]
    assert spread(groups) < spread(round_robin)
    assert spread(groups) <= 200
    assert balance_across_ranks(lengths, num_ranks=3) == groups
    assert balance_across_ranks([3], num_ranks=2) == [[0], []]


def test_unpack_inverts_pack():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8], [9, 10]]
    pb = pack_sequences(seqs)
    assert [p.tolist() for p in unpack(pb.tokens, pb.cu_seqlens)] == seqs
    hidden = torch.arange(pb.tokens.numel() * 4, dtype=torch.float32).view(-1, 4)  # [T, 4]
    parts = unpack(hidden, pb.cu_seqlens)
    assert [p.shape for p in parts] == [(3, 4), (1, 4), (4, 4), (2, 4)]
    assert torch.equal(torch.cat(parts), hidden)
    with pytest.raises(ValueError, match="cu_seqlens covers 10"):
        unpack(hidden[:-1], pb.cu_seqlens)
