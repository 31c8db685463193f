"""Speculative decoding in the rollout engine (DESIGN invariant 4: lossless), the drafter kept fed without
re-prefill, and the adaptive draft selector.

Greedy speculative decoding must give plain decoding's tokens and hidden states, with a random drafter
(almost every draft rejected) and with a trained one (most accepted: multi-token commits, KV compaction
and re-feeding of accepted tokens all exercised). Sampled outputs must follow the target's exact
distribution (a tiny-vocabulary model, whose distribution over 2-token responses is enumerated), and a
deliberately biased acceptance rule must fail the same bound. The drafter, fed while decoding plainly,
must be exactly where a full drafter forward would be when speculation turns on. CPU, fp32, one thread.
"""
from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
import torch.distributed as dist
import engine_utils
from dist_utils import run_distributed
from engine_utils import record_forward_shapes, tokens_of

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config.schema import ModelConfig, ParallelConfig
from megatron_tlt.drafter import Drafter, Eagle3Drafter
from megatron_tlt.models.hf import hf_config_from_model_config, tlt_to_hf_state_dict, write_hf_dir
from megatron_tlt.models.kv_cache import CacheBatch, KVCache
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.state import destroy_parallel, init_parallel
from megatron_tlt.rollout import RolloutEngine, SamplingParams, target_logprobs
from megatron_tlt.rollout import engine as engine_module
from megatron_tlt.rollout.cuda_graphs import next_power_of_two as batch_bucket
from megatron_tlt.rollout.spec import drafting
from megatron_tlt.rollout import sampling
from megatron_tlt.rollout.spec.drafting import DrafterState
from megatron_tlt.rollout.spec.selector import OFF, DraftSelector, DraftShape, arm_name

CFG = ModelConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    max_position_embeddings=64, init_std=0.2,
)
WINDOW = 64
CHAIN, TREE = DraftShape.chain(4), DraftShape(depth=4, topk=3, num_verify=10)
# A one-token prompt (its first step cannot speculate), shared-prefix lengths, a 12-token prompt.
PROMPTS = [[7], [3, 9, 27, 81, 15], list(range(10, 22)), [5, 6]]
MAX_NEW = 32
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only fight over the shared cores
    ps = init_parallel()
    torch.manual_seed(0)
    yield Policy(CFG, tp_group=ps.tp_group).eval().requires_grad_(False)
    destroy_parallel()
    torch.set_num_threads(threads)


def make_engine(model, num_slots=8, max_seq_len=WINDOW, **kw) -> RolloutEngine:
    return engine_utils.make_engine(model, num_slots, max_seq_len, **kw)


def train_on_own_greedy_outputs(model, prompts: list[list[int]], steps: int = 150) -> Drafter:
    """A drafter fitted (EAGLE losses: next-next token + next hidden state) to the target's greedy continuations
    of `prompts`. The tests draft on these same prompts: the point is a drafter whose drafts are mostly
    accepted, so that long accepted paths are exercised; drafter generalisation is the benchmark's business."""
    results = make_engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=MAX_NEW + 8))
    inputs, hidden, positions, next_hidden, labels, lengths = [], [], [], [], [], []
    for prompt, (c,) in zip(prompts, results):
        x = torch.tensor(prompt + c.token_ids)  # [L]
        with torch.no_grad():
            f = model.hidden_states(x[None])[0]  # [L, H]
        L = len(x)
        # drafter position t < L-1 consumes (x_{t+1}, f_t); all but the last are trained on x_{t+2} and f_{t+1}
        inputs.append(x[1:]), hidden.append(f[:-1]), positions.append(torch.arange(L - 1))
        labels.append(x[2:]), next_hidden.append(f[1:-1]), lengths.append(L - 1)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    has_label = torch.ones(sum(lengths), dtype=torch.bool)
    has_label[cu_seqlens[1:] - 1] = False
    labels, next_hidden = torch.cat(labels), torch.cat(next_hidden)
    torch.manual_seed(1)
    drafter = Drafter(model)
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    for _ in range(steps):
        g = drafter(torch.cat(inputs)[None], torch.cat(hidden)[None], torch.cat(positions)[None], cu_seqlens=cu_seqlens)[0]
        g = g[has_label]  # [T, H]
        loss = torch.nn.functional.cross_entropy(drafter.compute_logits(g), labels) + 0.1 * (g - next_hidden).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


