"""The distributed optimizer (optim.distributed=true: torch's ZeRO-1 over the DP group) in real gloo processes:
DP=2 sharded == DP=1 plain AdamW after 3 updates, each rank holding about half the AdamW state (the shards
disjoint, together the whole); a run checkpoint saved sharded at DP=2 (each rank writing its own shard) resumes
at DP=1 and at DP=2, and a plain DP=1 one at DP=2 sharded, bit-exact; rollback restores each rank's shard
exactly; `train` resumes bit-exact with optim.distributed=true at DP=2."""
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed

from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint, optimizer_state
from megatron_tlt.config import ModelConfig, load_config
from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.data.datasets import PromptSampler
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import destroy_parallel, init_parallel
from megatron_tlt.parallel.sharding import gather_full_state_dict, load_full_state_dict
from megatron_tlt.rl.sample import Sample
from megatron_tlt.step.checkpointing import RunState
from megatron_tlt.step.stages import assign_advantages
from megatron_tlt.train import train
from megatron_tlt.trainer.policy import PolicyTrainer

CFG = ModelConfig(vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_attention_heads=4, num_kv_heads=2)
# eps=1: Adam's update a smooth function of the gradient, so DP summation order moves it by rounding only
OPTIM = OptimConfig(lr=1e-2, eps=1.0, micro_batch_tokens=40)

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(ps, init: str) -> Policy:
    model = Policy(CFG, ps.tp_group, init_weights=False)
    load_full_state_dict(model, torch.load(init))
    return model


def _trainer(model, ps, distributed: bool) -> PolicyTrainer:
    return PolicyTrainer(model, replace(OPTIM, distributed=distributed), AlgoConfig(), ps, total_steps=8)


def _update(trainer: PolicyTrainer, ps, seed: int) -> dict:
    """One packed update on 12 samples drawn from `seed`; each DP rank trains whole groups of them."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(12):
        prompt = torch.randint(0, 96, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(0, 96, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(prompt, resp, [-4.0] * len(resp), reward=float((i + seed) % 3 == 0), group=i // 4))
    samples = assign_advantages(samples, AlgoConfig(), 16, ps)[0]
    mine = [s for s in samples if s.group % ps.dp_size == ps.dp_rank]
    batch = exchange_for_update(mine, OPTIM.micro_batch_tokens, ps)
    metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    return metrics


def _synthetic_steps(trainer: PolicyTrainer, steps) -> None:
    """What `trainer.step` does after its gradients are summed and clipped, with gradients that do not depend on
    the DP layout (so DP=1 and DP=2 can be compared bit for bit)."""
    for k in steps:
        g = torch.Generator().manual_seed(k)
        for p in trainer.model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        trainer.optimizer.step()
        trainer.scheduler.step()


def _local_state(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    """This rank's optimizer state as saved: `<param name>/<key>` -> a copy."""
    return {k: v.clone() for k, v in optimizer_state(trainer.model, trainer.optimizer).items()}


def _run_state(trainer: PolicyTrainer) -> RunState:
    return RunState(trainer.model, trainer, PromptSampler(8, seed=0))


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture
def init(tmp_path) -> str:
    ps = init_parallel()
    torch.manual_seed(0)
    torch.save(gather_full_state_dict(Policy(CFG, ps.tp_group)), tmp_path / "init.pt")
    return str(tmp_path / "init.pt")


