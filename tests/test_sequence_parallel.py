"""Sequence parallelism (`Policy(..., sequence_parallel=True)`, parallel.sequence_parallel) is exact.

The parent process computes the TP = 1 reference on a packed micro-batch of an odd token count (so the row is
padded to a multiple of TP): loss, logprobs, final hidden states, every parameter gradient, and the weights
after one AdamW step. Two gloo workers load the same full weights at TP = 2 and run the same step without
sequence parallelism, with it, and with it under selective and full recompute; each matches TP = 1, and
sequence parallel matches TP = 2 without it. Off CUDA megatron-core's sequence-parallel collectives run through
`parallel.tensor_parallel`'s Functions (all_gather_single / reduce_scatter_single, which gloo has); the
CUDA path is `test_gpu.py::test_sequence_parallel_on_two_gpus`. Without autograd the model is not sharded.
fp32 on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.models.packed import packed_forward
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict, named_shard_specs

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; TP and SP sum the same terms in a different order
VOCAB = 100
CONFIGS = {
    "qk_norm_qkv_bias_untied": dict(num_attention_heads=4, num_kv_heads=2, qk_norm=True, qkv_bias=True),
    "tied_gqa": dict(num_attention_heads=8, num_kv_heads=2, tie_word_embeddings=True),
}
RUNS = {"tp2": dict(sequence_parallel=False), "tp2_sp": dict(sequence_parallel=True),
        "tp2_sp_selective": dict(sequence_parallel=True, recompute="selective"),
        "tp2_sp_full": dict(sequence_parallel=True, recompute="full")}


def _config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=3, **CONFIGS[name])


def _batch():
    lengths = (9, 1, 14, 5)  # T = 29: one token of padding at TP = 2
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    return pack_sequences(seqs, train_masks=[torch.arange(n) >= n // 3 for n in lengths])


def _full(model: Policy, tensors: dict[str, torch.Tensor], tp_group) -> dict[str, torch.Tensor]:
    """Full-size tensors from this rank's `tensors` (by parameter name), all-gathered along partition dims."""
    out = {}
    for name, p, dim in named_shard_specs(model):
        t = tensors[name].contiguous()
        if dim is None or dist.get_world_size(tp_group) == 1:
            out[name] = t.clone()
            continue
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, t, group=tp_group)
        out[name] = torch.cat(parts, dim=dim)
    return out


def _step(model: Policy, tp_group) -> dict:
    """Packed forward + backward of a logprob + entropy loss, then one AdamW step: the outputs, the full
    gradients and the full weights after the step."""
    pb = _batch()
    out = packed_forward(model, pb, compute_entropy=True)
    mask = pb.loss_mask.to(out.logprobs.device)
    loss = -(out.logprobs * mask).sum() - 0.1 * (out.entropy * mask).sum()
    loss.backward()
    grads = _full(model, {n: p.grad for n, p in model.named_parameters()}, tp_group)
    # Adam's first update is lr * g / (|g| + eps): eps well above fp32 rounding keeps a gradient at rounding
    # level (whose sign the summation order decides) from moving its weight by lr.
    torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.1).step()
    return dict(loss=loss.detach(), logprobs=out.logprobs.detach(), hidden=out.hidden.detach(), grads=grads,
                stepped=gather_full_state_dict(model, tp_group))


def _assert_close(got: dict, want: dict, case: str) -> None:
    for key in ("loss", "logprobs", "hidden"):
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m: f"{case}, {key}: {m}")
    for key in ("grads", "stepped"):
        assert got[key].keys() == want[key].keys()
        for name, t in got[key].items():
            torch.testing.assert_close(t, want[key][name], **TOL, msg=lambda m: f"{case}, {key} {name}: {m}")


def _reference(name: str, path) -> None:
    """TP = 1 in this process: the full weights and `_step` of config `name`, saved to `path`."""
    tp_group = init_parallel().tp_group
    try:
        set_seed(0)
        model = Policy(_config(name), tp_group=tp_group)
        with torch.no_grad():
            for p in model.parameters():  # norm weights and zero-initialised biases too
                p.add_(0.1 * torch.randn_like(p))
        weights = gather_full_state_dict(model)
        torch.save(dict(weights=weights, **_step(model, tp_group)), path)
    finally:
        destroy_parallel()


def _worker(rank: int, world_size: int, ref_dir: str) -> None:
    torch.set_num_threads(1)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    for name in CONFIGS:
        ref = torch.load(f"{ref_dir}/{name}.pt")
        results = {}
        for run, opts in RUNS.items():
            model = Policy(_config(name), tp_group=ps.tp_group, init_weights=False, sequence_parallel=opts["sequence_parallel"])
            load_full_state_dict(model, ref["weights"], ps.tp_group)
            model.set_recompute(opts.get("recompute", "none"))
            results[run] = _step(model, ps.tp_group)
            _assert_close(results[run], ref, f"{name}, rank {rank}, {run} vs TP=1")
        for run in ("tp2_sp", "tp2_sp_selective", "tp2_sp_full"):
            _assert_close(results[run], results["tp2"], f"{name}, rank {rank}, {run} vs tp2")

        # Without autograd (rollouts, no-grad logprob passes) the row is not sharded: the same fast path.
        plain = Policy(_config(name), tp_group=ps.tp_group, init_weights=False)
        sp = Policy(_config(name), tp_group=ps.tp_group, init_weights=False, sequence_parallel=True)
        for m in (plain, sp):
            load_full_state_dict(m, ref["weights"], ps.tp_group)
        tokens = _batch().tokens[None]
        with torch.no_grad():
            assert torch.equal(sp(tokens), plain(tokens)), f"{name}, rank {rank}: no-grad forward"
        with pytest.raises(ValueError, match="packed input"):
            sp(tokens)


def test_sequence_parallel_matches_tp2_and_tp1(tmp_path):
    for name in CONFIGS:  # references first: the parent's process group is gone before the workers start
        _reference(name, tmp_path / f"{name}.pt")
    run_distributed(_worker, world_size=2, args=(str(tmp_path),))