@pytest.fixture(scope="module")
def drafters(model):
    torch.manual_seed(2)
    drafters = {"random": Drafter(model).eval(), "trained": train_on_own_greedy_outputs(model, PROMPTS)}
    return {**drafters, "eagle3": Eagle3Drafter(model).eval()}  # the EAGLE-3 head (random): target features in the rows


# ---- the drafter's level-by-level visibility ----


@torch.no_grad()
def test_earlier_draft_levels_are_visible_to_descendants_only(model):
    """Level 2 nodes attend to level 1 nodes already in the cache through new_mask's leading columns."""
    prefix = torch.tensor([[4, 8, 15, 16, 23]])
    level1, level2 = torch.tensor([[30, 31]]), torch.tensor([[40, 41, 42]])
    parent_of_level2 = [0, 1, 0]  # nodes 40 and 42 are children of 30, node 41 of 31
    cache = KVCache.for_model(CFG, 1, num_slots=2, max_seq_len=16, dtype=torch.float32, device="cpu")
    slots, P = torch.tensor([1]), prefix.shape[1]
    model(prefix, cache=CacheBatch(cache, slots, torch.tensor([0]), kv_len=P))
    eye = torch.eye(2, dtype=torch.bool)[None]
    model(level1, position_ids=torch.full((1, 2), P), cache=CacheBatch(cache, slots, torch.tensor([P]), kv_len=P + 2, new_mask=eye))
    sees_level1 = torch.nn.functional.one_hot(torch.tensor(parent_of_level2), 2).bool()  # [3, 2]
    new_mask = torch.cat([sees_level1, torch.eye(3, dtype=torch.bool)], dim=1)[None]  # [1, 3, 2+3]
    level2_cache = CacheBatch(cache, slots, torch.tensor([P + 2]), kv_len=P + 5, new_mask=new_mask)
    got = model(level2, position_ids=torch.full((1, 3), P + 1), cache=level2_cache)  # [1, 3, V]
    for i, parent in enumerate(parent_of_level2):
        branch = torch.cat([prefix, level1[:, parent : parent + 1], level2[:, i : i + 1]], dim=1)
        torch.testing.assert_close(got[0, i], model(branch)[0, -1], **TOL)


# ---- identical to plain decoding, greedy or sampled ----

SAMPLING = {
    "greedy": SamplingParams(temperature=0, max_new_tokens=MAX_NEW),
    "t0.7_top_p": SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=MAX_NEW, n=2, seed=3),
    "t1_top_k": SamplingParams(temperature=1.0, top_k=40, max_new_tokens=MAX_NEW, n=2, seed=4),
    "t1": SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, n=2, seed=5),
}


def _spec_engine(model, drafter, spec, drafts="coupled", **kw):
    if spec == "adaptive":
        return make_engine(model, drafter=drafter, spec=spec, selector=DraftSelector([CHAIN, TREE], epsilon=0.3), drafts=drafts, **kw)
    return make_engine(model, drafter=drafter, spec=spec, draft_shape=CHAIN if spec == "chain" else TREE, drafts=drafts, **kw)


@pytest.fixture(scope="module")
def plain_outputs(model):
    return {name: make_engine(model, return_hidden=True).generate(PROMPTS, params) for name, params in SAMPLING.items()}


