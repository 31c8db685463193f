"""FP8 (e4m3) Triton kernels, each equal to its torch reference in `ops/fp8.py`:

- `quantize_weight_blocks(w [N, K], block)`: one fp32 scale per block x block tile (== `quantize_weight`),
- `quantize_activation_groups(x [M, K], block)`: one scale per token and `block` channels (== `quantize_activation`),
- `block_scaled_gemm(qx, sx, qw, sw, block)`: y [M, N] fp32 = sum over channel blocks kb of
  sx[m, kb] * sw[n // block, kb] * (qx[m, kb-block] . qw[n, kb-block]) (== `_gemm_reference` up to fp32 summation
  order).

The quantizers are bit-exact: scale = amax / 448 and x / scale are IEEE-rounded divisions (`tl.math.div_rn`; Triton's
`/` is approximate on NVIDIA GPUs), and the e4m3 byte is rounded to nearest even in integer / fp32 arithmetic
(`_e4m3_bits`) rather than by Triton's fp8 cast, whose emulation in the interpreter rounds differently from torch.

The wrappers take CUDA tensors, or CPU tensors when Triton runs interpreted (TRITON_INTERPRET=1 set before Triton is
imported): that is how the CPU tests run them.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("megatron_tlt.kernels.fp8 needs Triton: pip install triton (Linux x86_64)") from e

E4M3 = torch.float8_e4m3fn
_GEMM_BLOCK_M = 64
_GEMM_BLOCK_N = 128
_ACT_BLOCK_M = 16  # tokens per program of the activation quantizer


@triton.jit
def _e4m3_bits(v):
    """fp32 v with |v| <= 448 -> its float8_e4m3fn byte (uint8), rounded to nearest, ties to even, as torch casts."""
    bits = v.to(tl.uint32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # normal e4m3 (|v| >= 2^-6): exponent bias 127 -> 7, mantissa 23 -> 3 bits rounded to nearest even (a carry
    # into the exponent is the right rounding up)
    rebiased = mag - (120 << 23)
    normal = (rebiased + 0x7FFFF + ((rebiased >> 20) & 1)) >> 20
    # subnormal (|v| < 2^-6, multiples of 2^-9): adding 2^14 (ulp 2^-9) rounds |v| in fp32; its bits less 2^14's
    # are the multiple (8, i.e. 2^-6, encodes itself)
    subnormal = (tl.abs(v) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(mag < 0x3C800000, subnormal, normal) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def _quantize_weight_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_qn, stride_sn, BLOCK: tl.constexpr):
    """One program per BLOCK x BLOCK tile (tile_n, tile_k) = program ids: its scale and e4m3 bytes."""
    tile_n, tile_k = tl.program_id(0), tl.program_id(1)
    rows = tile_n * BLOCK + tl.arange(0, BLOCK)[:, None]
    cols = tile_k * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < N) & (cols < K)
    w = tl.load(w_ptr + rows * stride_wn + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = _e4m3_bits(tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0))
    tl.store(q_ptr + rows * stride_qn + cols, q, mask=mask)
    tl.store(s_ptr + tile_n * stride_sn + tile_k, scale)


@triton.jit
def _quantize_activation_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                                BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """One program per BLOCK_M tokens x one group of BLOCK channels: a scale per token, and the e4m3 bytes."""
    tile_m, group = tl.program_id(0), tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = group * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows[:, None] < M) & (cols < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_M]
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = _e4m3_bits(tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols, q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + group, scale, mask=rows < M)


@triton.jit
def _block_scaled_gemm_kernel(qx_ptr, sx_ptr, qw_ptr, sw_ptr, y_ptr, M, N, K,
                              stride_xm, stride_sxm, stride_wn, stride_swn, stride_ym,
                              BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M x BLOCK_N tile of y: over the K blocks, the e4m3 dot in fp32 times x's row scales
    and W's tile scales, summed in fp32."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK)):
        k = kb * BLOCK + rk
        a = tl.load(qx_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(qw_ptr + rn[None, :] * stride_wn + k[:, None], mask=(k[:, None] < K) & (rn[None, :] < N), other=0.0)
        if BLOCK < 32:  # fp8 dots need K >= 32 on NVIDIA GPUs; e4m3 values are exact in fp16
            a, b = a.to(tl.float16), b.to(tl.float16)
        # max_num_imprecise_acc=0: on sm90 each fp8 MMA instruction's partial sum is added into an fp32 accumulator
        # (Triton's sm90 default, 2^30, keeps the whole K block in the tensor cores' reduced-precision accumulation)
        part = tl.dot(a, b, out_dtype=tl.float32, max_num_imprecise_acc=0)
        sa = tl.load(sx_ptr + rm * stride_sxm + kb, mask=rm < M, other=0.0)
        sb = tl.load(sw_ptr + (rn // BLOCK) * stride_swn + kb, mask=rn < N, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


_INTERPRETED = not isinstance(_block_scaled_gemm_kernel, triton.runtime.JITFunction)


def _check(name: str, t: torch.Tensor) -> torch.Tensor:
    """t, contiguous; a ValueError unless it is 2-D and on CUDA (or on the CPU under the interpreter)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not (t.is_cuda or (_INTERPRETED and t.device.type == "cpu")):
        raise ValueError(f"{name} is on {t.device}: the Triton kernels take CUDA tensors (CPU ones only with "
                         "TRITON_INTERPRET=1 set before triton is imported)")
    return t.contiguous()


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block!r}: a power of 2 >= 16 is supported")


