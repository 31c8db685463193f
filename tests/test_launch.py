"""Every launch script parses (`bash -n`, always) and passes `shellcheck` (when it is installed); the multi-node
ones build the torchrun command line they document (run against stand-ins for torchrun / srun / scontrol); the
ranks started by hand (the demo's launcher, the benchmarks', the tests') die with their launcher."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_there_are_launch_scripts():
    assert {p.name for p in SCRIPTS} >= {"torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, f"bash -n {script.name}: {r.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    r = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, f"shellcheck {script.name}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_torchrun_runs_the_installed_console_script(script):
    # `torchrun -m megatron_tlt.cli` fails (a package without __main__.py): the scripts run the console script.
    text = script.read_text()
    assert "-m megatron_tlt.cli" not in text and "--no-python megatron-tlt train" in text
    assert shutil.which("megatron-tlt"), "the megatron-tlt console script is not installed (pip install -e .)"


def _fake_bin(tmp_path, *names):
    """Stand-ins for `names` on PATH that print their arguments, one a line (`scontrol` prints two hosts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        body = 'printf "%s\\n" nodeA nodeB' if name == "scontrol" else f'echo {name}; printf "%s\\n" "$@"'
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _launch(script, bin_dir, env, *args):
    r = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30,
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


ARGS = ["c.yaml", "parallel.tensor_parallel_size=8", "parallel.pipeline_parallel_size=2"]  # 2 nodes x 8 GPUs


def test_multi_node_script_sets_up_the_c10d_rendezvous(tmp_path):
    bin_dir = _fake_bin(tmp_path, "torchrun")
    env = {"MASTER_ADDR": "node0", "NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_PORT": "1234", "RDZV_ID": "job7"}
    assert _launch("torchrun_multi_node.sh", bin_dir, env, *ARGS) == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:1234",
        "--rdzv-id", "job7", "--no-python", "megatron-tlt", "train", *ARGS]


def test_slurm_script_rendezvous_on_the_first_host(tmp_path):
    bin_dir = _fake_bin(tmp_path, "srun", "scontrol")
    env = {"SLURM_JOB_NODELIST": "node[A-B]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42"}
    assert _launch("slurm.sbatch", bin_dir, env, *ARGS) == [
        "srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "gpu", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "nodeA:29500", "--rdzv-id", "42", "--no-python", "megatron-tlt", "train", *ARGS]


_LAUNCHER = """
import os, sys, time
import torch.multiprocessing as mp
from megatron_tlt.parallel.state import set_local_rank_env

def rank(i, out):
    set_local_rank_env(i, 2, 29500)
    open(os.path.join(out, str(i)), "w").write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    mp.start_processes(rank, args=(sys.argv[1],), nprocs=2, join=True, start_method="spawn")
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (nobody reaped it yet)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_local_ranks_exit_when_their_launcher_is_killed(tmp_path):
    # Every rank started by hand (`megatron-tlt demo`, the benchmarks, tests/dist_utils) calls set_local_rank_env:
    # a launcher killed with SIGKILL (no chance to clean up) must not leave its ranks computing on as orphans. It starts with SIGINT
    # ignored, as a shell's background job (`nohup ... &`) does: torch's own parent-death signal is SIGINT.
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pids = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in tmp_path.iterdir() if p.name in ("0", "1") and p.read_text()]
        assert len(pids) == 2, "the ranks did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, pids)), f"ranks {[p for p in pids if _alive(p)]} outlived their launcher"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)