@pytest.mark.parametrize("drafts", ["coupled", "topk"])
@pytest.mark.parametrize("spec", ["chain", "tree", "adaptive"])
@pytest.mark.parametrize("which", ["random", "trained", "eagle3"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_speculative_equals_plain(model, drafters, plain_outputs, sampling, which, spec, drafts):
    """Every sample of every prompt: the same tokens, finish reasons, logprobs and hidden states as plain decoding."""
    engine = _spec_engine(model, drafters[which], spec, drafts, return_hidden=True)
    results = engine.generate(PROMPTS, SAMPLING[sampling])
    for plain_samples, samples in zip(plain_outputs[sampling], results):
        for p, s in zip(plain_samples, samples):
            assert (s.token_ids, s.finish_reason) == (p.token_ids, p.finish_reason)
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(p.logprobs), **TOL)
            torch.testing.assert_close(s.hidden_states, p.hidden_states, **TOL)
    stats = engine.stats
    per_completion = [(c.stats["accepted_drafts"], c.stats["spec_steps"]) for samples in results for c in samples]
    assert sum(a for a, _ in per_completion) == stats.accepted_drafts
    if spec != "adaptive":
        kinds = {}
        for counts in stats.arms_by_bucket.values():
            for name, n in counts.items():
                kinds[name] = kinds.get(name, 0) + n
        assert kinds == {OFF: 1, engine.draft_shape.name: stats.spec_steps}  # the one-token prompt's first step is plain
    if which == "trained" and sampling == "greedy" and spec != "adaptive":
        assert stats.mean_accept_len > 1.5


# ---- static shapes (the CUDA-graph path) ----


@pytest.mark.parametrize("spec,which", [("off", None), ("chain", "trained"), ("tree", "trained"), ("tree", "eagle3")])
def test_static_shapes_equal_exact_shapes(model, drafters, spec, which, monkeypatch):
    """cuda_graphs="eager" runs the calls a GPU captures with the padded batch and bucketed kv_len: the same
    greedy tokens as exact shapes, every target call at a power-of-two batch, padding only in the extra slot."""
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    kw = {} if spec == "off" else dict(drafter=drafters[which], spec=spec, draft_shape=CHAIN if spec == "chain" else TREE)
    exact = make_engine(model, num_slots=3, return_hidden=True, **kw).generate(PROMPTS, params)  # 3 live rows: padded to 4
    engine = make_engine(model, num_slots=3, return_hidden=True, cuda_graphs="eager", **kw)
    assert (engine.num_slots, engine.model_calls.cache.num_slots) == (3, 4)
    calls, hidden_states = [], model.hidden_states  # (batch, kv_len, slots) of each decode / verify call (prefills pass no positions)

    def recording(tokens, position_ids=None, cache=None, **kw):
        if position_ids is not None:
            calls.append((tokens.shape[0], cache.kv_len, cache.slots.tolist()))
        return hidden_states(tokens, position_ids=position_ids, cache=cache, **kw)

    monkeypatch.setattr(model, "hidden_states", recording)
    static = engine.generate(PROMPTS, params)
    for (e,), (s,) in zip(exact, static):
        assert (s.token_ids, s.finish_reason) == (e.token_ids, e.finish_reason)
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(e.logprobs), **TOL)
        torch.testing.assert_close(s.hidden_states, e.hidden_states, **TOL)
    batches = {batch for batch, _, _ in calls}
    assert batches <= {1, 2, 4} and 4 in batches  # 3 live rows run as 4
    assert {kv for _, kv, _ in calls} == {WINDOW}  # 64: the smallest bucket, cut to the cache length
    for batch, _, slots in calls:
        live = [s for s in slots if s != 3]
        assert slots == live + [3] * (batch - len(live)) and len(set(live)) == len(live)  # padding only in slot 3
    assert any(3 in slots for _, _, slots in calls)
    assert (engine.stats.spec_steps > 0) == (spec != "off")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
@pytest.mark.parametrize("spec", ["off", "tree"])
def test_cuda_graphs_equal_eager_on_gpu(model, spec):
    torch.manual_seed(0)
    policy = Policy(CFG, tp_group=model.tp_group).cuda().eval().requires_grad_(False)
    kw = {} if spec == "off" else dict(drafter=Drafter(policy).cuda().eval(), spec="tree", draft_shape=TREE)
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    eager = make_engine(policy, num_slots=3, cuda_graphs="off", **kw).generate(PROMPTS, params)
    engine = make_engine(policy, num_slots=3, cuda_graphs="capture", **kw)
    for _ in range(2):  # the second run replays the graphs captured in the first
        assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(eager)
    assert engine.model_calls.static_calls.graphs


