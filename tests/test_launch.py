"""Every launch script parses (`bash -n`, always) and passes `shellcheck` (when it is installed)."""
import shutil
import subprocess
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
