"""tools/gpu_check.sh, the one-command GPU check, kept runnable by CI (which has no GPU): it parses, it skips
cleanly without CUDA (exit 0, one line, nothing written), and it names every GPU test file it runs. The GPU
tests themselves are collected and skipped here with the reason "needs CUDA"."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped: no CUDA device"), proc.stdout
    assert not out.exists()  # nothing heavy ran: no summary, no logs


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_named_files_and_benchmarks_exist():
    text = SCRIPT.read_text()
    for path in ("tests/test_gpu.py", "tests/test_model.py", "tests/test_spec_engine.py",
                 "tools/bench/train_mfu.py", "tools/bench/packing.py", "tools/bench/rollout.py"):
        assert path in text and (ROOT / path).is_file(), path


def _marks(obj) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in getattr(obj, "pytestmark", []):
        out.setdefault(m.name, []).append(m)
    return out


def test_gpu_tests_are_marked_and_skip_without_cuda():
    """Every CUDA test carries the `gpu` marker (what `pytest -m gpu` selects) and skips without CUDA, saying so.
    (The default CPU run collects them and reports the skips: no subprocess needed here.)"""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_gpu
    import test_model
    import test_spec_engine

    marks = _marks(test_gpu)
    assert "gpu" in marks and any(m.kwargs.get("reason") == "needs CUDA" for m in marks["skipif"])
    for fn in (test_model.test_cuda_backends_match_sdpa_segments, test_spec_engine.test_cuda_graphs_equal_eager_on_gpu):
        fn_marks = _marks(fn)
        assert "gpu" in fn_marks, fn.__name__
        assert any(m.kwargs.get("reason", "").startswith("needs CUDA") for m in fn_marks["skipif"]), fn.__name__
    tests = [name for name in dir(test_gpu) if name.startswith("test_")]
    assert len(tests) >= 7, tests