@torch.no_grad()
def test_tree_levels_equal_dense_drafter_branches(model, drafters, monkeypatch):
    """Every drafted node's draft log-prob equals the one a dense drafter forward over its branch gives:
    committed (x_{t+1}, f_t) pairs, then the path's tokens, each fed with its parent's drafter output."""
    drafter, prompts = drafters["trained"], PROMPTS[1:3]
    trees = []
    draft = drafting.draft_tree
    monkeypatch.setattr(drafting, "draft_tree", lambda *args: trees.append(draft(*args)) or trees[-1])
    engine = make_engine(model, drafter=drafter, spec="tree", draft_shape=TREE)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=1))
    (tree,) = trees  # one step; its roots are the prompts' last tokens
    for b, prompt in enumerate(prompts):
        x = torch.tensor(prompt)
        f = model.hidden_states(x[None, :-1])[0]  # [L, H]
        memo = {}

        def output(path: tuple) -> torch.Tensor:  # drafter output after the root and then `path`
            if path not in memo:
                tokens = torch.cat([x[1:], torch.tensor(path, dtype=torch.long)])
                hidden = torch.cat([f] + [output(path[:i])[None] for i in range(len(path))])
                memo[path] = drafter(tokens[None], hidden[None], torch.arange(len(tokens))[None])[0, -1]
            return memo[path]

        paths = []
        for i in range(TREE.num_verify):
            parent = tree.parents[b, i].item()
            paths.append((paths[parent] if parent >= 0 else ()) + (tree.tokens[b, i].item(),))
            path = paths[-1]
            logq = drafter.compute_logits(output(path[:-1])[None]).log_softmax(-1)[0, path[-1]]
            torch.testing.assert_close(tree.draft_logprobs[b, i], logq, **TOL)
    assert tree.depth.max() >= 3  # nodes drafted from level-2 outputs, which saw level 1 through the cache


# ---- sampling: the target's logprobs and its exact distribution ----


@torch.no_grad()
@pytest.mark.parametrize("shape", [CHAIN, TREE], ids=["chain", "tree"])
def test_sampled_logprobs_are_the_target_distributions(model, drafters, shape):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=16, n=2, seed=4)
    engine = make_engine(model, drafter=drafters["trained"], spec="chain" if shape.is_chain else "tree", draft_shape=shape)
    results = engine.generate(PROMPTS[1:3], params)
    assert engine.stats.accepted_drafts > 0
    for prompt, samples in zip(PROMPTS[1:3], results):
        for c in samples:
            logits = model(torch.tensor([prompt + c.token_ids]))[0]  # [S, V]
            positions = torch.arange(len(c.token_ids)) + len(prompt) - 1
            expected = target_logprobs(logits[positions], params).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.isfinite(expected).all()
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, **TOL)


TINY = ModelConfig(
    vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1,
    max_position_embeddings=8, init_std=0.5,
)
NUM_SAMPLES = 4000


