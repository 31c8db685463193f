"""FP8 rollout weights (`rollout.precision=fp8`): the policy's linears quantized for the rollout engine.

The decoder's linear weights (q/k/v/o projections and the MLP's gate/up/down; not the embedding, the norms or the
LM head) are quantized to e4m3 with `block x block` scales (`ops.fp8`), each TP rank its own shard, so a shard's
blocks are the full weight's blocks: at TP > 1 every sharded dimension must be a multiple of `block` (UserError
otherwise). Training stays in high precision: the FP8 weights are attached to the layers (`ColumnLinear.fp8`,
`RowLinear.fp8`) only while the engine runs (`active()`, entered by `RolloutEngine.generate`), so every target
forward of the rollout (prefill, decode, verify, the drafter's feed from them) multiplies in FP8 and the logprobs it
returns are the FP8 policy's, while the trainer's no-grad passes over the same modules stay in high precision.

`load(version)` quantizes (in place after the first time: CUDA graphs captured over the FP8 tensors stay valid);
`coordinator.reshard.RolloutWeights.acquired` calls it before every rollout with the policy's weight version, so
the FP8 copy is re-quantized after every update and never stale. An engine whose weights were never loaded
quantizes at its first `generate`.

    fp8 = Fp8Weights(model, block=128, gemm="auto")      # the GEMM path resolved and logged once
    fp8.load(version=3)                                  # -> fp8.last: bytes and time
    with fp8.active():                                   # layers multiply in FP8 inside the block
        ...
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch

from megatron_tlt.errors import UserError
from megatron_tlt.ops.fp8 import Fp8Weight, quantize_weight, resolve_gemm_path
from megatron_tlt.parallel.sharding import partition_dim

log = logging.getLogger(__name__)

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Fp8Weights:
    def __init__(self, model, block: int = 128, gemm: str = "auto"):
        self.model, self.block = model, block
        self.linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in QUANTIZED_LINEARS}
        if model.tp_size > 1:
            for name, m in self.linears.items():
                dim = partition_dim(m.weight)
                if m.weight.shape[dim] % block:
                    raise UserError(
                        f"rollout.precision=fp8 at rollout TP={model.tp_size}: {name}'s shard of {m.weight.shape[dim]} "
                        f"{'rows' if dim == 0 else 'columns'} splits a {block}-wide FP8 block (TP would change the "
                        f"quantization); use a rollout TP whose shards are multiples of rollout.fp8_block, a smaller "
                        f"rollout.fp8_block, or rollout.precision=auto")
        first = next(iter(self.linears.values())).weight
        self.path = resolve_gemm_path(gemm, first.device, tuple(first.shape), block)
        self.weights: dict[str, Fp8Weight] = {}
        self.version: Optional[int] = None  # the policy version quantized (None: never, or unknown)
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def load(self, version: Optional[int] = None) -> None:
        """Quantize every linear now, unless `version` is the one already quantized."""
        if self.weights and version is not None and version == self.version:
            self.last["fp8_quantize_time_s"] = 0.0
            return
        t0 = time.perf_counter()
        first = not self.weights
        for name, m in self.linears.items():
            self.weights[name] = quantize_weight(m.weight, self.block, out=self.weights.get(name), path=self.path)
        if next(iter(self.weights.values())).q.is_cuda:
            torch.cuda.synchronize()
        self.version = version
        fp8_bytes = sum(w.nbytes for w in self.weights.values())
        hp_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.linears.values())
        self.last = {"fp8_quantize_time_s": time.perf_counter() - t0, "fp8_weight_bytes": float(fp8_bytes),
                     "fp8_replaced_bytes": float(hp_bytes)}
        if first:
            log.info("FP8 rollout weights: %d linears, %.2f MB in FP8 + scales (%.2f MB in %s), block %d, GEMM path %s",
                     len(self.weights), fp8_bytes / 2**20, hp_bytes / 2**20, str(next(iter(self.linears.values())).weight.dtype),
                     self.block, self.path)

    @contextlib.contextmanager
    def active(self):
        """The layers multiply by their FP8 weights inside the block (quantized first if never loaded)."""
        if not self.weights:
            self.load()
        for name, m in self.linears.items():
            m.fp8 = self.weights[name]
        try:
            yield
        finally:
            for m in self.linears.values():
                m.fp8 = None
