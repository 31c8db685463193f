"""The EAGLE-style drafter head: it shares (never copies) the policy's embedding and LM head, its own
state holds only its weights, its KV-cache (prefill, decode, tree-masked) and packed modes agree with
the dense forward, and TP=2 (two gloo processes) gives the TP=1 outputs and gradients. CPU, fp32.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.drafter import Drafter
from megatron_tlt.models.kv_cache import CacheBatch
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict, named_shard_specs
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; the same maths summed in a different order
VOCAB, HIDDEN = 100, 64


@pytest.fixture(scope="module")
def tp_group():
    ps = init_parallel()
    yield ps.tp_group
    destroy_parallel()


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_layers=2, num_attention_heads=4, num_kv_heads=2)
    return ModelConfig(**{**base, **overrides})


def _drafter(tp_group, **overrides) -> Drafter:
    """A drafter over a tiny policy; every drafter parameter (norm weights too) is perturbed."""
    cfg = _config(**overrides)
    set_seed(0)
    drafter = Drafter(Policy(cfg, tp_group=tp_group))
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return drafter


def _inputs(batch: int, length: int, seed: int):
    """tokens [B, S], target_hidden [B, S, H], position_ids [B, S]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=gen)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen)
    return tokens, hidden, torch.arange(length).expand(batch, -1)


@pytest.mark.parametrize("tied", [False, True])
def test_shares_the_policy_embedding_and_lm_head_without_owning_them(tp_group, tied):
    drafter = _drafter(tp_group, tie_word_embeddings=tied)
    policy = drafter.policy
    policy_params = {id(p) for p in policy.parameters()}
    assert not policy_params & {id(p) for p in drafter.parameters()}
    state = drafter.state_dict()
    assert {k for k in state if not k.endswith("._extra_state")} == {name for name, _ in drafter.named_parameters()}
    assert all(name.split(".")[0] in ("fc", "layer", "norm") for name in state), sorted(state)
    assert not policy_params & {id(t) for t in drafter.state_dict(keep_vars=True).values()}

    tokens, hidden, _ = _inputs(2, 5, seed=1)
    torch.testing.assert_close(drafter.embed_input_ids(tokens), torch.nn.functional.embedding(tokens, policy.embed_tokens.weight))
    torch.testing.assert_close(drafter.compute_logits(hidden), hidden @ policy.output_weight()[:VOCAB].t())
    with torch.no_grad():  # the policy's weights move (an RL update): the drafter sees the new ones
        policy.output_weight().mul_(2.0)
    torch.testing.assert_close(drafter.compute_logits(hidden), hidden @ policy.output_weight()[:VOCAB].t())


@torch.no_grad()
def test_cache_prefill_and_decode_equal_the_dense_forward(tp_group):
    drafter = _drafter(tp_group)
    tokens, hidden, positions = _inputs(2, 9, seed=2)
    dense = drafter(tokens, hidden, positions)  # [B, S, H]

    cache = drafter.new_cache(num_slots=3, max_seq_len=16, dtype=torch.float32, device="cpu")
    slots, prefill = torch.tensor([2, 0]), [3, 6]  # rows at different lengths, in non-identity slots
    for b in range(2):
        n = prefill[b]
        out = drafter(
            tokens[b : b + 1, :n], hidden[b : b + 1, :n], positions[b : b + 1, :n],
            cache=CacheBatch(cache, slots[b : b + 1], torch.tensor([0]), kv_len=n),
        )
        torch.testing.assert_close(out[0], dense[b, :n], **TOL)
    start, rows = torch.tensor(prefill), torch.arange(2)
    for _ in range(3):  # batched one-token decode steps
        step = (tokens[rows, start, None], hidden[rows, start, None], positions[rows, start, None])  # [B, 1(, H)]
        out = drafter(*step, cache=CacheBatch(cache, slots, start, kv_len=int(start.max()) + 1))
        torch.testing.assert_close(out[:, 0], dense[rows, start], **TOL)
        start = start + 1