def _tv_bound(exact: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A TV distance that n exact samples exceed with probability < delta (as in test_speculative.py:
    Jensen for the mean, McDiarmid for the deviation)."""
    p = exact.double()
    return 0.5 * torch.sqrt(p * (1 - p) / n).sum().item() + math.sqrt(math.log(1 / delta) / (2 * n))


@torch.no_grad()
@pytest.mark.parametrize("shape", [DraftShape.chain(2), DraftShape(depth=2, topk=3, num_verify=5)], ids=["chain", "tree"])
def test_sampling_follows_the_exact_target_distribution(model, shape, monkeypatch):
    tiny = Policy(TINY, tp_group=model.tp_group).eval()  # the module's parallel state; its own weights
    torch.manual_seed(3)
    drafter = Drafter(tiny).eval()
    prompt, params = [1, 2, 3], SamplingParams(temperature=0.9, top_k=6, max_new_tokens=2, n=NUM_SAMPLES, seed=0)
    first = target_logprobs(tiny(torch.tensor([prompt]))[:, -1], params).exp()[0]  # [V]
    second = target_logprobs(tiny(torch.tensor([prompt + [x] for x in range(8)]))[:, -1], params).exp()  # [V, V]
    exact = (first[:, None] * second).flatten()  # [V*V] every 2-token response
    bound = _tv_bound(exact, NUM_SAMPLES)
    assert bound < 0.08

    def tv() -> float:
        engine = make_engine(
            tiny, num_slots=NUM_SAMPLES, max_seq_len=8, drafter=drafter, spec="chain" if shape.is_chain else "tree",
            draft_shape=shape, drafter_feed_capacity=2,
        )
        (samples,) = engine.generate([prompt], params)
        assert engine.stats.spec_steps == len(engine.stats.decode_batch_sizes)  # every step speculated
        codes = torch.tensor([c.token_ids[0] * 8 + c.token_ids[1] for c in samples])
        empirical = torch.bincount(codes, minlength=64).double() / NUM_SAMPLES
        return 0.5 * (empirical - exact.double()).abs().sum().item()

    assert tv() < bound
    # The classic mistake: noise keyed by the request only, the same at every position.
    keys = sampling.noise_keys
    monkeypatch.setattr(sampling, "noise_keys", lambda seeds, positions: keys(seeds, torch.zeros_like(positions)))
    assert tv() > bound


# ---- switching speculation on mid-generation: no re-prefill, drafter caught up exactly ----


class _OnAfter(DraftSelector):
    """Decodes plainly for the first `plain_steps` steps, then always drafts `shape`."""

    def __init__(self, shape: DraftShape, plain_steps: int):
        super().__init__([shape])
        self.shape, self.plain_steps, self.calls = shape, plain_steps, 0

    def choose(self, batch_size):
        self.calls += 1
        return None if self.calls <= self.plain_steps else self.shape


@torch.no_grad()
def test_switching_on_mid_generation_needs_no_reprefill(model, drafters, monkeypatch):
    """Two slots: the 58-token prompt reaches the context end after 6 plain steps and the third prompt takes
    its slot, so the rows have fed their drafters at different times when speculation turns on."""
    prompts, plain_steps = [PROMPTS[1], list(range(60, 118)), PROMPTS[2]], 11
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    expected = tokens_of(make_engine(model).generate(prompts, params))
    drafter = drafters["trained"]
    engine = make_engine(
        model, num_slots=2, drafter=drafter, spec="adaptive", selector=_OnAfter(CHAIN, plain_steps), drafter_feed_capacity=4
    )

    roots = []  # (request, committed length, drafter output at the root) of the first speculative step
    feed = DrafterState.feed

    def spy(self, rows, with_root):
        out = feed(self, rows, with_root)
        if with_root and not roots:
            roots.extend(zip(rows.requests, rows.host_lengths, out))
        return out

    monkeypatch.setattr(DrafterState, "feed", spy)
    shapes = record_forward_shapes(model, monkeypatch)
    results = engine.generate(prompts, params)
    monkeypatch.undo()

    assert tokens_of(results) == expected
    first_verify = shapes.index((2, 1 + CHAIN.num_verify))
    assert [s for s in shapes if s[1] > 1 + CHAIN.num_verify] == [(2, 57), (1, 11)]  # the two admissions' prefills
    assert [s for _, s in shapes[:first_verify] if s == 1] == [1] * plain_steps
    assert all(s == 1 + CHAIN.num_verify for _, s in shapes[first_verify:]), "only verify forwards after the switch"
    assert engine.stats.spec_steps == len(shapes) - first_verify > 0
    assert engine.stats.mean_accept_len > 1.5

    # The drafter output at the first speculative root equals a full drafter forward over the committed
    # sequence with the target's hidden states: (x_{t+1}, f_t) at positions 0 .. L-1.
    assert sorted(r.prompt_index for r, _, _ in roots) == [0, 2]
    assert len({length - len(r.prompt) for r, length, _ in roots}) == 2  # admitted at different steps
    for req, length, g_root in roots:
        x = torch.tensor([(req.prompt + results[req.prompt_index][0].token_ids)[: length + 1]])  # [1, L+1]
        f = model.hidden_states(x[:, :length])  # [1, L, H]
        dense = drafter(x[:, 1:], f, torch.arange(length)[None])  # [1, L, H]
        torch.testing.assert_close(g_root, dense[0, -1], **TOL)


# ---- queueing, the context end, adaptive mode ----


def test_queueing_with_speculative_decoding(model, drafters):
    """Requests wait for slots, so each is admitted at another step and into another slot than with plain
    decoding's eight slots: the samples are still plain decoding's."""
    prompts = [[i + 1] * (i + 2) for i in range(5)]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=9)
    expected = tokens_of(make_engine(model).generate(prompts, params))
    engine = make_engine(model, num_slots=2, drafter=drafters["trained"], spec="tree", draft_shape=TREE)
    results = engine.generate(prompts, params)
    assert tokens_of(results) == expected
    s = engine.stats
    assert max(s.decode_batch_sizes) == 2 and s.queued_at_step[0] == 8 and 5 <= s.prefill_calls <= 10
    assert s.spec_steps == len(s.decode_batch_sizes)
    assert all(c.stats["spec_steps"] >= 1 for samples in results for c in samples)


@pytest.mark.parametrize("shape", [CHAIN, TREE], ids=["chain", "tree"])
def test_rows_near_the_context_end_draft_less(model, drafters, shape, monkeypatch):
    max_seq_len = 24
    prompts = [list(range(1, 21)), [3, 9, 27]]  # room for 4 response tokens, and for 21
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    expected = make_engine(model, max_seq_len=max_seq_len).generate(prompts, params)
    spec = "chain" if shape.is_chain else "tree"
    engine = make_engine(model, max_seq_len=max_seq_len, drafter=drafters["random"], spec=spec, draft_shape=shape)
    shapes = record_forward_shapes(model, monkeypatch)
    results = engine.generate(prompts, params)
    assert tokens_of(results) == tokens_of(expected)
    assert [len(c.token_ids) for (c,) in results] == [4, 21] and results[0][0].finish_reason == "length"
    # verify rows: root + N with N <= max_seq_len - 1 - L, at most the shape's; no verify where no room
    steps = [s for _, s in shapes[1:]]
    assert steps[0] == 1 + min(shape.num_verify, max_seq_len - 1 - 19) and max(steps) <= 1 + shape.num_verify


def test_adaptive_engine_records_its_choices(model, drafters):
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    expected = tokens_of(make_engine(model).generate(PROMPTS, params))
    selector = DraftSelector([CHAIN, TREE], epsilon=0.2, seed=0)
    engine = make_engine(model, drafter=drafters["trained"], spec="adaptive", selector=selector)
    assert tokens_of(engine.generate(PROMPTS, params)) == expected
    kinds = engine.stats.arms_by_bucket
    assert set(kinds) <= {1, 2, 4} and sum(n for k in kinds.values() for n in k.values()) == len(engine.stats.decode_batch_sizes)
    assert {OFF, CHAIN.name, TREE.name} <= set(selector.choices[4])


def test_invalid_speculative_options(model, drafters):
    drafter = drafters["random"]
    with pytest.raises(ValueError, match="needs a drafter"):
        make_engine(model, spec="chain")
    with pytest.raises(ValueError, match="spec must be one of"):
        make_engine(model, drafter=drafter, spec="medusa")
    with pytest.raises(ValueError, match="topk = 1"):
        make_engine(model, drafter=drafter, spec="chain", draft_shape=TREE)
    with pytest.raises(ValueError, match="adaptive' only"):
        make_engine(model, drafter=drafter, spec="tree", selector=DraftSelector([TREE]))
    with pytest.raises(ValueError, match="feed capacity|drafter_feed_capacity"):
        make_engine(model, drafter=drafter, spec="chain", draft_shape=CHAIN, drafter_feed_capacity=2)
    with pytest.raises(ValueError, match="num_verify"):
        DraftShape(depth=2, topk=2, num_verify=7)  # 2 + 4 candidates


# ---- tensor parallelism ----


class _SkewedClock:
    """A per-rank clock whose steps take random, rank-dependent times: the ranks' own measurements disagree."""

    def __init__(self, seed: int):
        self.rng, self.now = random.Random(seed), 0.0

    def perf_counter(self) -> float:
        self.now += self.rng.uniform(0.001, 1.0)
        return self.now


TP_SAMPLING = [SamplingParams(temperature=0, max_new_tokens=16), SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, n=2, seed=1)]