# ---- DP=2 sharded == DP=1 plain; the state is split in two ----
def _equivalence_worker(rank: int, world_size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    ps = init_parallel()
    trainer = _trainer(_policy(ps, init), ps, distributed=True)
    for seed in range(3):
        assert _update(trainer, ps, seed)["skipped_update"] == 0
    torch.save({"weights": gather_full_state_dict(trainer.model), "state": _local_state(trainer)}, Path(out) / f"rank{rank}.pt")


def test_dp2_distributed_equals_dp1_plain_and_halves_the_state(tmp_path, init):
    ps = init_parallel()
    plain = _trainer(_policy(ps, init), ps, distributed=False)
    for seed in range(3):
        assert _update(plain, ps, seed)["skipped_update"] == 0
    expected, full_state = gather_full_state_dict(plain.model), _local_state(plain)
    destroy_parallel()
    run_distributed(_equivalence_worker, world_size=2, args=(init, str(tmp_path)))

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        for name, w in expected.items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {name}")
    # each parameter's AdamW state lives on exactly one rank, and the two shards are about equal
    shards = [got["state"] for got in ranks]
    assert not shards[0].keys() & shards[1].keys() and shards[0].keys() | shards[1].keys() == full_state.keys()
    numel = [sum(v.numel() for k, v in s.items() if not k.endswith("/step")) for s in shards]
    assert sum(numel) == sum(v.numel() for k, v in full_state.items() if not k.endswith("/step"))
    assert max(numel) <= 0.6 * sum(numel), f"unbalanced shards: {numel}"
    for shard in shards:
        for k, v in shard.items():
            torch.testing.assert_close(v, full_state[k], rtol=1e-4, atol=1e-7, msg=k)


# ---- run checkpoints: DP=2 sharded -> DP=1 and DP=2; DP=1 plain -> DP=2 sharded ----
def _checkpoint_worker(rank: int, world_size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    ps = init_parallel()
    straight = _trainer(_policy(ps, init), ps, distributed=True)
    _synthetic_steps(straight, [1, 2])
    _run_state(straight).save(out / "dp2", step=2, files={})
    torch.save(sorted(_local_state(straight)), out / f"saved_keys{rank}.pt")
    _synthetic_steps(straight, [3])
    weights, state = gather_full_state_dict(straight.model), _local_state(straight)
    torch.save({"weights": weights, "state": state}, out / f"straight{rank}.pt")

    for saved in ("dp2", "dp1"):  # resumed at DP=2 sharded: from its own checkpoint, and from a plain DP=1 one
        resumed = _trainer(_policy(ps, init), ps, distributed=True)
        assert _run_state(resumed).load(out / saved) == 2
        _synthetic_steps(resumed, [3])
        _assert_equal(gather_full_state_dict(resumed.model), weights, f"rank {rank}, from {saved}: weights")
        _assert_equal(_local_state(resumed), state, f"rank {rank}, from {saved}: optimizer state")


def test_checkpoint_saved_at_dp2_resumes_at_dp1_and_dp2_bit_exact(tmp_path, init):
    ps = init_parallel()
    plain = _trainer(_policy(ps, init), ps, distributed=False)
    _synthetic_steps(plain, [1, 2])
    _run_state(plain).save(tmp_path / "dp1", step=2, files={})
    destroy_parallel()
    run_distributed(_checkpoint_worker, world_size=2, args=(init, str(tmp_path)))

    # each rank wrote only the state of the parameters it owns
    md = dcp.FileSystemReader(tmp_path / "dp2" / "optimizer").read_metadata()
    for r in range(2):
        written = {idx.fqn for idx, info in md.storage_data.items() if info.relative_path.startswith(f"__{r}_")}
        assert written == set(torch.load(tmp_path / f"saved_keys{r}.pt"))

    straight = [torch.load(tmp_path / f"straight{r}.pt") for r in range(2)]
    ps = init_parallel()
    resumed = _trainer(_policy(ps, init), ps, distributed=False)
    assert _run_state(resumed).load(tmp_path / "dp2") == 2
    _synthetic_steps(resumed, [3])
    _assert_equal(gather_full_state_dict(resumed.model), straight[0]["weights"], "DP=1 from DP=2: weights")
    _assert_equal(_local_state(resumed), {**straight[0]["state"], **straight[1]["state"]}, "DP=1 from DP=2: optimizer state")


# ---- rollback of a non-finite update restores each rank's shard ----
def _rollback_worker(rank: int, world_size: int, init: str) -> None:
    torch.set_num_threads(1)
    ps = init_parallel()
    trainer = _trainer(_policy(ps, init), ps, distributed=True)
    assert _update(trainer, ps, 0)["skipped_update"] == 0  # a good step: the AdamW state exists
    weights, state = gather_full_state_dict(trainer.model), _local_state(trainer)
    assert 0 < len(state) < 3 * len(weights)  # this rank's shard
    for lr in (math.inf, 1e38):  # NaN weights after the step; a step size that overflows fp32 (torch raises)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        assert _update(trainer, ps, 1)["rolled_back_update"] == 1.0
        _assert_equal(gather_full_state_dict(trainer.model), weights, f"rank {rank}, lr {lr}: weights")
        _assert_equal(_local_state(trainer), state, f"rank {rank}, lr {lr}: optimizer state")
    assert trainer.version == 1


def test_rollback_restores_the_sharded_state(init):
    destroy_parallel()
    run_distributed(_rollback_worker, world_size=2, args=(init,))


# ---- `megatron-tlt train` at DP=2 with optim.distributed=true: 4 steps == 2, resume, 2 more ----
def _train_worker(rank: int, world_size: int, runs: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    runs = Path(runs)

    def cfg(name, *extra):
        return load_config(None, [
            f"run.dir={runs / name}", "run.steps=4", "run.save_every=2", "optim.distributed=true", "run.prompts_per_step=4",
            "rollout.n=2", "rollout.max_new_tokens=8", "data.num_examples=32", "data.eval_examples=4", "reward.num_workers=0",
            "run.tensorboard=false", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
            "optim.lr=1e-3", "rollout.temperature=1.0", *extra,
        ])

    train(cfg("straight"))
    if rank == 0:
        shutil.copytree(runs / "straight" / "checkpoints" / "step_2", runs / "resumed" / "checkpoints" / "step_2")
    dist.barrier()
    train(cfg("resumed", "run.resume=true"))


def test_train_resume_is_bit_exact_with_the_distributed_optimizer(tmp_path):
    run_distributed(_train_worker, world_size=2, args=(str(tmp_path),), timeout_s=300)
    for state in ("model", "optimizer"):
        a = load_full_state_dict_from_checkpoint(tmp_path / "straight" / "checkpoints" / "step_4", state)
        b = load_full_state_dict_from_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_4", state)
        _assert_equal(a, b, f"{state}: 4 steps != 2 + resume + 2")
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
