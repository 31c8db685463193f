"""Triton kernels for the FP8 (e4m3) rollout: `kernels.fp8` holds the block quantizers of weights and activations
and the block-scaled GEMM that `ops.fp8.fp8_linear(..., path="triton")` calls; `ops/fp8.py` holds their torch
references.

Importing this package imports nothing heavy; `kernels.fp8` imports Triton (ImportError without it). Its kernels run
on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before Triton is imported).
"""
from __future__ import annotations

import importlib.util


def available() -> bool:
    """Whether Triton is installed (found, not imported), i.e. whether `megatron_tlt.kernels.fp8` imports."""
    return importlib.util.find_spec("triton") is not None
