"""Issue 16, "nothing hangs, nothing is lost": every fault ends in a defined, tested outcome.

- a non-finite update is rolled back (weights and AdamW state), logged, and repeated ones stop the run;
  `optim.lr` must be finite and > 0 at load;
- the held-out evaluation scores through the RewardPool: a reward that hangs, raises, exits or returns a
  non-finite number scores 0 and is counted, within `reward.timeout_s`;
- a TLT rank whose peer died leaves spot training within a bounded time, and the launcher exits non-zero.
"""
import logging
import math

import pytest
import torch
import torch.distributed as dist

from megatron_tlt.cli import main as cli_main
from megatron_tlt.config import ModelConfig, load_config
from megatron_tlt.config.loader import ConfigError
from megatron_tlt.config.schema import AlgoConfig, OptimConfig
from megatron_tlt.coordinator.exchange import exchange_for_update
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel import init_parallel
from megatron_tlt.rl.sample import Sample
from megatron_tlt.step.stages import assign_advantages
from megatron_tlt.trainer.policy import PolicyTrainer, TrainingDiverged
from megatron_tlt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(vocab_size=96, make_vocab_size_divisible_by=32, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_attention_heads=4, num_kv_heads=2)


def _samples(ps, n: int = 8) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        resp = torch.randint(0, 96, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample([1, 2, 3], resp, [-4.0] * len(resp), reward=float(i % 2), group=i // 4))
    return assign_advantages(out, AlgoConfig(), 16, ps)[0]


def _run_cfg(tmp_path, *extra):
    return load_config(None, [
        f"run.dir={tmp_path / 'run'}", "run.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4",
        "data.num_examples=16", "data.eval_examples=2", "reward.num_workers=0", "run.tensorboard=false",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "rollout.temperature=1.0", *extra,
    ])


# ---- item 5: a non-finite update -------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf", "0", "-1e-3"])
def test_lr_must_be_finite_and_positive_at_load(lr):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"optim.lr={lr}"])
    assert "optim.lr=" in str(e.value) and "supported: a finite number > 0" in str(e.value)


def test_max_bad_updates_is_checked_at_load():
    with pytest.raises(ConfigError, match="optim.max_bad_updates=0 is not supported"):
        load_config(None, ["optim.max_bad_updates=0"])


def test_non_finite_weights_roll_the_update_back_and_repeats_stop(caplog):
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    optim = OptimConfig(lr=1e-3, max_bad_updates=2)
    trainer = PolicyTrainer(model, optim, AlgoConfig(), ps, total_steps=10)
    batch = exchange_for_update(_samples(ps), 64, ps)
    metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)  # a good step: Adam state exists
    assert metrics["skipped_update"] == 0 and trainer.version == 1
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    for group in trainer.optimizer.param_groups:  # lr inf (what the config now refuses): finite loss and gradient, NaN weights
        group["lr"] = math.inf
    with caplog.at_level(logging.WARNING):
        metrics, _ = trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert metrics["skipped_update"] == 1.0 and metrics["rolled_back_update"] == 1.0
    assert "non-finite weights after the update" in caplog.text and "rolled back" in caplog.text
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters()), "the weights were not rolled back"
    for p, s in trainer.optimizer.state.items():
        assert all(torch.equal(state[id(p)][k], v) for k, v in s.items()), "the AdamW state was not rolled back"
    assert trainer.version == 1 and trainer.bad_updates == 1
    with pytest.raises(TrainingDiverged, match=r"2 consecutive policy updates skipped or rolled back \(optim.max_bad_updates=2\)"):
        trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_without_rollback_a_non_finite_update_stops_at_once():
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-3, rollback=False), AlgoConfig(), ps, total_steps=10)
    for group in trainer.optimizer.param_groups:
        group["lr"] = math.inf
    batch = exchange_for_update(_samples(ps), 64, ps)
    with pytest.raises(TrainingDiverged, match=r"non-finite weights after the update .*optim.rollback=false keeps no copy"):
        trainer.step(batch.samples, batch.micro_batches, max_response_len=16)


