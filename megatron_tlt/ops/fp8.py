"""FP8 (e4m3) block quantization and the FP8 linear: the torch references of `kernels/` and the rollout's GEMM paths.

DeepSeek-V3's recipe, as slime / verl / NeMo-RL use it for rollouts:

- a weight W [N, K] is cut into `block x block` tiles (the last row / column of tiles smaller when N or K is not
  a multiple); each tile has one fp32 scale s = amax(|tile|) / 448 (1 for an all-zero tile) and its values are
  q = round_to_e4m3(W / s). Dequantized: q * s, within half an e4m3 step of W (relative 2^-4 for normal values,
  absolute 2^-10 * s below e4m3's smallest normal 2^-6);
- an activation x [M, K] is quantized the same way per token and `block` channels (tiles 1 x block), at every call;
- y[m, n] = sum over channel blocks kb of sx[m, kb] * sw[n // block, kb] * (qx[m, kb-block] . qw[n, kb-block]).

GEMM paths (`GEMM_PATHS`), each equal to `reference` up to fp32 summation order:
- `reference`: dequantize both operands, one fp32 matmul (exact, works anywhere; the dequantized fp32 weight is
  cached next to the FP8 one, `Fp8Weight.dequantized`);
- `scaled_mm`: `torch._scaled_mm` with row-wise scales, one call per channel block (x's scale per row, W's scale per
  output column), summed in fp32; runs on the CPU in torch 2.13 and on GPUs with FP8 tensor cores (sm89+);
- `triton`: the activation quantizer and block-scaled GEMM of `kernels/` (CUDA only; tested under the interpreter).

    w8 = quantize_weight(w, block=128)                       # Fp8Weight: q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]
    y = fp8_linear(x, w8, bias, path="scaled_mm")            # [..., N] in x's dtype
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tlt.errors import UserError

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
GEMM_PATHS = ("scaled_mm", "triton", "reference")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Fp8Weight:
    """One linear's FP8 weight: q [N, K] float8_e4m3fn, scale [ceil(N/block), ceil(K/block)] fp32, and with the
    reference GEMM path its dequantized fp32 copy [N, K]."""

    q: torch.Tensor
    scale: torch.Tensor
    block: int
    path: str = "reference"  # the GEMM path fp8_linear takes by default (GEMM_PATHS)
    dequantized: Optional[torch.Tensor] = None  # [N, K] fp32, kept for the reference path

    @property
    def nbytes(self) -> int:
        """Bytes of the FP8 weight and its scales (what a GPU holds; not the reference path's fp32 copy)."""
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32: q * its tile's scale."""
        return dequantize_blocks(self.q, self.scale, self.block, self.block)


def _tile_view(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """x [R, C] zero-padded to whole tiles and viewed [R / rows, rows, C / cols, cols]; returns it with R, C."""
    r, c = x.shape
    pr, pc = _cdiv(r, rows) * rows - r, _cdiv(c, cols) * cols - c
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.view(x.shape[0] // rows, rows, x.shape[1] // cols, cols), r, c


def quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (q [R, C] e4m3, scale [ceil(R/rows), ceil(C/cols)] fp32), one scale per rows x cols tile."""
    tiles, r, c = _tile_view(x.float(), rows, cols)
    amax = tiles.abs().amax(dim=(1, 3))  # [R / rows, C / cols]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(tiles.shape[0] * rows, tiles.shape[2] * cols)[:r, :c].contiguous(), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of quantize_blocks: [R, C] fp32."""
    r, c = q.shape
    return (q.float() * scale.repeat_interleave(rows, 0)[:r].repeat_interleave(cols, 1)[:, :c])


def quantize_weight(w: torch.Tensor, block: int = 128, out: Optional[Fp8Weight] = None, path: str = "reference") -> Fp8Weight:
    """w [N, K] -> its Fp8Weight (block x block scales) for GEMM path `path` (the reference path also keeps the
    dequantized fp32 weight). With `out`, written into out's tensors in place (CUDA graphs captured over them stay
    valid) and returned. The triton path quantizes with its Triton kernel (the same bytes)."""
    if path == "triton":
        from megatron_tlt.kernels.fp8 import quantize_weight_blocks

        q, scale = quantize_weight_blocks(w.detach(), block)
    else:
        q, scale = quantize_blocks(w.detach(), block, block)
    if out is None:
        out = Fp8Weight(q, scale, block, path)
    else:
        out.q.copy_(q)
        out.scale.copy_(scale)
    if out.path == "reference":
        deq = dequantize_blocks(out.q, out.scale, block, block)
        out.dequantized = deq if out.dequantized is None else out.dequantized.copy_(deq)
    return out


def quantize_activation(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/block)] fp32): per token and `block` channels."""
    return quantize_blocks(x, 1, block)


def _gemm_reference(qx: torch.Tensor, sx: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    deq_w = w.dequantized if w.dequantized is not None else w.dequantize()
    return dequantize_blocks(qx, sx, 1, w.block) @ deq_w.t()


def _gemm_scaled_mm(qx: torch.Tensor, sx: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    n, k = w.q.shape
    b = w.block
    y = None
    for kb in range(_cdiv(k, b)):
        cols = slice(kb * b, min(k, (kb + 1) * b))
        col_scale = w.scale[:, kb].repeat_interleave(b)[:n].reshape(1, n).contiguous()  # W's scale per output column
        part = torch._scaled_mm(qx[:, cols].contiguous(), w.q[:, cols].contiguous().t(), scale_a=sx[:, kb : kb + 1].contiguous(),
                                scale_b=col_scale, out_dtype=torch.float32)
        y = part if y is None else y + part
    return y


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: Optional[torch.Tensor] = None, path: Optional[str] = None) -> torch.Tensor:
    """x [..., K] @ dequant(W).T with x quantized per token and block, through GEMM path `path` (default w.path)
    -> [..., N] in x's dtype."""
    path = path or w.path
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if path == "triton":  # the activation quantizer and the GEMM as Triton kernels
        from megatron_tlt.kernels.fp8 import block_scaled_gemm, quantize_activation_groups

        qx, sx = quantize_activation_groups(x2, w.block)
        y = block_scaled_gemm(qx, sx, w.q, w.scale, w.block)
    elif path in ("reference", "scaled_mm"):
        qx, sx = quantize_activation(x2, w.block)
        y = (_gemm_reference if path == "reference" else _gemm_scaled_mm)(qx, sx, w)
    else:
        raise ValueError(f"unknown FP8 GEMM path {path!r}; valid: {', '.join(GEMM_PATHS)}")
    y = y.to(x.dtype).reshape(*lead, w.q.shape[0])
    return y if bias is None else y + bias


def _time_path(path: str, x: torch.Tensor, w: Fp8Weight, reps: int = 20) -> float:
    """Seconds per fp8_linear call through `path` on CUDA (after one warm-up call), or inf if the path fails or
    disagrees with the reference (then it is not used)."""
    try:
        want = fp8_linear(x, w, path="reference").float()
        got = fp8_linear(x, w, path=path).float()
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            log.warning("FP8 GEMM path %s disagrees with the reference on this GPU: not used", path)
            return math.inf
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fp8_linear(x, w, path=path)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    except Exception as e:  # a kernel this GPU / torch build lacks: the next path
        log.warning("FP8 GEMM path %s fails on this GPU (%s): not used", path, e)
        return math.inf


def resolve_gemm_path(requested: str, device: torch.device, probe_shape: tuple[int, int] = (4096, 4096), block: int = 128,
                      capability: Optional[tuple[int, int]] = None, triton_available: Optional[bool] = None) -> str:
    """The FP8 GEMM path (`GEMM_PATHS`) for `requested` ("auto" or a path) on `device`, logged. A requested path that
    cannot run there raises UserError naming why; "auto" falls back (logged, naming the path taken):
    CPU -> reference (torch._scaled_mm runs on the CPU but is slower than the fp32 matmul there); a GPU with FP8
    tensor cores (sm89+) -> the faster of scaled_mm and triton on a probe GEMM of `probe_shape` (N, K) at 64 tokens;
    an older GPU -> reference (FP8 weights, no speed-up). `capability` / `triton_available` override the device's
    (tests)."""
    if requested != "auto" and requested not in GEMM_PATHS:
        raise UserError(f"rollout.fp8_gemm={requested!r} is not supported; supported: auto, {', '.join(GEMM_PATHS)}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"rollout.precision=fp8 needs a CPU or CUDA device (float8 matmuls), not {device.type}")
    if triton_available is None:
        triton_available = importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        if requested == "triton":
            raise UserError("rollout.fp8_gemm=triton: the Triton FP8 GEMM runs on CUDA only; use auto, scaled_mm or reference on the CPU")
        path = "reference" if requested == "auto" else requested
        log.info("FP8 GEMM path: %s (%s)", path, "CPU: the dequantized fp32 matmul is faster than torch._scaled_mm here"
                 if requested == "auto" else "rollout.fp8_gemm")
        return path
    cap = capability or torch.cuda.get_device_capability(device)
    fp8_cores = tuple(cap) >= (8, 9)
    if requested in ("scaled_mm", "triton") and not fp8_cores:
        raise UserError(f"rollout.fp8_gemm={requested}: FP8 matmuls need FP8 tensor cores (sm89+), this GPU is sm{cap[0]}{cap[1]}; "
                        "use rollout.fp8_gemm=reference (FP8 weights, dequantized matmuls) or rollout.precision=auto")
    if requested == "triton" and not triton_available:
        raise UserError("rollout.fp8_gemm=triton needs triton (pip install triton)")
    if requested != "auto":
        log.info("FP8 GEMM path: %s (rollout.fp8_gemm)", requested)
        return requested
    if not fp8_cores:
        log.warning("FP8 GEMM path: reference: this GPU (sm%d%d) has no FP8 tensor cores; the rollout keeps FP8 weights "
                    "but dequantizes them for each matmul (no speed-up)", cap[0], cap[1])
        return "reference"
    n, k = probe_shape
    w = quantize_weight(torch.randn(n, k, device=device), block)
    x = torch.randn(64, k, device=device, dtype=torch.bfloat16)
    times = {p: _time_path(p, x, w) for p in ("scaled_mm", "triton") if p != "triton" or triton_available}
    path = min(times, key=times.get)
    if math.isinf(times[path]):
        path = "reference"
    log.info("FP8 GEMM path: %s (probe %dx%d at 64 tokens: %s)", path, n, k,
             ", ".join(f"{p} {1e6 * t:.0f} us" for p, t in times.items()))
    return path