@torch.no_grad()
def test_tree_masked_step_equals_each_branch_alone(tp_group):
    drafter = _drafter(tp_group)
    prefix_len = 4
    tokens, hidden, positions = _inputs(1, prefix_len, seed=3)
    drafts, draft_hidden, _ = _inputs(1, 4, seed=4)  # nodes a, b (children of the root), c (of a), d (of c)
    parents = [-1, -1, 0, 2]
    depth = torch.tensor([[1, 1, 2, 3]])
    new_mask = torch.tensor([[[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool)

    cache = drafter.new_cache(num_slots=1, max_seq_len=16, dtype=torch.float32, device="cpu")
    drafter(tokens, hidden, positions, cache=CacheBatch(cache, torch.tensor([0]), torch.tensor([0]), kv_len=prefix_len))
    tree_out = drafter(
        drafts, draft_hidden, prefix_len - 1 + depth,
        cache=CacheBatch(cache, torch.tensor([0]), torch.tensor([prefix_len]), kv_len=prefix_len + 4, new_mask=new_mask),
    )  # [1, 4, H]
    for node in range(4):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path = path[::-1]
        branch = drafter(
            torch.cat([tokens, drafts[:, path]], 1),
            torch.cat([hidden, draft_hidden[:, path]], 1),
            torch.arange(prefix_len + len(path))[None],
        )
        torch.testing.assert_close(tree_out[0, node], branch[0, -1], **TOL, msg=lambda m: f"node {node}: {m}")


@torch.no_grad()
def test_packed_equals_each_example_alone(tp_group):
    drafter = _drafter(tp_group)
    lengths = [5, 1, 7]
    examples = [_inputs(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = drafter(
        torch.cat([t for t, _, _ in examples], 1), torch.cat([h for _, h, _ in examples], 1), torch.cat([p for _, _, p in examples], 1),
        cu_seqlens=torch.tensor([0, 5, 6, 13]),
    )  # [1, T, H]
    for (tokens, hidden, positions), part in zip(examples, packed[0].split(lengths)):
        torch.testing.assert_close(part, drafter(tokens, hidden, positions)[0], **TOL)


def _train_step(drafter: Drafter) -> dict[str, torch.Tensor]:
    """EAGLE losses on one batch with the policy frozen. Inputs at t are (x_{t+1}, f_t): the token label
    of position t is x_{t+2} = tokens[:, t+1], the hidden target f_{t+1} = hidden[:, t+1]."""
    drafter.policy.requires_grad_(False)
    tokens, hidden, positions = _inputs(2, 6, seed=5)
    out = drafter(tokens, hidden, positions)  # [B, S, H]
    logits = drafter.compute_logits(out)  # [B, S, V]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    hidden_loss = (out[:, :-1] - hidden[:, 1:]).pow(2).mean()
    (token_loss + hidden_loss).backward()
    return dict(hidden=out.detach(), logits=logits.detach())


def test_gradients_reach_only_the_drafter_when_the_policy_is_frozen(tp_group):
    drafter = _drafter(tp_group)
    _train_step(drafter)
    for name, p in drafter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in drafter.policy.parameters())


def _tp2_worker(rank: int, world_size: int, policy_weights, drafter_weights, reference) -> None:
    tp_group = init_parallel(ParallelConfig(tensor_parallel_size=2)).tp_group
    policy = Policy(_config(), tp_group=tp_group, init_weights=False)
    drafter = Drafter(policy, init_weights=False)
    load_full_state_dict(policy, policy_weights, tp_group)
    load_full_state_dict(drafter, drafter_weights, tp_group)
    outputs = _train_step(drafter)
    for key in ("hidden", "logits"):
        torch.testing.assert_close(outputs[key], reference[key], **TOL, msg=lambda m: f"rank {rank} {key}: {m}")
    for name, p, dim in named_shard_specs(drafter):
        grad = p.grad
        if dim is not None:
            parts = [torch.empty_like(grad) for _ in range(world_size)]
            dist.all_gather(parts, grad.contiguous(), group=tp_group)
            grad = torch.cat(parts, dim=dim)
        torch.testing.assert_close(grad, reference["grads"][name], **TOL, msg=lambda m: f"rank {rank} grad of {name}: {m}")


def test_tensor_parallel_matches_single_rank(tp_group):
    drafter = _drafter(tp_group)
    reference = _train_step(drafter)
    reference["grads"] = {name: p.grad for name, p in drafter.named_parameters()}
    policy_weights, drafter_weights = gather_full_state_dict(drafter.policy), gather_full_state_dict(drafter)
    run_distributed(_tp2_worker, world_size=2, args=(policy_weights, drafter_weights, reference))