def test_a_good_update_resets_the_count():
    ps = init_parallel()
    torch.manual_seed(0)
    model = Policy(CFG, ps.tp_group)
    trainer = PolicyTrainer(model, OptimConfig(lr=1e-3, max_bad_updates=2), AlgoConfig(), ps, total_steps=10)
    batch = exchange_for_update(_samples(ps), 64, ps)
    for lr in (math.inf, 1e-3, 1e38, 1e-3):  # bad (NaN weights), good, bad (torch: overflow), good: never 2 in a row
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        trainer.step(batch.samples, batch.micro_batches, max_response_len=16)
    assert trainer.version == 2 and trainer.bad_updates == 0


def test_a_diverging_run_stops_non_zero_without_saving_nan(tmp_path, capsys):
    # lr 1e38 passes the load check (finite, > 0) but overflows fp32 in the first update.
    overrides = [f"run.dir={tmp_path / 'run'}", "run.steps=4", "run.save_every=1", "optim.lr=1e38", "optim.max_bad_updates=2",
                 "run.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "data.num_examples=16",
                 "data.eval_examples=2", "reward.num_workers=0", "run.tensorboard=false", "model.hidden_size=32",
                 "model.intermediate_size=64", "model.num_layers=1", "rollout.temperature=1.0"]
    assert cli_main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "megatron-tlt train: error: 2 consecutive policy updates skipped or rolled back" in err
    assert "the update overflowed" in err
    # step 0 was rolled back (its checkpoint holds the finite pre-step weights); step 1 stopped the run unsaved
    saved = sorted(p.name for p in (tmp_path / "run").glob("checkpoints/step_*"))
    assert saved == ["step_1"]
    from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint

    weights = load_full_state_dict_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_1")
    assert weights and all(torch.isfinite(w).all() for w in weights.values()), "a checkpoint holds non-finite weights"


# ---- item 3: the held-out evaluation scores through the reward pool ---------------------------------


