"""Work stealing (coordinator/stealing.py, coordinator.steal): the store protocol (each request run by exactly one
replica: the owner's claims a prefix of its queue, the thieves' a suffix; a drained queue is never asked again; a
lost request's result arrives from its thief, and a thief that never sends is named after the timeout), the engine
with a shared queue (every stolen request's Completion reaches its own (prompt, sample) slot on the owner and equals
plain generation's), and a 2-rank run whose idle rank steals: the same samples as without stealing."""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from engine_utils import make_engine, tokens_of

from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.coordinator.stealing import StealingQueue
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.state import init_parallel
from megatron_tlt.rollout import SamplingParams
from megatron_tlt.rollout.types import Completion

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                  max_position_embeddings=64, init_std=0.2)


class CountingStore:
    """A store (a fresh HashStore by default) that counts the calls made through it and the claims among them."""

    def __init__(self, store=None):
        self.store, self.claims, self.calls = store if store is not None else dist.HashStore(), 0, 0

    def compare_set(self, *args):
        self.claims += 1
        return self.store.compare_set(*args)

    def __getattr__(self, name):
        self.calls += 1
        return getattr(self.store, name)


def _queue(rank, plan, store, n=2, timeout_s=30.0, max_seq_len=100):
    prompts = {g: [1] * (3 + g) for gids in plan.values() for g in gids}
    ps = SimpleNamespace(dp_rank=rank, dp_size=len(plan), tp_rank=0, tp_size=1)
    return StealingQueue("7.0", plan, prompts, n, lambda p: len(p) < max_seq_len, ps, store=store, timeout_s=timeout_s)


def test_owner_claims_a_prefix_thieves_a_suffix_and_results_come_back():
    store = CountingStore()
    plan = {0: [10, 11, 12], 1: [], 2: []}  # replica 0 holds 6 requests; 1 and 2 have none
    owner, thief, other = (_queue(r, plan, store) for r in range(3))
    assert owner.claim([(10, 0), (10, 1)]) == [True, True]
    assert thief.steal(2) == [((12, 1), [1] * 15), ((12, 0), [1] * 15)]  # from the tail, with the prompt
    assert other.steal(1) == [((11, 1), [1] * 14)]  # past the first thief's claims
    assert owner.claim([(11, 0), (11, 1)]) == [True, False]
    assert owner.claim([(12, 0)]) == [False]
    assert thief.steal(4) == []  # meets the owner's claim (11, 0): replica 0 is drained
    before = store.claims
    assert thief.steal(4) == [] and store.claims == before  # and is never asked again
    for q, key in ((thief, (12, 0)), (other, (11, 1)), (thief, (12, 1))):
        q.send(key, Completion([key[0], key[1]], [0.0, -1.0], "stop"))
    got = owner.receive([(11, 1), (12, 0), (12, 1)])
    assert [c.token_ids for c in got] == [[11, 1], [12, 0], [12, 1]]


def _tp_replica_worker(rank: int, world_size: int) -> None:
    # the two processes are the TP ranks of replica 0; replica 1 (a thief) is played by TP rank 0 through the same store
    store = CountingStore(dist.distributed_c10d._get_default_store())
    plan, prompts = {0: [5, 6], 1: []}, {5: [1, 2, 3], 6: [4, 5]}
    ps = SimpleNamespace(dp_rank=0, dp_size=2, tp_rank=rank, tp_size=2, tp_group=dist.group.WORLD)
    owner = StealingQueue("3.1", plan, prompts, 2, lambda p: True, ps, store=store)
    if rank == 0:
        thief = StealingQueue("3.1", plan, prompts, 2, lambda p: True, SimpleNamespace(dp_rank=1, dp_size=2, tp_rank=0, tp_size=1), store=store)
        assert thief.steal(1) == [((6, 1), [4, 5])]
    dist.barrier()
    assert owner.claim([(5, 0), (5, 1), (6, 0), (6, 1)]) == [True, True, True, False]  # on both TP ranks
    if rank == 0:
        thief.send((6, 1), Completion([42], [-0.5], "stop"))
    assert [c.token_ids for c in owner.receive([(6, 1)])] == [[42]]
    if rank == 1:
        assert store.claims == store.calls == 0  # only TP rank 0 talks to the store


def test_the_tp_ranks_of_a_replica_get_tp_rank_0s_answers():
    run_distributed(_tp_replica_worker, world_size=2)


