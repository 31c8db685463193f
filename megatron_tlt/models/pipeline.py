"""One pipeline rank's share of the policy: its model chunks, under the whole model's parameter names.

A rank holds `vpp` chunks (virtual stages `rank_stage_ids`, each a `Policy` over a contiguous layer range,
`parallel.layout`); the first virtual stage owns the embedding, the last the final norm and the LM head (a
tied model's last stage holds a copy of the embedding under the embedding's name). `PolicyStage` registers
the chunks' modules under their global names (`embed_tokens`, `layers.<i>`, `norm`, `lm_head`), so its
`state_dict()` / `named_parameters()` are the whole model's restricted to this rank: checkpoints, the
optimizer and resharding need nothing pipeline-specific. Weights are initialised per parameter name
(`models.transformer.init_parameters`), so a stage holds exactly the weights the same layers have at PP = 1.

    stage = build_stage(cfg, ps.tp_group, ps.pp_rank, pp=2, vpp=1, device=ps.device)
    stage.chunks          # [Policy(layer_range=(0, 2), pre_process=True, post_process=False)] on pipeline rank 0
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.models.transformer import Policy
from megatron_tlt.parallel.layout import rank_stage_ids, stage_layer_ranges


class PolicyStage(nn.Module):
    def __init__(self, chunks: Sequence[Policy], stage_ids: Sequence[int], num_stages: int):
        super().__init__()
        object.__setattr__(self, "chunks", list(chunks))  # not registered under "chunks.<k>": global names only
        self.stage_ids, self.num_stages = list(stage_ids), num_stages
        self.cfg, self.tp_group, self.tp_size = chunks[0].cfg, chunks[0].tp_group, chunks[0].tp_size
        embed = [c.embed_tokens for c in chunks if c.embed_tokens is not None]
        if embed:
            self.embed_tokens = embed[0]
        self.layers = nn.ModuleDict({k: m for c in chunks for k, m in c.layers.items()})
        last = chunks[-1]
        if last.post_process:
            self.norm = last.norm
            if last.lm_head is not None:
                self.lm_head = last.lm_head

    def set_recompute(self, mode: str, every: int = 1) -> None:
        """`Policy.set_recompute` on every chunk (full recompute counts layers within each chunk)."""
        for c in self.chunks:
            c.set_recompute(mode, every)

    @property
    def pre_process(self) -> bool:
        return self.chunks[0].pre_process

    @property
    def post_process(self) -> bool:
        return self.chunks[-1].post_process


def build_stage(cfg: ModelConfig, tp_group, pp_rank: int, pp: int, vpp: int = 1, layout: Optional[Sequence[int]] = None, *,
                device=None, init_weights: bool = True, sequence_parallel: bool = False) -> PolicyStage:
    """Pipeline rank `pp_rank`'s chunks. Every rank draws the same init seed from torch's global RNG (one draw)."""
    ranges = stage_layer_ranges(cfg.num_layers, pp, vpp, layout)
    seed = int(torch.randint(0, 2**62, ())) if init_weights else None
    ids = rank_stage_ids(pp_rank, pp, vpp)
    chunks = [Policy(cfg, tp_group, layer_range=ranges[s], pre_process=s == 0, post_process=s == len(ranges) - 1,
                     init_weights=init_weights, init_seed=seed, sequence_parallel=sequence_parallel).to(device) for s in ids]
    return PolicyStage(chunks, ids, len(ranges))
