"""Attention behind two functions: packed causal attention for training, and attention over a KV cache.

Packed input (`cu_seqlens`) never attends across examples. The backend comes from the model config
(`model.attention_backend`, passed in by the model's Attention as `backend=`); "auto" picks, per device
type, the first that applies (the choice is made and logged once per process):
- `flash_attn`   : CUDA with flash-attn installed (`flash_attn_varlen_func`);
- `torch_varlen` : CUDA without flash-attn (`torch.nn.attention.varlen.varlen_attn`);
- `sdpa_segments`: everywhere else (CPU): exact causal SDPA run per example (block-diagonal
  attention without building a [T, T] mask). It is the reference the others are tested against.
A named backend is used as is, after checking that its kernel can be imported.

The KV-cache path (`cached_attention`) covers prefill, incremental decode and speculative-decoding
verification: every row of the batch has `start[b]` committed tokens in the cache, and its `S` new
tokens attend to all of those plus the new tokens that `new_mask[b]` allows (causal by default, a
tree mask for tree drafts); `new_mask` may also restrict the last few cached entries (a drafter's
earlier draft levels).
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments")  # config.schema.ATTENTION_BACKENDS without "auto"


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def select_backend(device_type: str, requested: str = "auto") -> str:
    """The packed-attention backend for a device type: `requested` (a name of BACKENDS, checked to be
    importable) or, for "auto", the first that applies. Logged once per (device type, request)."""
    if requested == "auto":
        if device_type != "cuda":
            choice = "sdpa_segments"
        elif _has_flash_attn():
            choice = "flash_attn"
        else:
            choice = "torch_varlen" if _torch_varlen() is not None else "sdpa_segments"
    elif requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not supported; supported: auto, {', '.join(BACKENDS)}")
    elif (requested == "flash_attn" and not _has_flash_attn()) or (requested == "torch_varlen" and _torch_varlen() is None):
        kernel = "the flash-attn package" if requested == "flash_attn" else "torch.nn.attention.varlen (a newer torch)"
        raise RuntimeError(f"attention backend {requested!r} needs {kernel}; set model.attention_backend=auto or another backend")
    else:
        choice = requested
    log.info("attention backend for %s: %s%s", device_type, choice, " (auto)" if requested == "auto" else "")
    return choice


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _sdpa_segments(q, k, v, cu_seqlens, scale):
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [1, heads, L, D] per example
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o.squeeze(0).transpose(0, 1)
    return out


def _torch_varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    varlen_attn = _torch_varlen()
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kwargs = {"scale": scale}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def packed_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [N+1] int
    max_seqlen: Optional[int],  # the longest example; None: read off cu_seqlens (a host sync)
    scale: float,
    backend: Optional[str] = None,  # a name of BACKENDS, or "auto" / None: chosen by select_backend
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention within each packed example."""
    backend = select_backend(q.device.type, backend or "auto")
    if max_seqlen is None and backend != "sdpa_segments":
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        return _torch_varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale)
    return _sdpa_segments(q, k, v, cu_seqlens, scale)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, S, Hq, D], k/v: [B, S, Hkv, D] -> [B, S, Hq, D]; plain causal attention over full rows."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def cache_attention_mask(start: torch.Tensor, num_new: int, kv_len: int, new_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which cached keys each new query may see.

    start: [B] committed tokens per row; new tokens sit at cache positions start[b] + i.
    new_mask: [B, S, E+S] bool, or None = causal. Column E+j: query i may see new token j. The first
    E >= 0 columns cover the E entries just before start (cache positions start-E .. start-1), which
    each query then sees only where the mask says (a draft tree grown level by level: a node sees its
    ancestors among the earlier levels only). Entries before start-E are visible to every query.
    Returns [B, S, kv_len] bool.
    """
    device = start.device
    rel = torch.arange(kv_len, device=device).unsqueeze(0) - start.unsqueeze(1)  # [B, kv_len]
    if new_mask is None:
        qi = torch.arange(num_new, device=device).view(1, num_new, 1)
        return rel.unsqueeze(1) <= qi  # prefix (rel < 0) and causal among new tokens
    recent = new_mask.shape[2] - num_new  # E
    in_mask = (rel >= -recent) & (rel < num_new)  # [B, kv_len]
    idx = (rel + recent).clamp(0, recent + num_new - 1).unsqueeze(1).expand(-1, num_new, -1)  # [B, S, kv_len]
    seen = torch.gather(new_mask, 2, idx) & in_mask.unsqueeze(1)
    return (rel < -recent).unsqueeze(1) | seen


def cached_attention(
    q: torch.Tensor,  # [B, S, Hq, D]
    k: torch.Tensor,  # [B, kv_len, Hkv, D] cache rows (new keys already written)
    v: torch.Tensor,  # [B, kv_len, Hkv, D]
    mask: torch.Tensor,  # [B, S, kv_len] bool from cache_attention_mask
    scale: float,
    invariant: bool = False,  # see `_per_query_attention`
) -> torch.Tensor:  # [B, S, Hq, D]
    if invariant:
        return _per_query_attention(q, k, v, mask, scale)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True
    )
    return o.transpose(1, 2)


def _per_query_attention(q, k, v, mask, scale) -> torch.Tensor:
    """`cached_attention` whose every output row is bit-identical whatever else is in the call: other rows,
    other queries of the row (a decode's one token or a verify's 1 + N), the batch-wide kv_len padding.

    Why: SDPA's kernels (the fused CPU one in bf16 above all) block their reductions by the call's shapes, so
    a position's logits differ in the last bits between a decode and a verify forward, or between batch sizes,
    and a near-tie of the sampling noise can flip (measured: 19% of bf16 sequences). Here each query runs
    alone in fp32 (scores, masked exp, weighted sum; masked keys add exact zeros), then rounds to q's dtype.
    The normaliser is summed by the same matmul as the weighted values (a ones column beside them), not by
    softmax: softmax's vectorised sum over kv_len groups its terms by kv_len, so on an AVX-512 / AMX Xeon a
    prefill row's probabilities changed with the batch's padding. (The linears around it are made invariant
    by `ops.linear.batch_invariant`.)
    """
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    keys = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, kv_len, D]
    values = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)  # [B, Hq, kv_len, D + 1]
    queries = q.float().transpose(1, 2)  # [B, Hq, S, D]
    out = []
    for i in range(S):
        scores = (queries[:, :, i : i + 1] @ keys.transpose(-1, -2)) * scale  # [B, Hq, 1, kv_len]
        scores = scores.masked_fill(~mask[:, i : i + 1].unsqueeze(1), float("-inf"))
        weighted = (scores - scores.amax(dim=-1, keepdim=True)).exp() @ values  # [B, Hq, 1, D + 1]
        out.append(weighted[..., :D] / weighted[..., D:])
    return torch.cat(out, dim=2).transpose(1, 2).to(q.dtype)