def quantize_weight_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (q [N, K] e4m3, scale [ceil(N/block), ceil(K/block)] fp32), one scale per
    block x block tile (edge tiles smaller): bit-exactly `ops.fp8.quantize_blocks(w, block, block)`."""
    _check_block(block)
    w = _check("w", w)
    n, k = w.shape
    grid = (triton.cdiv(n, block), triton.cdiv(k, block))
    q = torch.empty(n, k, dtype=E4M3, device=w.device)
    scale = torch.empty(grid, dtype=torch.float32, device=w.device)
    q_bytes = q.view(torch.uint8)
    _quantize_weight_kernel[grid](w, q_bytes, scale, n, k, w.stride(0), q_bytes.stride(0), scale.stride(0),
                                  BLOCK=block, num_warps=8 if block >= 128 else 4)
    return q, scale


def quantize_activation_groups(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (q [M, K] e4m3, scale [M, ceil(K/block)] fp32), one scale per token and `block`
    channels: bit-exactly `ops.fp8.quantize_activation(x, block)`."""
    _check_block(block)
    x = _check("x", x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=E4M3, device=x.device)
    scale = torch.empty(m, triton.cdiv(k, block), dtype=torch.float32, device=x.device)
    q_bytes = q.view(torch.uint8)
    grid = (triton.cdiv(m, _ACT_BLOCK_M), triton.cdiv(k, block))
    _quantize_activation_kernel[grid](x, q_bytes, scale, m, k, x.stride(0), q_bytes.stride(0), scale.stride(0),
                                      BLOCK_M=_ACT_BLOCK_M, BLOCK=block)
    return q, scale


def block_scaled_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                      block: int) -> torch.Tensor:
    """qx [M, K] e4m3 with sx [M, ceil(K/block)] fp32 (per token and block channels), qw [N, K] e4m3 with
    sw [ceil(N/block), ceil(K/block)] fp32 (block x block tiles) -> y [M, N] fp32 = dequant(qx) @ dequant(qw).T."""
    _check_block(block)
    qx, sx, qw, sw = _check("qx", qx), _check("sx", sx), _check("qw", qw), _check("sw", sw)
    (m, k), (n, kw) = qx.shape, qw.shape
    kb = triton.cdiv(k, block)
    if qx.dtype != E4M3 or qw.dtype != E4M3 or kw != k:
        raise ValueError(f"qx {tuple(qx.shape)} {qx.dtype} and qw {tuple(qw.shape)} {qw.dtype}: e4m3 with one K")
    if tuple(sx.shape) != (m, kb) or tuple(sw.shape) != (triton.cdiv(n, block), kb) or \
            sx.dtype != torch.float32 or sw.dtype != torch.float32:
        raise ValueError(f"scales sx {tuple(sx.shape)} {sx.dtype}, sw {tuple(sw.shape)} {sw.dtype}: fp32 scales for "
                         f"M={m}, N={n}, K={k}, block={block}")
    y = torch.empty(m, n, dtype=torch.float32, device=qx.device)
    grid = (triton.cdiv(m, _GEMM_BLOCK_M), triton.cdiv(n, _GEMM_BLOCK_N))
    _block_scaled_gemm_kernel[grid](qx, sx, qw, sw, y, m, n, k, qx.stride(0), sx.stride(0), qw.stride(0),
                                    sw.stride(0), y.stride(0), BLOCK=block, BLOCK_M=_GEMM_BLOCK_M,
                                    BLOCK_N=_GEMM_BLOCK_N)
    return y
