"""Which decoder layers each pipeline stage holds.

The decoder is cut into `pp * vpp` contiguous virtual stages, numbered in schedule order: virtual stage
`v * pp + r` is model chunk `v` of pipeline rank `r` (megatron-core's and torch.distributed.pipelining's
interleaved numbering), so with vpp = 1 stage r is pipeline rank r. Layer keys stay global indices.

    stage_layer_ranges(8, pp=2, vpp=2)            # [(0, 2), (2, 4), (4, 6), (6, 8)]
    stage_layer_ranges(8, 2, 1, layout=[3, 5])    # [(0, 3), (3, 8)]
    rank_stage_ids(pp_rank=1, pp=2, vpp=2)        # [1, 3]: the virtual stages pipeline rank 1 runs
"""
from __future__ import annotations

from itertools import accumulate
from typing import Optional, Sequence


def stage_layer_ranges(num_layers: int, pp: int, vpp: int = 1, layout: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """[first, last) layer range of every virtual stage. Even cut by default (the first `num_layers % (pp * vpp)`
    stages get one layer more); `layout` gives the layers per virtual stage explicitly."""
    stages = pp * vpp
    if layout is None:
        base, extra = divmod(num_layers, stages)
        layout = [base + (s < extra) for s in range(stages)]
    if len(layout) != stages or sum(layout) != num_layers or min(layout) < 1:
        raise ValueError(f"pipeline layout {list(layout)} must give each of the {stages} virtual stages (pp={pp} x vpp={vpp}) "
                         f">= 1 layer and cover the {num_layers} layers exactly once")
    ends = list(accumulate(layout))
    return [(end - n, end) for n, end in zip(layout, ends)]


def rank_stage_ids(pp_rank: int, pp: int, vpp: int = 1) -> list[int]:
    """The virtual stages pipeline rank `pp_rank` holds, in chunk order."""
    return [v * pp + pp_rank for v in range(vpp)]