def test_a_thief_that_never_sends_is_named():
    store = dist.HashStore()
    plan = {0: [3], 1: [4]}
    owner, thief = _queue(0, plan, store, n=1, timeout_s=0.5), _queue(1, plan, store, n=1)
    assert thief.steal(1) == [((3, 0), [1] * 6)]
    assert owner.claim([(3, 0)]) == [False]
    with pytest.raises(RuntimeError, match=r"DP rank\(s\) 1 never sent them back"):
        owner.receive([(3, 0)])


def test_too_long_prompts_are_never_stealable():
    plan = {0: [1, 40], 1: []}  # prompt of group 40: 43 tokens, no room in a 43-token context
    thief = _queue(1, plan, dist.HashStore(), n=1, max_seq_len=43)
    assert [key for key, _ in thief.steal(4)] == [(1, 0)]


@pytest.fixture
def model():
    ps = init_parallel()
    torch.manual_seed(0)
    return Policy(CFG, tp_group=ps.tp_group).eval()


def _generate_pair(model, prompts, params, plan, store, owner_first=None):
    """Replica 0 generates `prompts` (group ids 0..P-1) with 1 slot, replica 1 has none of its own and 2 slots; both
    with a StealingQueue over `store`. owner_first: True/False run one after the other, None concurrently."""
    engines = [make_engine(model, 1, 40), make_engine(model, 2, 40)]
    queues = [StealingQueue("0.0", plan, dict(enumerate(prompts)), params.n, engines[0].fits,
                            SimpleNamespace(dp_rank=r, dp_size=2, tp_rank=0, tp_size=1), store=store) for r in (0, 1)]
    out = [None, None]

    def run(r):
        mine = [prompts[g] for g in plan[r]]
        out[r] = engines[r].generate(mine, params, seed_ids=plan[r], shared=queues[r])

    order = [0, 1] if owner_first else [1, 0]
    if owner_first is None:
        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for r in order:
            run(r)
    return out, [e.stats for e in engines]


@pytest.mark.parametrize("owner_first", [True, False, None], ids=["owner_alone", "thief_takes_all", "concurrent"])
def test_stolen_requests_reach_their_slots_with_plain_generations_tokens(model, owner_first):
    torch.manual_seed(1)
    prompts = [torch.randint(1, CFG.vocab_size, (4 + k,)).tolist() for k in range(3)]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=3, seed=5, stop_token_ids=(2,))
    plain = make_engine(model, 4, 40).generate(prompts, params, seed_ids=[0, 1, 2])
    (mine, theirs), (owner, thief) = _generate_pair(model, prompts, params, {0: [0, 1, 2], 1: []}, dist.HashStore(), owner_first)
    assert theirs == []
    assert tokens_of(mine) == tokens_of(plain)  # every result in its (prompt, sample) slot, token for token
    for cs, ref in zip(mine, plain):  # the batch differs (1 or 2 slots vs 4): logprobs equal up to the last bits
        for c, r in zip(cs, ref):
            assert c.finish_reason == r.finish_reason
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), rtol=0, atol=1e-5)
    assert owner.lost == thief.stolen
    total = sum(len(c.token_ids) for cs in plain for c in cs)
    assert owner.generated_tokens + thief.generated_tokens == total  # each request ran on one replica only
    if owner_first:
        assert thief.stolen == 0  # the owner had claimed everything before the thief looked
    elif owner_first is False:
        assert thief.stolen == 9 and thief.generated_tokens == total


def _run_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_idle_rank_steals_and_the_samples_do_not_change(tmp_path):
    # imported here: the TP test's spawned workers import this module, and need none of the run machinery
    from test_rollout_scheduler import _cfg as scheduler_run_config, _samples
    from test_save_rollouts import _rows

    from megatron_tlt.cli.demo import train_on_local_ranks

    # one prompt per step: rank 1 owns nothing and steals from rank 0's queue (1 slot each); lr 1e-12 as in
    # test_rollout_scheduler, so the updates cannot differ in summation order
    one = ("run.prompts_per_step=1", "rollout.n=4", "rollout.max_batch=1")
    plain_dir, steal_dir = tmp_path / "plain", tmp_path / "steal"
    train_on_local_ranks(scheduler_run_config(plain_dir, *one), 2)
    train_on_local_ranks(scheduler_run_config(steal_dir, *one, "coordinator.steal=true"), 2)
    plain, stolen = _rows(plain_dir), _rows(steal_dir)
    assert stolen == plain  # every sample on its owner's rank (0), in order, token for token
    assert stolen[1] == [] and len(stolen[0]) == 4 * 4
    assert sum(m["sched_stolen"] for m in _run_metrics(steal_dir)) > 0
    assert all(m["sched_stolen"] == 0 for m in _run_metrics(plain_dir))
    assert _samples(stolen) == _samples(plain)
