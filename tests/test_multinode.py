"""Layouts across nodes: a bad TP x PP layout stops at start naming the sizes, and two torchrun agents on this
machine acting as two nodes (c10d rendezvous on 127.0.0.1, launch/torchrun_multi_node.sh) train PP=2 x DP=2
for two RL steps and resume bit-exactly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_tlt.checkpoint.dcp import load_full_state_dict_from_checkpoint
from megatron_tlt.config import load_config
from megatron_tlt.parallel.state import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "configs" / "tiny.yaml")
FAST = ["run.sft_steps=2", "rollout.max_new_tokens=8", "run.prompts_per_step=4", "rollout.n=2", "data.num_examples=32",
        "data.eval_examples=4", "reward.num_workers=0", "run.tensorboard=false", "run.steps=2", "run.save_every=1",
        "reward.fns=[{name: reward_fns_for_tests.length_reward}]", "optim.lr=1e-3"]  # rewards that differ within a group


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["model.num_layers=2", "parallel.pipeline_parallel_size=3"],
                 "pipeline_parallel_size * virtual_pipeline_size = 3 * 1 = 3 stages for model.num_layers=2", id="pp>layers"),
    pytest.param(["model.num_layers=2", "parallel.pipeline_parallel_size=2", "parallel.virtual_pipeline_size=2"],
                 "pipeline_parallel_size * virtual_pipeline_size = 2 * 2 = 4 stages for model.num_layers=2", id="pp*vpp>layers"),
    pytest.param(["model.num_layers=4", "parallel.pipeline_parallel_size=2", "parallel.pipeline_layout=[1,2]"],
                 "parallel.pipeline_layout=[1, 2] covers 3 layers; model.num_layers=4", id="layout-misses-a-layer"),
    pytest.param(["model.num_layers=4", "parallel.pipeline_parallel_size=2", "parallel.pipeline_layout=[3,2]"],
                 "parallel.pipeline_layout=[3, 2] covers 5 layers; model.num_layers=4", id="layout-repeats-a-layer"),
    pytest.param(["model.num_layers=4", "parallel.pipeline_parallel_size=2", "parallel.pipeline_layout=[1,1,2]"],
                 "parallel.pipeline_layout has 3 entries; it needs one per virtual stage: "
                 "pipeline_parallel_size * virtual_pipeline_size = 2", id="layout-wrong-length"),
    pytest.param(["model.num_attention_heads=4", "model.num_kv_heads=2", "parallel.tensor_parallel_size=4"],
                 "parallel.tensor_parallel_size=4 must divide model.num_attention_heads=4 and model.num_kv_heads=2",
                 id="kv-heads%tp"),
    pytest.param(["model.num_attention_heads=4", "model.num_kv_heads=2", "rollout.tensor_parallel_size=4"],
                 "rollout.tensor_parallel_size=4 must divide model.num_attention_heads=4 and model.num_kv_heads=2",
                 id="kv-heads%rollout-tp"),
])
def test_a_bad_layout_fails_at_config_load_naming_the_sizes(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.slow  # torchrun agents (CI runs it: .ci/run takes the slow tests too)
def test_a_world_size_not_divisible_by_tp_x_pp_fails_at_start(tmp_path):
    r = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "3", "--no-python", "megatron-tlt", "train", TINY,
                        "parallel.tensor_parallel_size=2", f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "world size 3 is not divisible by tensor_parallel_size * pipeline_parallel_size = 2 * 1 = 2" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _two_nodes(run_dir: Path, *overrides: str) -> None:
    """launch/torchrun_multi_node.sh twice on this machine, 2 processes each: world 4 at PP=2 x DP=2, stage 0 on
    one node, stage 1 on the other (the tiny batch packs into one micro-batch per DP replica)."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NNODES": "2", "NPROC_PER_NODE": "2",
           "RDZV_ID": f"multinode-{port}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = ["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), TINY, "parallel.pipeline_parallel_size=2",
           f"run.dir={run_dir}", *FAST, *overrides]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outs)


@pytest.mark.slow
def test_two_nodes_train_pp2_dp2_and_resume_bit_exact(tmp_path):
    run_dir = tmp_path / "run"
    _two_nodes(run_dir)
    step_2 = run_dir / "checkpoints" / "step_2"
    straight = {state: load_full_state_dict_from_checkpoint(step_2, state) for state in ("model", "optimizer")}
    shutil.rmtree(step_2)
    _two_nodes(run_dir, "run.resume=true")
    for state, full in straight.items():
        resumed = load_full_state_dict_from_checkpoint(step_2, state)
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full), state
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert all(row["grad_norm"] > 0 for row in rows)  # real updates, not weight decay alone
