"""kernels/fp8.py's Triton kernels == ops/fp8.py's torch references: the quantizers bit-exactly (e4m3 bytes and
scales), the block-scaled GEMM up to fp32 summation order; edge tiles, blocks 16 / 32 / 128, all-zero tiles, large
and subnormal magnitudes, rounding ties.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU, and must be switched on before Triton is
imported, so the kernel checks run in one subprocess (this file as a script, one JSON line of results) and this
pytest process never imports Triton.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tlt import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]

# name -> (check, arguments); the checks are _check_* below, run in the interpreted subprocess
CASES = {
    "weight_200x72_b32": ("weight", {"n": 200, "k": 72, "block": 32}),
    "weight_384x300_b128": ("weight", {"n": 384, "k": 300, "block": 128}),
    "weight_48x40_b16_bf16": ("weight", {"n": 48, "k": 40, "block": 16, "dtype": "bfloat16"}),
    "weight_zero_tiles_b32": ("weight", {"n": 96, "k": 80, "block": 32, "zero_tiles": True}),
    "weight_large_1e4_b128": ("weight", {"n": 130, "k": 136, "block": 128, "magnitude": 1e4}),
    "weight_magnitudes_1e-8_to_1e4": ("weight", {"n": 64, "k": 96, "block": 32, "spread": True}),
    "act_1x300_b128": ("activation", {"m": 1, "k": 300, "block": 128}),
    "act_37x72_b32": ("activation", {"m": 37, "k": 72, "block": 32}),
    "act_zero_rows_b32": ("activation", {"m": 20, "k": 100, "block": 32, "zero_tiles": True}),
    "act_large_1e4_b16": ("activation", {"m": 19, "k": 40, "block": 16, "magnitude": 1e4}),
    "e4m3_ties_and_subnormals": ("ties", {}),
    "gemm_1x300x384_b128": ("gemm", {"m": 1, "k": 300, "n": 384, "block": 128}),
    "gemm_37x72x200_b32": ("gemm", {"m": 37, "k": 72, "n": 200, "block": 32}),
    "gemm_70x48x40_b16": ("gemm", {"m": 70, "k": 48, "n": 40, "block": 16}),
    "gemm_zero_tiles_1e4_b32": ("gemm", {"m": 37, "k": 100, "n": 72, "block": 32, "magnitude": 1e4, "zero_tiles": True}),
    "fp8_linear_triton_path": ("linear", {"m": 37, "k": 72, "n": 200, "block": 32}),
    "package_imports_no_triton": ("imports", {}),
}


def _inputs(rows: int, cols: int, seed: int, block: int, magnitude: float = 1.0, zero_tiles: bool = False,
            spread: bool = False, dtype: str = "float32"):
    """[rows, cols] normal values times `magnitude` (with `spread`, columns scaled from 1e-8 to 1e4; with
    `zero_tiles`, the first block of rows and of columns zeroed), in `dtype`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * magnitude
    if spread:
        x = x * torch.logspace(-8, 4, cols)
    if zero_tiles:
        x[:block] = 0.0
        x[:, :block] = 0.0
    return x.to(getattr(torch, dtype))


def _same_q(q, scale, ref_q, ref_scale) -> str:
    import torch

    if q.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        return f"dtypes {q.dtype}, {scale.dtype}"
    if q.shape != ref_q.shape or scale.shape != ref_scale.shape:
        return f"shapes {tuple(q.shape)}, {tuple(scale.shape)} != {tuple(ref_q.shape)}, {tuple(ref_scale.shape)}"
    bad_q = int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
    bad_s = int((scale.view(torch.int32) != ref_scale.view(torch.int32)).sum())
    return "ok" if bad_q == bad_s == 0 else f"{bad_q} e4m3 bytes and {bad_s} scales differ"


def _check_weight(n, k, block, **kw) -> str:
    from megatron_tlt.kernels.fp8 import quantize_weight_blocks
    from megatron_tlt.ops.fp8 import quantize_weight

    w = _inputs(n, k, 0, block, **kw)
    ref = quantize_weight(w, block)
    return _same_q(*quantize_weight_blocks(w, block), ref.q, ref.scale)


