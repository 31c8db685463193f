"""DESIGN invariant 2: TP=2 gives the same logits, logprobs, entropy and parameter gradients as TP=1.

The parent process computes the TP=1 reference (packed forward, chunked logprob loss, backward) and
saves it with the full weights; two spawned gloo workers load the same weights sharded at TP=2, run
the same step, all-gather what is sharded and compare. fp32 on CPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict, named_shard_specs
from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.logprob import vocab_parallel_logprobs
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; TP sums the same terms in a different order
VOCAB = 100  # padded to 128 rows: TP rank 1 holds rows 64..127, of which 36 are padding
CONFIGS = {
    "gqa_qkv_bias_untied": dict(num_attention_heads=8, num_kv_heads=2, qkv_bias=True),
    "tied_qk_norm": dict(num_attention_heads=4, num_kv_heads=2, tie_word_embeddings=True, qk_norm=True),
}


def _config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, **CONFIGS[name])


def _batch():
    lengths = (9, 1, 14, 4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    return pack_sequences(seqs, train_masks=[torch.arange(n) >= n // 3 for n in lengths])


def _step(model: Policy, tp_group) -> dict[str, torch.Tensor]:
    """Packed forward, backward of a logprob + entropy + z-loss (through the gathered logits):
    logits [T, V], hidden [T, H], logprobs / entropy [T]."""
    pb = _batch()
    hidden = model.hidden_states(
        pb.tokens[None], position_ids=pb.position_ids[None], cu_seqlens=pb.cu_seqlens, max_seqlen=pb.max_seqlen
    )  # [1, T, H]
    logits = model.compute_logits(hidden)  # [1, T, V]
    logprobs, entropy = vocab_parallel_logprobs(hidden[0], model.output_weight(), pb.targets, tp_group=tp_group, vocab_size=VOCAB, chunk_size=16)
    z_loss = logits[0].logsumexp(dim=-1).square().mean()
    (-(logprobs * pb.loss_mask).sum() - 0.1 * (entropy * pb.loss_mask).sum() + 0.01 * z_loss).backward()
    return dict(logits=logits[0], hidden=hidden[0], logprobs=logprobs, entropy=entropy)


def _gathered_grads(model: Policy, tp_group) -> dict[str, torch.Tensor]:
    """Full-size gradients: each TP-sharded .grad all-gathered along its partition dim."""
    grads = {}
    for name, p, dim in named_shard_specs(model):
        if dim is None:
            grads[name] = p.grad
            continue
        parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, p.grad.contiguous(), group=tp_group)
        grads[name] = torch.cat(parts, dim=dim)
    return grads


def _reference(name: str, path) -> None:
    """TP=1 in this process: full weights, step outputs and gradients of config `name`, saved to `path`."""
    tp_group = init_parallel().tp_group
    try:
        set_seed(0)
        model = Policy(_config(name), tp_group=tp_group)
        with torch.no_grad():
            for p in model.parameters():  # norm weights and zero-initialised biases too
                p.add_(0.1 * torch.randn_like(p))
        outputs = {k: v.detach() for k, v in _step(model, tp_group).items()}
        torch.save(dict(weights=gather_full_state_dict(model), grads=_gathered_grads(model, tp_group), **outputs), path)
    finally:
        destroy_parallel()


def _worker(rank: int, world_size: int, ref_dir: str) -> None:
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    for name in CONFIGS:
        ref = torch.load(f"{ref_dir}/{name}.pt")
        model = Policy(_config(name), tp_group=ps.tp_group, init_weights=False)
        load_full_state_dict(model, ref["weights"], ps.tp_group)
        outputs = _step(model, ps.tp_group)
        for key in ("logits", "hidden", "logprobs", "entropy"):
            torch.testing.assert_close(outputs[key].detach(), ref[key], **TOL, msg=lambda m: f"{name}, rank {rank}, {key}: {m}")
        grads = _gathered_grads(model, ps.tp_group)
        for key, want in ref["grads"].items():
            torch.testing.assert_close(grads[key], want, **TOL, msg=lambda m: f"{name}, rank {rank}, grad of {key}: {m}")

        # The op alone: vocab-parallel logprobs of the TP=1 hidden states over this rank's shard of the head.
        weight = model.output_weight().detach()  # [V_padded / 2, H]
        logprobs, entropy = vocab_parallel_logprobs(ref["hidden"], weight, _batch().targets, tp_group=ps.tp_group, vocab_size=VOCAB)
        torch.testing.assert_close(logprobs, ref["logprobs"], **TOL, msg=lambda m: f"{name}, rank {rank}, op logprobs: {m}")
        torch.testing.assert_close(entropy, ref["entropy"], **TOL, msg=lambda m: f"{name}, rank {rank}, op entropy: {m}")


def test_tp2_matches_tp1(tmp_path):
    for name in CONFIGS:  # references first: the parent's process group is gone before the workers start
        _reference(name, tmp_path / f"{name}.pt")
    run_distributed(_worker, world_size=2, args=(str(tmp_path),))
