"""Activation recomputation (`Policy.set_recompute`, optim.recompute) changes memory, not maths.

selective, full and full every 2 layers give bit-identical losses and parameter gradients to none on a packed
micro-batch (`packed_forward` + backward), in one process and at TP = 2 in two gloo processes (megatron-core's
TP linears and their collectives inside the checkpointed layers); full recompute saves far fewer bytes for
backward than none (counted with `torch.autograd.graph.saved_tensors_hooks`), selective fewer; passes without
autograd are untouched. CPU, fp32.
"""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.data.packing import pack_sequences
from megatron_tlt.models.packed import packed_forward
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel, set_seed

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 100
CFG = ModelConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=4, num_attention_heads=4, num_kv_heads=2,
    qk_norm=True, qkv_bias=True,
)
MODES = (("selective", 1), ("full", 1), ("full", 2))


def _model(tp_group, cfg: ModelConfig = CFG) -> Policy:
    """A policy whose every parameter (norm weights and zero biases too) is perturbed."""
    set_seed(0)
    model = Policy(cfg, tp_group=tp_group)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(lengths=(9, 1, 14, 4, 23)):
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]
    return pack_sequences(seqs, train_masks=[torch.arange(n) >= n // 3 for n in lengths])


def _step(model: Policy, mode: str, every: int = 1):
    """Packed forward, backward of a logprob + entropy loss under `mode`: (loss, {name: grad})."""
    model.set_recompute(mode, every)
    model.zero_grad(set_to_none=True)
    pb = _batch()
    out = packed_forward(model, pb, compute_entropy=True)
    loss = -(out.logprobs * pb.loss_mask).sum() - 0.1 * (out.entropy * pb.loss_mask).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_identical(model: Policy, where: str) -> None:
    want_loss, want = _step(model, "none")
    for mode, every in MODES:
        loss, grads = _step(model, mode, every)
        case = f"{where}, recompute={mode} every={every}"
        assert torch.equal(loss, want_loss), f"{case}: loss {loss} != {want_loss}"
        assert grads.keys() == want.keys()
        for name, g in grads.items():
            assert torch.equal(g, want[name]), f"{case}: gradient of {name} differs by {(g - want[name]).abs().max()}"


def test_recompute_gives_identical_losses_and_gradients():
    _assert_identical(_model(init_parallel().tp_group), "TP=1")


def _tp2_worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    ps = init_parallel(ParallelConfig(tensor_parallel_size=2))
    _assert_identical(_model(ps.tp_group), f"TP=2 rank {rank}")


def test_recompute_at_tp2_gives_identical_losses_and_gradients():
    run_distributed(_tp2_worker, world_size=2)


def _saved_bytes(model: Policy, mode: str, pb) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after one packed forward."""
    model.set_recompute(mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = packed_forward(model, pb, compute_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()  # the graph is whole: it runs
    return sum(saved.values())


def test_recompute_saves_fewer_activation_bytes():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_layers=4, num_attention_heads=4, num_kv_heads=2)
    model = _model(init_parallel().tp_group, cfg)
    pb = _batch((200, 150, 162))  # T = 512
    none, selective, full = (_saved_bytes(model, mode, pb) for mode in ("none", "selective", "full"))
    assert full * 4 <= none, f"full recompute saves {full} bytes, none {none}: expected at least 4x fewer"
    assert selective < none, f"selective recompute saves {selective} bytes, none {none}"


@torch.no_grad()
def test_passes_without_autograd_are_untouched():
    model = _model(init_parallel().tp_group)
    pb = _batch()
    want = packed_forward(model, pb).hidden
    for mode, every in MODES:
        model.set_recompute(mode, every)
        assert torch.equal(packed_forward(model, pb).hidden, want), mode
    with pytest.raises(ValueError, match="recompute='partial'"):
        model.set_recompute("partial")
