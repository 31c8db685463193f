"""TLT's reason to exist, on a tiny policy: after RL moves the policy, a drafter trained online on the moved
policy's hidden states (the spot trainer's path: `DrafterBuffer` -> `buffer.batches` -> `DrafterTrainer.step`)
accepts clearly more draft tokens in greedy speculative decoding than the frozen drafter that was warmed up
on the policy before it moved; for both heads (eagle3: trained with training-time test on the fused
target features). CPU, fp32, one thread, seeded.
"""
from __future__ import annotations

import random

import pytest
import torch
from train_utils import fit_packed

from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.drafter import Drafter, DrafterBuffer, DrafterTrainer, policy_examples, train_drafter_offline
from megatron_tlt.drafter.model import build_drafter
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel, set_seed
from megatron_tlt.rollout import RolloutEngine, SamplingParams

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=64,
)
LENGTH = 24  # tokens per training sequence
PROMPT = 3  # prompt tokens: enough to fix the start and the stride
MAX_NEW = 20


def strided_sequences(n: int, gen: torch.Generator, strides: tuple[int, ...]) -> list[list[int]]:
    """s, s+d, s+2d, ... (mod vocab), d drawn from `strides`: a pattern a tiny policy learns in a few steps."""
    out = []
    for _ in range(n):
        start = int(torch.randint(0, CFG.vocab_size, (1,), generator=gen))
        stride = strides[int(torch.randint(0, len(strides), (1,), generator=gen))]
        out.append([(start + i * stride) % CFG.vocab_size for i in range(LENGTH)])
    return out


def sft(model: Policy, strides: tuple[int, ...], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    fit_packed(model, lambda: strided_sequences(16, gen, strides), steps)


def greedy_samples(model: Policy, prompts: list[list[int]]) -> list[list[int]]:
    engine = RolloutEngine(model, max_seq_len=PROMPT + MAX_NEW, cache_budget_bytes=1 << 24)
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
    return [p + cs[0].token_ids for p, cs in zip(prompts, engine.generate(prompts, params))]


def accept_len(model: Policy, drafter: Drafter, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Mean accepted draft tokens per speculative step in greedy chain decoding, and the tokens generated."""
    engine = RolloutEngine(model, max_seq_len=PROMPT + MAX_NEW, cache_budget_bytes=1 << 24, drafter=drafter, spec="chain")
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    return engine.stats.mean_accept_len, [p + cs[0].token_ids for p, cs in zip(prompts, out)]


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats several fighting over shared cores
    yield init_parallel()
    destroy_parallel()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["eagle3", "eagle"])
def test_online_drafter_beats_the_frozen_one_after_the_policy_moves(single_thread, arch):
    set_seed(0)
    policy = Policy(CFG, single_thread.tp_group).eval()
    old, new = (1, 2, 3), (5, 7, 9)  # the policy learns one family of strides, then RL moves it to another
    sft(policy, old, steps=60, seed=0)

    # Warm-up before RL: the drafter learns the policy as it is now, from the policy's own greedy samples.
    gen = torch.Generator().manual_seed(1)
    old_prompts = [s[:PROMPT] for s in strided_sequences(48, gen, old)]
    set_seed(1)
    frozen = train_drafter_offline(policy, greedy_samples(policy, old_prompts), steps=150, lr=3e-3,
                                   max_tokens_per_micro_batch=256, seed=1, arch=arch)

    # The policy moves (in place: the drafters share its embedding and LM head, as in the engine).
    sft(policy, new, steps=60, seed=2)
    gen = torch.Generator().manual_seed(3)
    new_prompts = [s[:PROMPT] for s in strided_sequences(56, gen, new)]
    rollout_prompts, eval_prompts = new_prompts[:40], new_prompts[40:]

    # TLT: the online drafter starts from the frozen one and trains on the moved policy's hidden states over
    # its own rollouts (what PolicyTrainer.step(collect_hidden=True) hands the buffer), as a spot trainer does.
    online = build_drafter(policy, arch)
    online.load_state_dict(frozen.state_dict())
    buffer = DrafterBuffer(max_bytes=1 << 22)
    buffer.add(0, policy_examples(policy, greedy_samples(policy, rollout_prompts), max_tokens=256, feature_layers=online.feature_layers))
    trainer = DrafterTrainer(online, lr=3e-3, max_tokens_per_micro_batch=256)
    batches = buffer.batches(max_tokens=256, rng=random.Random(0))
    for _ in range(100):
        assert not trainer.step(next(batches))["skipped"]

    frozen_len, frozen_tokens = accept_len(policy, frozen, eval_prompts)
    online_len, online_tokens = accept_len(policy, online, eval_prompts)
    print(f"mean accepted length after the policy moved: frozen drafter {frozen_len:.2f}, online drafter {online_len:.2f}")
    assert frozen_tokens == online_tokens == greedy_samples(policy, eval_prompts)  # lossless either way
    assert online_len > frozen_len + 0.5 and online_len > 1.5 * frozen_len