def _tp_worker(rank: int, world_size: int, policy_weights, drafter_weights, expected) -> None:
    torch.set_num_threads(1)
    engine_module.time = _SkewedClock(seed=rank)  # this worker process only
    tp_group = init_parallel(ParallelConfig(tensor_parallel_size=world_size)).tp_group
    policy = Policy(CFG, tp_group=tp_group, init_weights=False).eval()
    load_full_state_dict(policy, policy_weights, tp_group)
    drafter = Drafter(policy, init_weights=False).eval()
    load_full_state_dict(drafter, drafter_weights, tp_group)
    engine = make_engine(policy, drafter=drafter, spec="adaptive", selector=DraftSelector([CHAIN, TREE], epsilon=0.3))
    pick, chosen = engine._pick_shape, []

    def agreed(rows):  # compare every step's choice before ranks that disagree run mismatched collectives
        shape = pick(rows)
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, arm_name(shape), group=tp_group)
        assert len(set(every_rank)) == 1, f"step {len(chosen)}: the TP ranks chose {every_rank}"
        chosen.append(every_rank[0])
        return shape

    engine._pick_shape = agreed
    for params, want in zip(TP_SAMPLING, expected):
        got = tokens_of(engine.generate(PROMPTS, params))
        assert got == want, f"rank {rank}: TP=2 differs from TP=1 ({params})"
    assert {CHAIN.name, TREE.name} <= set(chosen)


