"""The parameter dtypes a config may name (`model.params_dtype`), and their torch dtypes."""
from __future__ import annotations

import torch

from megatron_tlt.config.schema import DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"; ValueError for a dtype no config can name."""
    for name, t in TORCH_DTYPES.items():
        if t == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {', '.join(TORCH_DTYPES)}")