class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class _FixedEngine:
    """Answers every prompt with the same tokens: the evaluation's reward path without a model."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def generate(self, prompts, params):
        return [[_Completion(self.token_ids)] for _ in prompts]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_tlt.data.tokenizer import build_test_tokenizer, load_tokenizer

    return load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("fn, counted, message", [
    ("sleeps", "num_timeouts", "timed out after 0.5s"),
    ("raises", "num_errors", "ValueError: this reward always raises"),
    ("exits", "num_errors", "reward worker died (exit code 7)"),
    ("returns_inf", "num_errors", "reward function returned inf, not a finite number"),
])
def test_evaluation_scores_through_the_pool(tokenizer, caplog, fn, counted, message):
    from megatron_tlt.data.datasets import PromptDataset
    from megatron_tlt.rl.rewards import RewardPool, build_reward_fn
    from megatron_tlt.step.evaluate import evaluate

    ps = init_parallel()
    ds = PromptDataset.from_task("arithmetic", 4, 0, tokenizer, max_prompt_tokens=256)
    engine = _FixedEngine(tokenizer.encode("42", add_special_tokens=False))
    with RewardPool(build_reward_fn([{"name": f"fault_rewards:{fn}"}]), num_workers=2, timeout_s=0.5) as pool:
        with caplog.at_level(logging.WARNING):
            import time

            t0 = time.monotonic()
            accuracy = evaluate(engine, ds, pool, tokenizer, 4, ps)
            elapsed = time.monotonic() - t0
        assert accuracy == 0.0  # a failed call is not a correct answer (inf included)
        assert getattr(pool.stats, counted) == 4 and pool.stats.num_calls == 4
        assert message in caplog.text and "4 of 4 calls failed and score 0" in caplog.text
        assert elapsed < 10.0, f"evaluation took {elapsed:.1f} s"  # 2 rounds of the 0.5 s timeout + worker start-up
    with RewardPool(build_reward_fn([{"name": "fault_rewards:correct"}]), num_workers=1, timeout_s=5.0) as pool:
        assert evaluate(engine, ds, pool, tokenizer, 4, ps) == 1.0


def test_a_hanging_reward_does_not_hang_the_run(tmp_path):
    import time

    t0 = time.monotonic()
    run_dir = train(_run_cfg(tmp_path, "run.steps=1", "reward.fns=[{name: 'fault_rewards:sleeps'}]", "reward.num_workers=2",
                             "reward.timeout_s=0.5", "optim.lr=1e-3"))
    elapsed = time.monotonic() - t0
    # evaluation before (2 prompts) and after (2) and one step's 4 rollouts, each call cut at 0.5 s by 2 workers
    assert (run_dir / "checkpoints" / "step_1").is_dir()
    assert elapsed < 60.0, f"the run took {elapsed:.1f} s"


# ---- item 1: a TLT rank outlives its dead peer -------------------------------------------------------


def _spot_ps(**kw):
    import dataclasses

    return dataclasses.replace(init_parallel(), **kw)


@pytest.mark.parametrize("buffered", [True, False], ids=["training", "waiting"])
def test_spot_training_gives_up_after_max_wait_s(buffered):
    """A replica that never finishes (alive but stuck): spot training ends at drafter.max_wait_s, training or not."""
    import time

    from megatron_tlt.coordinator.spot import SpotTrainer
    from megatron_tlt.drafter import Drafter
    from megatron_tlt.drafter.data import DrafterBuffer, policy_examples
    from megatron_tlt.drafter.trainer import DrafterTrainer

    ps = _spot_ps(dp_size=2)  # a second DP replica that never reports
    policy = Policy(CFG, ps.tp_group)
    trainer = DrafterTrainer(Drafter(policy), lr=1e-3, max_tokens_per_micro_batch=48)
    buffer = DrafterBuffer(max_bytes=2**20)
    if buffered:
        buffer.add(0, policy_examples(policy, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]], 64))
    spot = SpotTrainer(trainer, buffer, ps, dist.HashStore(), max_wait_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"not every DP replica finished within drafter.max_wait_s=1 s"):
        spot.spot_train("0/0")
    elapsed = time.monotonic() - t0
    assert 0.95 <= elapsed < 2.0, elapsed  # the bound (time.time() vs monotonic) plus at most one drafter step


def _free_port() -> int:
    from megatron_tlt.parallel.state import free_port

    return free_port()


@pytest.mark.parametrize("victim, mode", [
    pytest.param(1, "train", id="peer-dies-while-training"),  # the watchdog alone, its exact bound (~15 s)
    pytest.param(1, "wait", id="peer-dies-while-waiting", marks=pytest.mark.slow),
    pytest.param(0, "train", id="store-host-dies", marks=pytest.mark.slow),
])
def test_a_dead_peer_ends_the_spot_trainer(tmp_path, victim, mode):
    """Two real processes; one SIGKILLs itself while the other trains (or waits): the survivor exits with
    EXIT_PEER_LOST and a message naming the dead rank within peer_timeout_s + 2 heartbeats (+ slack)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from megatron_tlt.coordinator.spot import EXIT_PEER_LOST

    timeout_s, port = 2.0, _free_port()
    worker = Path(__file__).with_name("spot_fault_worker.py")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(victim), mode, str(timeout_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        procs[victim].wait(timeout=120)
        died = time.monotonic()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=60)
        elapsed = time.monotonic() - died
        out, err = survivor.communicate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[victim].returncode == -9
    assert "spot training" in out and "returned" not in out
    if victim == 1:
        assert rc == EXIT_PEER_LOST, (rc, out, err)
        assert "megatron-tlt: error: rank 1 of 2 sent no heartbeat for" in err, err
        assert f"rank 0 exits (code {EXIT_PEER_LOST})" in err
    else:  # the store went with rank 0: the watchdog (exit code) or the spot loop's next store call (RuntimeError) says so
        assert rc in (EXIT_PEER_LOST, 1), (rc, out, err)
        assert "the rendezvous store is unreachable from rank 1" in err, err
    bound = timeout_s + 2 * min(1.0, timeout_s / 4) + 1.0
    assert elapsed < bound, f"the survivor took {elapsed:.1f} s (bound {bound:.1f} s)"
    print(f"\n{mode}, victim {victim}: survivor exited {elapsed:.2f} s after the kill: {err.strip().splitlines()[-1]}")


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _env_of(pid: int) -> dict:
    from pathlib import Path

    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