def test_tp2_matches_tp1(model, drafters):
    """The ranks' adaptive selectors see disagreeing clocks; they must still take the same steps."""
    expected = [tokens_of(make_engine(model).generate(PROMPTS, params)) for params in TP_SAMPLING]
    weights = (gather_full_state_dict(model), gather_full_state_dict(drafters["random"]))  # many steps
    run_distributed(_tp_worker, world_size=2, args=(*weights, expected))


# ---- the selector (fake rewards, no model) ----


def _run_bandit(selector: DraftSelector, reward_of, steps: int, batch_size: int = 4, seed: int = 0) -> list[str]:
    """Drive the selector with noisy fake rewards (tokens per second); returns the chosen arm names."""
    noise = random.Random(seed)
    names = []
    for step in range(steps):
        arm = selector.choose(batch_size)
        name = OFF if arm is None else arm.name
        selector.update(batch_size, arm, tokens=reward_of(name, step) * noise.uniform(0.9, 1.1), seconds=1.0)
        names.append(name)
    return names


ARMS = [DraftShape.chain(3), DraftShape(4, 4, 16)]
BASE = {OFF: 100.0, "chain3": 150.0, "tree4x4n16": 220.0}


def test_selector_converges_and_explores_with_probability_epsilon():
    steps, epsilon = 2000, 0.1
    names = _run_bandit(DraftSelector(ARMS, epsilon=epsilon, seed=1), lambda name, step: BASE[name], steps)
    assert names[:9] == [OFF, "chain3", "tree4x4n16"] * 3  # every arm is tried min_samples=3 times first
    wrong = sum(n != "tree4x4n16" for n in names[9:])
    expected_wrong = steps * epsilon * 2 / 3  # a random arm is a wrong one 2 times out of 3
    assert abs(wrong - expected_wrong) < 4 * math.sqrt(expected_wrong), (wrong, expected_wrong)
    greedy_only = _run_bandit(DraftSelector(ARMS, epsilon=0.0, seed=1), lambda name, step: BASE[name], 200)
    assert greedy_only[9:] == ["tree4x4n16"] * 191


def test_selector_leaves_an_arm_that_turns_worse_than_off():
    window, change = 16, 300

    def reward(name, step):  # the tree's drafter goes stale at `change`: it falls below plain decoding
        return 40.0 if name == "tree4x4n16" and step >= change else BASE[name]

    names = _run_bandit(DraftSelector(ARMS, epsilon=0.1, window=window, seed=2), reward, 1000)
    assert names[change - 50 : change].count("tree4x4n16") > 35
    after = names[change:]
    first_leave = next(i for i in range(len(after)) if after[i : i + 5].count("tree4x4n16") == 0)
    assert first_leave <= window  # the window throughput falls below chain3's after 7 bad steps
    assert after[window:].count("tree4x4n16") < 0.1 * len(after)  # exploration only
    assert max(after[window:].count(n) for n in BASE) == after[window:].count("chain3")