def _check_activation(m, k, block, **kw) -> str:
    from megatron_tlt.kernels.fp8 import quantize_activation_groups
    from megatron_tlt.ops.fp8 import quantize_activation

    x = _inputs(m, k, 1, block, **kw)
    return _same_q(*quantize_activation_groups(x, block), *quantize_activation(x, block))


def _check_ties() -> str:
    """Every finite e4m3 value, every midpoint between neighbours (ties to even), random normal and subnormal values,
    both signs, in one token whose amax is 448 (scale 1): the bytes torch's cast gives."""
    import torch

    from megatron_tlt.kernels.fp8 import quantize_activation_groups

    values = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2
    g = torch.Generator().manual_seed(2)
    x = torch.cat([values, mids, torch.rand(4000, generator=g) * 448, torch.rand(4000, generator=g) * 2**-6])
    x = torch.cat([torch.tensor([448.0]), x, -x])[None, :]
    q, scale = quantize_activation_groups(x, 32768)
    return _same_q(q, scale, x.to(torch.float8_e4m3fn), torch.ones(1, 1))


def _close(y, ref) -> str:
    import torch

    if y.dtype != torch.float32 or y.shape != ref.shape:
        return f"{y.dtype} {tuple(y.shape)} != float32 {tuple(ref.shape)}"
    err = float(((y - ref).abs() - 1e-5 * ref.abs()).max())
    tol = 1e-5 * float(ref.abs().max())
    return "ok" if err <= tol else f"error beyond rtol 1e-5 by {err:.3g}, atol {tol:.3g}"


def _check_gemm(m, k, n, block, magnitude=1.0, zero_tiles=False) -> str:
    from megatron_tlt.kernels.fp8 import block_scaled_gemm
    from megatron_tlt.ops.fp8 import _gemm_reference, quantize_activation, quantize_weight

    qx, sx = quantize_activation(_inputs(m, k, 3, block, magnitude, zero_tiles), block)
    w = quantize_weight(_inputs(n, k, 4, block, magnitude, zero_tiles, spread=True), block)
    return _close(block_scaled_gemm(qx, sx, w.q, w.scale, block), _gemm_reference(qx, sx, w))


def _check_linear(m, k, n, block) -> str:
    from megatron_tlt.ops.fp8 import fp8_linear, quantize_weight

    x, w = _inputs(m, k, 5, block), quantize_weight(_inputs(n, k, 6, block), block)
    return _close(fp8_linear(x, w, path="triton"), fp8_linear(x, w, path="reference"))


def _check_imports() -> str:
    """(Run first, before anything imports Triton.) The package imports no Triton; without Triton, kernels.fp8's
    ImportError says how to install it."""
    import megatron_tlt.kernels

    if "triton" in sys.modules or not megatron_tlt.kernels.available():
        return "megatron_tlt.kernels imported triton, or available() is False"
    sys.modules["triton"] = None  # import triton -> ImportError
    try:
        import megatron_tlt.kernels.fp8
        return "kernels.fp8 imported without triton"
    except ImportError as e:
        return "ok" if "pip install triton" in str(e) else f"unclear ImportError: {e}"
    finally:
        del sys.modules["triton"]


def _run(names: list[str]) -> dict[str, str]:
    """Each named case's result: "ok" or what differs (or the exception)."""
    results = {}
    for name in sorted(names, key=lambda n: CASES[n][0] != "imports"):
        check, kwargs = CASES[name]
        try:
            results[name] = globals()[f"_check_{check}"](**kwargs)
        except Exception as e:  # reported per case
            results[name] = f"{type(e).__name__}: {e}"
    return results


def _subprocess(*args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1" if interpret else "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    proc = _subprocess(__file__, *CASES, interpret=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(results, case):
    assert results[case] == "ok", f"{case}: {results[case]}"


def test_cpu_tensors_need_the_interpreter():
    code = ("import torch\nfrom megatron_tlt.kernels.fp8 import quantize_weight_blocks\n"
            "try:\n    quantize_weight_blocks(torch.ones(4, 4), 16)\nexcept ValueError as e:\n    print(e)\n")
    proc = _subprocess("-c", code, interpret=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TRITON_INTERPRET=1" in proc.stdout, proc.stdout


if __name__ == "__main__":
    print(json.dumps(_run(sys.argv[1:])))