@pytest.mark.slow  # torchrun agents (CI runs it: .ci/run takes the slow tests too)
def test_two_torchrun_nodes_survivor_exits_when_its_peer_is_killed(tmp_path):
    """launch/torchrun_multi_node.sh on this machine as two nodes (one rank each, c10d rendezvous on 127.0.0.1):
    a TLT run; once step 0 is logged, node 1's rank hangs in its rewards so node 0's trains the drafter, and node
    1's is killed with SIGKILL. Node 0's launcher must exit non-zero within peer_timeout_s + heartbeats + agent exit."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    port, peer_timeout_s = _free_port(), 3.0
    hang = tmp_path / "hang"
    overrides = [
        f"run.dir={tmp_path / 'run'}", "run.steps=50", "run.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
        "data.num_examples=32", "data.eval_examples=2", "run.tensorboard=false", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=1", "rollout.temperature=1.0", "rollout.spec=chain",
        "drafter.online=true", "drafter.micro_batch_tokens=64", f"drafter.peer_timeout_s={peer_timeout_s}",
        "reward.fns=[{name: 'fault_rewards:hangs_on_node_1'}]", "reward.num_workers=1", "reward.timeout_s=900",
        "optim.lr=1e-3",
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NNODES": "2", "NPROC_PER_NODE": "1",
           "RDZV_ID": f"faults-{port}", "OMP_NUM_THREADS": "1", "MEGATRON_TLT_TEST_HANG": str(hang),
           "PYTHONPATH": os.pathsep.join([str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    agents, logs = [], []
    for node in (0, 1):
        log_file = open(tmp_path / f"node{node}.log", "w+")
        logs.append(log_file)
        agents.append(subprocess.Popen(["bash", str(repo / "launch" / "torchrun_multi_node.sh"), *overrides],
                                       env={**env, "NODE_RANK": str(node)}, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True))
        if node == 0:  # node 0's agent hosts the rendezvous store (the first to listen on the port): wait for it
            import socket

            deadline = time.monotonic() + 60
            while True:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline and agents[0].poll() is None, "node 0's agent never listened"
                time.sleep(0.1)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 150
        while not (metrics.is_file() and metrics.read_text().strip()):  # step 0 done: both buffers hold examples
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), [p.read_text() for p in
                                                                                           map(Path, [f.name for f in logs])]
            time.sleep(0.2)
        hang.touch()
        while not Path(f"{hang}.hanging").exists():  # rank 1 is stuck in its rewards, rank 0 in spot training
            assert time.monotonic() < deadline, "rank 1 never reached the hanging reward"
            time.sleep(0.1)
        time.sleep(1.0)
        # the victim is node 1's worker (c10d assigns the ranks): its agent's exit leaves node 0's store in place
        (victim_pid,) = [pid for pid in _children(agents[1].pid) if "RANK" in _env_of(pid)]
        victim_rank, victim_node = int(_env_of(victim_pid)["RANK"]), 1
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        survivor = agents[1 - victim_node]
        rc = survivor.wait(timeout=120)
        elapsed = time.monotonic() - killed
        agents[victim_node].wait(timeout=60)
    finally:
        for a in agents:
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = (tmp_path / f"node{1 - victim_node}.log").read_text()
    assert rc != 0 and agents[victim_node].returncode != 0, text
    assert f"megatron-tlt: error: rank {victim_rank} of 2 sent no heartbeat for" in text, text
    assert f"rank {1 - victim_rank} exits (code 75)" in text, text
    bound = peer_timeout_s + 2 * min(1.0, peer_timeout_s / 4) + 10.0  # detection + the agent's own shutdown
    assert elapsed < bound, f"node {1 - victim_node}'s launcher exited {elapsed:.1f} s after the kill (bound {bound:.1f} s)"
    print(f"\nsurvivor's launcher exited {rc} {elapsed:.2f} s after the kill")