def test_selector_buckets_learn_separately_and_large_batches_decode_plainly():
    def reward(name, step):
        return BASE[name]

    selector = DraftSelector(ARMS, epsilon=0.1, max_spec_batch=32, seed=3)
    _run_bandit(selector, reward, 200, batch_size=3)
    big = _run_bandit(selector, lambda name, step: {OFF: 500.0, "chain3": 300.0, "tree4x4n16": 100.0}[name], 200, batch_size=20)
    assert _run_bandit(selector, reward, 100, batch_size=64) == [OFF] * 100
    assert batch_bucket(3) == 4 and batch_bucket(20) == 32 and batch_bucket(64) == 64 and batch_bucket(1) == 1
    assert statistics.mode(big) == OFF and selector.choices[4].most_common(1)[0][0] == "tree4x4n16"
    assert set(selector.choices) == {4, 32, 64}


def test_selector_is_deterministic_for_a_seed():
    def run(seed):
        return _run_bandit(DraftSelector(ARMS, epsilon=0.3, seed=seed), lambda name, step: BASE[name], 300)

    assert run(5) == run(5) and run(5) != run(6)


# ---- CLI ----


def test_cli_generate_with_a_drafter(model, drafters, tmp_path, capsys):
    from megatron_tlt.drafter.io import save_drafter

    model_dir, drafter_dir = tmp_path / "model", tmp_path / "drafter"
    write_hf_dir(model_dir, hf_config_from_model_config(CFG), tlt_to_hf_state_dict(gather_full_state_dict(model), CFG))
    save_drafter(drafter_dir, drafters["trained"])
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    base = ["generate", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out), "--temperature", "0",
            "--max-new-tokens", "16", "--max-seq-len", "48", "--kv-cache-gb", "0.001"]
    assert cli_main(base + ["--spec", "tree"]) == 2 and "--spec tree needs --drafter" in capsys.readouterr().err
    assert cli_main(base + ["--drafter", str(drafter_dir)]) == 2 and "only with --spec" in capsys.readouterr().err
    assert cli_main(base + ["--spec", "adaptive", "--drafter", str(drafter_dir)]) == 0
    assert "accepted drafts per row and step" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = make_engine(model, max_seq_len=48).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=16))
    assert [r["token_ids"] for r in rows] == [c.token_ids for (c,) in expected]
    assert all({"spec_steps", "accepted_drafts", "mean_accept_len"} <= set(r["stats"]) for r in rows)
    # sampled, top-k drafts: still plain decoding's samples (the CLI names request seeds by prompt index)
    sampled = [a if a != "0" else "1.0" for a in base] + ["--seed", "3", "--n", "2", "--spec", "tree", "--drafts", "topk", "--drafter", str(drafter_dir)]
    assert cli_main(sampled) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=3)
    expected = make_engine(model, max_seq_len=48).generate(PROMPTS, params)
    assert [r["token_ids"] for r in rows] == [c.token_ids for samples in expected for c in samples]


@torch.no_grad()
def test_batch_invariant_bf16_is_identical_to_plain_decoding_in_any_batch(model, drafters):
    """bf16 attention kernels reduce by the call's shapes, so a position's logits differ in the last bits between
    a decode and a verify forward or between batch sizes, and a near-tie of the noise can flip. With
    batch_invariant=True the target's attention runs per query in fp32: SD and every batch size give the same
    samples, bit for bit (hidden states too)."""
    bf16 = Policy(CFG, tp_group=model.tp_group, init_weights=False).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    drafter = Drafter(bf16, init_weights=False).eval()
    drafter.load_state_dict(drafters["trained"].state_dict(), strict=False)
    drafter = drafter.to(torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, CFG.vocab_size, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (12,), generator=g)]
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=2, seed=7)
    plain = make_engine(bf16, return_hidden=True, batch_invariant=True).generate(prompts, params)
    alone = make_engine(bf16, num_slots=1, return_hidden=True, batch_invariant=True).generate(prompts, params)
    spec = _spec_engine(bf16, drafter, "tree", return_hidden=True, batch_invariant=True)
    for other in (alone, spec.generate(prompts, params)):
        for plain_samples, samples in zip(plain, other):
            for p, s in zip(plain_samples, samples):
                assert s.token_ids == p.token_ids and s.logprobs == p.logprobs
                assert torch.equal(s.hidden_states, p.hidden_states)
    assert spec.stats.accepted_drafts > 0
