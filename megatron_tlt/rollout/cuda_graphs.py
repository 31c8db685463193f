"""Static-shape model calls for the rollout engine, replayed as CUDA graphs on a GPU.

Why: in the long tail a decode step runs a handful of live rows through hundreds of small kernels;
on an H100 launching them from Python takes longer than running them. A captured CUDA graph
launches the whole step at once. Graphs need fixed shapes and fixed memory, so every call the
engine repeats per step (the target's decode and tree-verify forwards, the drafter's draft levels;
all in model_calls.py) goes through `StaticCalls`, which gives it fixed shapes:

- the batch is padded to a bucket (next power of two): padded rows repeat row 0's inputs but write
  their K/V into a padding slot of each cache that no request owns (`pad_slot`), so they cannot
  touch a live row's cache;
- `kv_len` (how much of the cache attention reads) is rounded up to a power of two (at least
  `MIN_KV_BUCKET`, at most the cache length); keys past a row's own tokens are masked anyway;
- everything else in the key (draft width, tree-mask shape) is already a function of the draft shape.

    calls = StaticCalls("capture", pad_slot=num_slots, device=device)
    hidden = calls("decode", fn, {"tokens": t, "slots": s, "start": st}, kv_len, cache_len)  # fn(inputs, kv)

`fn(inputs, kv_len)` must read only `inputs` and `kv_len` (plus the model's weights and caches) and
return a tensor or a tuple of tensors with the batch first. Modes:
- "off": `fn` as given, exact shapes (CPU default);
- "eager": the padded static shapes, run eagerly (tests the padding on CPU, debugging on GPU);
- "capture": on first sight of a key, one eager warm-up on a side stream, then capture into a
  `torch.cuda.CUDAGraph` in one memory pool shared by all the engine's graphs; later calls copy
  the inputs into the graph's static tensors and replay. Graphs are captured lazily, so only the
  (call, batch bucket, kv bucket, shape) combinations a run meets are ever built.

The warm-up and every replay write the same K/V to the same cache positions, so capturing does not
disturb a generation. Outputs of a replay live in the graph's memory: valid until the next call
with the same key (the engine consumes them within the step). Sampling, verification and the
commit stay outside the graphs (they take host-known lengths).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

GRAPH_MODES = ("off", "eager", "capture")
MIN_KV_BUCKET = 64

Outputs = Union[torch.Tensor, tuple]


def next_power_of_two(n: int) -> int:
    """The power of two >= n: 1, 2, 4, 8, ... (the batch bucket of a static call and of the draft selector)."""
    return 1 << max(n - 1, 0).bit_length()


def kv_bucket(kv_len: int, cache_len: int) -> int:
    """kv_len rounded up to a power of two >= MIN_KV_BUCKET, at most the cache length."""
    return min(max(next_power_of_two(kv_len), MIN_KV_BUCKET), cache_len)


def pad_batch(inputs: dict[str, torch.Tensor], batch: int, pad_slot: int) -> dict[str, torch.Tensor]:
    """Pad every input to `batch` rows by repeating row 0; "slots" pads with `pad_slot`."""
    out = {}
    for name, x in inputs.items():
        extra = batch - x.shape[0]
        if extra == 0:
            out[name] = x
            continue
        fill = torch.full_like(x[:1], pad_slot) if name == "slots" else x[:1]
        out[name] = torch.cat([x, fill.expand(extra, *x.shape[1:])])
    return out


class _Graph:
    def __init__(self, fn: Callable, inputs: dict[str, torch.Tensor], kv_len: int, pool):
        self.inputs = {name: x.clone() for name, x in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy inits and allocator state happen outside the capture
            fn(self.inputs, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(self.inputs, kv_len)

    def replay(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        for name, x in inputs.items():
            self.inputs[name].copy_(x)
        self.graph.replay()
        return self.outputs


class StaticCalls:
    """Runs the engine's per-step model calls with bucketed static shapes (see the module docstring)."""

    def __init__(self, mode: str, pad_slot: int, device):
        if mode not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs must be one of {GRAPH_MODES}, got {mode!r}")
        if mode == "capture" and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graphs='capture' needs a CUDA device, got {device}")
        self.mode, self.pad_slot = mode, pad_slot
        self.pool = torch.cuda.graph_pool_handle() if mode == "capture" else None
        self.graphs: dict[tuple, _Graph] = {}

    def __call__(self, name: str, fn: Callable, inputs: dict[str, torch.Tensor], kv_len: int, cache_len: int) -> Outputs:
        """fn(inputs, kv_len) over the live rows; `inputs` must hold "slots" [B] (the cache slot of each row)."""
        if self.mode == "off":
            return fn(inputs, kv_len)
        rows = inputs["slots"].shape[0]
        padded = pad_batch(inputs, next_power_of_two(rows), self.pad_slot)
        kv = kv_bucket(kv_len, cache_len)
        if self.mode == "eager":
            out = fn(padded, kv)
        else:
            key = (name, kv, *((k, tuple(x.shape), x.dtype) for k, x in sorted(padded.items())))
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = _Graph(fn, padded, kv, self.pool)
            out = graph.replay(padded)
        return tuple(o[:rows] for o in out) if isinstance(out, tuple) else out[:rows]
