"""A packed supervised fit of a tiny policy, shared by the drafter and TLT tests."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megatron_tlt.data.packing import pack_sequences


def fit_packed(model, sequences: Callable[[], list[list[int]]], steps: int, lr: float = 1e-2) -> None:
    """`steps` AdamW steps of next-token cross-entropy on packed batches of `sequences()`; grads cleared after."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        pb = pack_sequences(sequences())
        logits = model(pb.tokens[None], position_ids=pb.position_ids[None], cu_seqlens=pb.cu_seqlens)[0]  # [T, V]
        loss = (F.cross_entropy(logits, pb.targets, reduction="none") * pb.loss_mask).sum() / pb.loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
