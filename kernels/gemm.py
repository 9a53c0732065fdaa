"""Quantized GEMMs: 4-bit weight-only (int4 / fp4 E2M1, per-group scales) and W8A8 int8.

What they are for: ``w4_gemm`` is the weight-only linear layer of the 4-bit plugins (DiT / ViT / audio weights,
batch 1 to a few hundred tokens); ``int8_gemm`` is the W8A8 linear layer of Quamba (SSM) and ViT W8A8, with
per-token activation scales and per-channel weight scales.

Packed 4-bit weights use the core's row layout (``polyquant.pack.pack_rows``), the layout of artifacts too: a
weight W (N, K) (nn.Linear layout: out_features x in_features) is stored as ``packed`` (N, ceil(K / 2)) uint8, two
codes per byte along K, **the low nibble holding the even index k = 2j, the high nibble the odd index k = 2j + 1**
(an odd K is padded with code 0). Codes are the core formats' ``encode`` codes:
  - ``"int4"`` (``IntFormat(4)``): offset binary, code = q + 8 for q in [-8, 7]; symmetric scales absmax / 7
    (so -8 is not produced by ``quantize_weight_4bit``, but it decodes correctly).
  - ``"e2m1"`` (fp4, ``FloatFormat(2, 1)``): sign bit, 2 exponent bits (bias 1), 1 mantissa bit; magnitudes
    {0, 0.5, 1, 1.5, 2, 3, 4, 6}; scale absmax / 6.
Scales follow the core's ``block_size`` (1, g) (``PerGroup(g)``; g = K is per channel): ``scale`` (N, K / g), any
float dtype; W[n, k] = value(code[n, k]) * scale[n, k // g]. An artifact's ``weight_packed`` (viewed as
(N, ceil(K / 2))) and ``weight_scale`` feed ``w4_gemm`` as they are.

    y = x @ W.T (+ bias)      x (..., K) in fp16 / bf16 / fp32 -> y (..., N) in x.dtype

W8A8: y = (xq @ wq.T) * x_scale[:, None] * w_scale[None, :] (+ bias), int32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from polyquant.formats import FloatFormat, Format, IntFormat, get_format
from polyquant.pack import pack_rows, unpack_rows
from polyquant.primitives import scale_shape

from ._dispatch import (
    HAS_TRITON, as_rows, cdiv, compute_dtype, interpreting, require_triton, tl, tl_dtype, triton, use_triton,
)
from .quant import dequantize_reference, quantize_dynamic

__all__ = [
    "pack_4bit",
    "unpack_4bit",
    "quantize_weight_4bit",
    "dequantize_weight_4bit",
    "w4_gemm_reference",
    "w4_gemm",
    "int8_gemm_reference",
    "int8_gemm",
    "w8a8_linear",
    "GemmConfig",
]

_E2M1 = FloatFormat(2, 1)


def _w4_format(fmt: str | Format) -> IntFormat | FloatFormat:
    """The core format of a 4-bit weight: int4 (signed) or e2m1; the kernels decode no other."""
    f = get_format(fmt)
    if isinstance(f, (IntFormat, FloatFormat)) and f in (IntFormat(4), _E2M1):
        return f
    raise ValueError(f"4-bit weight format must be int4 or e2m1 (fp4), got {f.name}")


def _w4_group(k: int, n: int, block_size: Sequence[int]) -> int:
    """The group length g of a weight (N, K) with the core's block_size (1, g); g even or g = K (per channel)."""
    bs = tuple(int(b) for b in block_size)
    if len(bs) != 2 or bs[0] != 1:
        raise ValueError(f"4-bit weights take block_size (1, g) (PerGroup(g) along K), got {bs}")
    if n * k:
        scale_shape((n, k), bs)  # the core's check: g divides K
    g = bs[1]
    if g % 2 and g != k:
        raise ValueError(f"4-bit weights need an even group length (two codes per byte) or g = K, got {g}")
    return g


# ----------------------------------------------------------------------------------------------------------------
# packing and weight quantization (torch; these are layout helpers, not hot paths)


def pack_4bit(codes: Tensor) -> Tensor:
    """``polyquant.pack.pack_rows(codes, 4)``: codes (..., K) in [0, 15] -> (..., ceil(K / 2)) uint8.

    Codes are the formats' ``encode`` codes (int4: q + 8; e2m1: the bit pattern); low nibble = even index.
    """
    return pack_rows(codes, 4)


def unpack_4bit(packed: Tensor, k: int) -> Tensor:
    """``polyquant.pack.unpack_rows(packed, 4, k)``: (..., ceil(k / 2)) uint8 -> (..., k) uint8 codes in [0, 15]."""
    return unpack_rows(packed, 4, k)


def quantize_weight_4bit(
    w: Tensor, *, fmt: str | Format = "int4", block_size: Sequence[int] = (1, 128)
) -> tuple[Tensor, Tensor]:
    """Symmetric 4-bit quantization of a weight (N, K) with absmax scales per block (1, g), packed for ``w4_gemm``.

    Returns:
        packed (N, ceil(K / 2)) uint8 and fp32 scales (N, K / g).

    Raises:
        ValueError: NaN / Inf in ``w`` (checked on every path: packing is done once, a device sync is cheap here).
    """
    f = _w4_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"expected a weight (N, K), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight contains NaN or Inf: it has no 4-bit codes")
    _w4_group(w.shape[1], w.shape[0], block_size)
    codes, scale = quantize_dynamic(w, fmt=f, block_size=block_size)  # (N, K) kernel codes, (N, K / g)
    if isinstance(f, IntFormat):
        codes = f.encode(codes)  # q -> q + 8, the format's codes
    return pack_4bit(codes), scale


def dequantize_weight_4bit(
    packed: Tensor, scale: Tensor, *, k: int, fmt: str | Format = "int4", block_size: Sequence[int] = (1, 128),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Packed 4-bit weight -> dense (N, k) weight: ``dequantize_reference`` (the core's decode and dequantize)."""
    f = _w4_format(fmt)
    _w4_group(k, packed.shape[0], block_size)
    codes = unpack_4bit(packed, k)  # (N, k) the format's codes
    if isinstance(f, IntFormat):
        codes = f.decode(codes).to(torch.int8)  # q + 8 -> q, the kernel codes
    return dequantize_reference(codes, scale.float(), fmt=f, block_size=block_size, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# torch references


def _check_w4(x: Tensor, packed: Tensor, scale: Tensor, block_size: Sequence[int]) -> tuple[int, int, int]:
    """(N, K, g) of a packed weight (N, ceil(K / 2)) and its scales (N, K / g)."""
    k = x.shape[-1]
    n = packed.shape[0]
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != cdiv(k, 2):
        raise ValueError(f"packed must be uint8 (N, ceil(K/2)) = (N, {cdiv(k, 2)}), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    g = _w4_group(k, n, block_size)
    if scale.shape != (n, k // g if g else 0):
        raise ValueError(f"scale must have shape (N, K / g) = {(n, k // g if g else 0)} for block_size "
                         f"{tuple(block_size)}, got {tuple(scale.shape)}")
    return n, k, g


def w4_gemm_reference(
    x: Tensor, packed: Tensor, scale: Tensor, *, fmt: str | Format = "int4", block_size: Sequence[int] = (1, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ dequant(W).T (+ bias): dequantize to fp32, fp32 matmul, cast to x.dtype."""
    n, k, _ = _check_w4(x, packed, scale, block_size)
    w = dequantize_weight_4bit(packed, scale, k=k, fmt=fmt, block_size=block_size)  # (N, K)
    y = as_rows(x).float() @ w.T  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _vec(p: Tensor | float, n: int, device: torch.device, what: str) -> Tensor:
    p = torch.as_tensor(p, dtype=torch.float32, device=device).reshape(-1)
    if p.numel() not in (1, n):
        raise ValueError(f"{what} must have 1 or {n} elements, got {p.numel()}")
    return p.expand(n).contiguous()


_FP32_EXACT_K = (1 << 24) // (128 * 128)  # 1024: below it every partial sum of int8 products is below 2^24
_INT32_EXACT_K = (1 << 31) // (128 * 128)  # 131072: below it int32 accumulation cannot overflow


def _fp32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether a float32 matmul on ``device`` is plain IEEE float32: the CPU, with no bf16 / tf32 shortcut."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(matmul, "fp32_precision", "none") in ("none", "ieee")


def _int8_products(xm: Tensor, wq: Tensor) -> Tensor:
    """The exact integer sums xm (M, K) @ wq.T (N, K) of int8 operands, rounded once to float32 (M, N).

    On the CPU: ``torch._int_mm`` (int32 accumulation, exact for K < 2^17; 5-8x faster than float64 at K = 384;
    not below K = 16, where it gains nothing, and at K = 1 torch 2.14's CPU kernel returns garbage), else a float32
    matmul when K < 1024 (|a|, |b| <= 128: every partial sum, in any order, is an integer below 2^24, so float32 is
    exact) and the float32 matmul is IEEE. Otherwise (other devices, longer K) float64 (exact: |sum| < 2^53). All
    paths give the same float32 values, bit for bit.
    """
    k = xm.shape[-1]
    int8 = xm.dtype == wq.dtype == torch.int8  # the bounds above hold for int8 operands only
    if int8 and xm.device.type == "cpu" and 16 <= k < _INT32_EXACT_K and hasattr(torch, "_int_mm"):
        return torch._int_mm(xm, wq.T).float()
    if int8 and k < _FP32_EXACT_K and _fp32_matmul_is_ieee(xm.device):
        return xm.float() @ wq.float().T
    return (xm.double() @ wq.double().T).float()


def _is_one(scale: Tensor | float) -> bool:
    return isinstance(scale, (int, float)) and scale == 1


def int8_gemm_reference(
    xq: Tensor, x_scale: Tensor | float, wq: Tensor, w_scale: Tensor | float, *, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> Tensor:
    """y = (xq @ wq.T) * x_scale * w_scale (+ bias); xq (..., K) int8, wq (N, K) int8, exact integer products.

    x_scale: per token, (..., 1) / (M,) or a scalar; w_scale: per output channel (N,) / (N, 1) or a scalar.
    """
    n = wq.shape[0]
    xm = as_rows(xq)  # (M, K)
    xs = _vec(x_scale, xm.shape[0], xq.device, "x_scale")
    ws = _vec(w_scale, n, xq.device, "w_scale")
    y = _int8_products(xm, wq)  # (M, N) float32, a fresh tensor: scaled in place (a scale of 1 skipped: exact)
    if not _is_one(x_scale):
        y.mul_(xs[:, None])
    if not _is_one(w_scale):
        y.mul_(ws)
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters. ``kind`` "gemv" (CUDA cores, one x row per program; w4 only) or "dot" (tensor cores)."""

    kind: str = "dot"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


if HAS_TRITON:

    @triton.jit
    def _nibbles_to_f16(nib, IS_FP: tl.constexpr):
        """int16 nibbles -> fp16: int4 offset binary q + 8 exactly; E2M1 values times 2^-14 (``S_MUL`` undoes it)."""
        if IS_FP:
            # sign -> bit 15; exponent and mantissa -> bits 10..9: an fp16 of value e2m1 * 2^-14 (subnormals too)
            return (((nib & 8) << 12) | ((nib & 7) << 9)).to(tl.float16, bitcast=True)
        else:
            return (nib | 0x6400).to(tl.float16, bitcast=True) - 1032.0  # 1024 + (q + 8) - 1032 = q

    @triton.jit
    def _nibbles_to_f32(nib, IS_FP: tl.constexpr):
        """int16 nibbles -> fp32 without a conversion instruction for int4 (2^23 + c built from bits, minus 2^23);
        E2M1 through fp16 (times 2^-14, as in ``_nibbles_to_f16``)."""
        if IS_FP:
            return _nibbles_to_f16(nib, IS_FP).to(tl.float32)
        else:
            return (0x4B000000 | nib.to(tl.int32)).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, KP, G, stride_xm, stride_wn, stride_sn, stride_ym,
        GROUP: tl.constexpr, IS_FP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
    ):
        """One row of x per program (axis 1), BLOCK_N output channels; fp32 FMAs on CUDA cores."""
        S_MUL: tl.constexpr = 16384.0 if IS_FP else 1.0  # undoes the 2^-14 of the E2M1 decode
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_kp = tl.arange(0, BLOCK_KP)
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kp0 in range(0, KP, BLOCK_KP):
            kp = kp0 + offs_kp
            wb = tl.load(w_rows + kp[None, :], mask=n_mask[:, None] & (kp[None, :] < KP), other=0)
            wb = wb.to(tl.int16)
            lo = _nibbles_to_f32(wb & 0xF, IS_FP)  # (BLOCK_N, BLOCK_KP): even k
            hi = _nibbles_to_f32(wb >> 4, IS_FP)  # odd k
            ks = 2 * kp0 + tl.arange(0, 2 * BLOCK_KP)
            xk = tl.load(x_ptr + m * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(xk, (BLOCK_KP, 2)))
            prod = lo * xe[None, :] + hi * xo[None, :]  # (BLOCK_N, BLOCK_KP)
            if 2 * BLOCK_KP <= GROUP:  # the whole step lies in one group
                s = tl.load(s_rows + (2 * kp0) // GROUP, mask=n_mask, other=0.0).to(tl.float32)
                acc += tl.sum(prod, axis=1) * (s * S_MUL)
            else:  # several groups per step: per-group partial sums
                NG: tl.constexpr = 2 * BLOCK_KP // GROUP
                part = tl.sum(tl.reshape(prod, (BLOCK_N, NG, GROUP // 2)), axis=2)  # (BLOCK_N, NG)
                g = (2 * kp0) // GROUP + tl.arange(0, NG)
                s = tl.load(s_rows[:, None] + g[None, :], mask=n_mask[:, None] & (g[None, :] < G), other=0.0)
                acc += tl.sum(part * (s.to(tl.float32) * S_MUL), axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w4_gemm_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KP, G, stride_xm, stride_wn, stride_sn, stride_ym,
        GROUP: tl.constexpr, IS_FP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """Tensor-core tiles: x (BLOCK_M, BLOCK_K) split into even / odd columns against the low / high nibbles."""
        S_MUL: tl.constexpr = 16384.0 if IS_FP else 1.0
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # grouped order: GROUP_M row blocks share each weight column block in L2
        first_m = (pid // width) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gm
        pid_n = (pid % width) // gm
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        HALF: tl.constexpr = BLOCK_K // 2
        offs_kp = tl.arange(0, HALF)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
        s_cols = s_ptr + offs_n.to(tl.int64) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kp = k0 // 2 + offs_kp
            wb = tl.load(w_cols + kp[:, None], mask=(kp[:, None] < KP) & n_mask[None, :], other=0)
            wb = wb.to(tl.int16)  # (HALF, BLOCK_N)
            ks = k0 + offs_k
            xk = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & (ks[None, :] < K), other=0.0)
            xe, xo = tl.split(tl.reshape(xk.to(DOT_DTYPE), (BLOCK_M, HALF, 2)))  # (BLOCK_M, HALF) each
            lo = _nibbles_to_f16(wb & 0xF, IS_FP)
            hi = _nibbles_to_f16(wb >> 4, IS_FP)
            if GROUP % BLOCK_K == 0:  # one scale per column for this step: scale the partial product
                s = tl.load(s_cols + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32) * S_MUL
                part = tl.dot(xe, lo.to(DOT_DTYPE), input_precision=PRECISION)
                part = tl.dot(xo, hi.to(DOT_DTYPE), part, input_precision=PRECISION)
                acc += part * s[None, :]
            else:  # dequantize the tile: per-element scales
                g = (2 * kp) // GROUP
                s = tl.load(s_cols[None, :] + g[:, None], mask=(g[:, None] < G) & n_mask[None, :], other=0.0)
                s = s.to(tl.float32) * S_MUL
                acc = tl.dot(xe, (lo.to(tl.float32) * s).to(DOT_DTYPE), acc, input_precision=PRECISION)
                acc = tl.dot(xo, (hi.to(tl.float32) * s).to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _int8_gemm_kernel(
        a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C = (A @ B.T) * a_scale[:, None] * b_scale[None, :] (+ bias); A (M, K), B (N, K) int8."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gm
        pid_n = (pid % width) // gm
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        a_s = tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptr + offs_n, mask=n_mask, other=0.0)
        c = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            c += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _w4_config(m: int, n: int, k: int, group_size: int) -> GemmConfig:
    """Heuristic launch parameters, picked from a sweep on an H100 (benchmarks/kernels.py, fp16, group 128)."""
    if interpreting():  # few, large tiles: the interpreter's cost is per operation
        return GemmConfig("dot", 16 if m <= 16 else 64, 64, 256, 4, 1)
    if m <= 2 and group_size & (group_size - 1) == 0:
        return GemmConfig("gemv", 1, 16, 2048, 8 if k <= 4096 else 4, 1)
    # BLOCK_K dividing the group scales the partial products once per tile; otherwise per element
    if group_size % 32:
        block_k = 128  # no power-of-two tile fits a group: per-element scales
    else:
        block_k = 128 if group_size % 128 == 0 else (64 if group_size % 64 == 0 else 32)
    if m <= 16:
        return GemmConfig("dot", 16, 32, block_k, 4, 4)
    if n <= 4096:
        return GemmConfig("dot", 64, 32, block_k, 4, 3)
    return GemmConfig("dot", 128, 64, block_k, 8, 3)


def w4_gemm_triton(
    x: Tensor, packed: Tensor, scale: Tensor, *, fmt: str | Format = "int4", block_size: Sequence[int] = (1, 128),
    bias: Tensor | None = None, config: GemmConfig | None = None,
) -> Tensor:
    """Triton launcher of ``w4_gemm_reference``; ``config`` overrides the heuristic launch parameters."""
    require_triton()
    is_fp = isinstance(_w4_format(fmt), FloatFormat)
    n, k, group_size = _check_w4(x, packed, scale, block_size)
    g = scale.shape[1]  # groups per row
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    xm = as_rows(x)
    if xm.stride(-1) != 1:
        xm = xm.contiguous()
    m = xm.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    if k == 0:
        return y.zero_().add_(bias if bias is not None else 0).reshape(*x.shape[:-1], n)
    if packed.stride(-1) != 1:
        packed = packed.contiguous()
    if scale.stride(-1) != 1:
        scale = scale.contiguous()
    cfg = config or _w4_config(m, n, k, group_size)
    b = bias if bias is not None else scale  # a dummy pointer when there is no bias
    if cfg.kind == "gemv":
        block_kp = cfg.block_k // 2
        if group_size & (group_size - 1) or (2 * block_kp > group_size and (2 * block_kp) % group_size):
            raise ValueError(f"the gemv kernel needs a power-of-two group length, got {group_size}")
        _w4_gemv_kernel[(cdiv(n, cfg.block_n), m)](
            xm, packed, scale, b, y, n, k, packed.shape[1], g, xm.stride(0), packed.stride(0), scale.stride(0),
            y.stride(0), GROUP=group_size, IS_FP=is_fp, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
            BLOCK_KP=block_kp, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        dot_dtype = compute_dtype(x.dtype)
        grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
        _w4_gemm_kernel[grid](
            xm, packed, scale, b, y, m, n, k, packed.shape[1], g, xm.stride(0), packed.stride(0), scale.stride(0),
            y.stride(0), GROUP=group_size, IS_FP=is_fp, HAS_BIAS=bias is not None, DOT_DTYPE=tl_dtype(dot_dtype),
            PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y.reshape(*x.shape[:-1], n)


def _int8_config(m: int, n: int, k: int) -> GemmConfig:
    if interpreting():
        return GemmConfig("dot", 64 if m > 32 else 32, 64, 256, 4, 1)
    if m <= 32:
        return GemmConfig("dot", 32, 32, 256, 4, 4)
    if m <= 256:
        return GemmConfig("dot", 64, 64, 256, 4, 4)
    return GemmConfig("dot", 128, 256, 128, 8, 3)


def int8_gemm_triton(
    xq: Tensor, x_scale: Tensor | float, wq: Tensor, w_scale: Tensor | float, *, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16, config: GemmConfig | None = None,
) -> Tensor:
    """Triton launcher of ``int8_gemm_reference``."""
    require_triton()
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != xq.shape[-1]:
        raise ValueError(f"need xq (..., K) and wq (N, K) int8, got {xq.dtype} {tuple(xq.shape)}, "
                         f"{wq.dtype} {tuple(wq.shape)}")
    k = xq.shape[-1]
    n = wq.shape[0]
    xm = as_rows(xq)
    if xm.stride(-1) != 1:
        xm = xm.contiguous()
    if wq.stride(-1) != 1:
        wq = wq.contiguous()
    m = xm.shape[0]
    xs = _vec(x_scale, m, xq.device, "x_scale")
    ws = _vec(w_scale, n, xq.device, "w_scale")
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y.reshape(*xq.shape[:-1], n)
    cfg = config or _int8_config(m, n, k)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    _int8_gemm_kernel[grid](
        xm, wq, xs, ws, bias if bias is not None else xs, y, m, n, k, xm.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(*xq.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def w4_gemm(
    x: Tensor, packed: Tensor, scale: Tensor, *, fmt: str | Format = "int4", block_size: Sequence[int] = (1, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """Weight-only 4-bit linear: y = x @ W.T (+ bias), W dequantized inside the kernel (module docstring).

    Args:
        x: activations (..., K), fp16 / bf16 / fp32.
        packed: (N, ceil(K / 2)) uint8 in the core's row layout (``quantize_weight_4bit``, ``pack_4bit``, or an
            artifact's ``weight_packed`` viewed as (N, -1)).
        scale: (N, K / g) per-group scales, any float dtype (an artifact's ``weight_scale``).
        fmt: int4 or e2m1 (fp4): a ``polyquant.formats`` format or name.
        block_size: the core's (1, g): g elements of K per scale (32 to 128 typical; g = K for per channel).
        bias: optional (N,).

    Returns:
        y (..., N) in x.dtype.
    """
    if use_triton(x, packed, scale):
        return w4_gemm_triton(x, packed, scale, fmt=fmt, block_size=block_size, bias=bias)
    return w4_gemm_reference(x, packed, scale, fmt=fmt, block_size=block_size, bias=bias)


def int8_gemm(
    xq: Tensor, x_scale: Tensor | float, wq: Tensor, w_scale: Tensor | float, *, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> Tensor:
    """W8A8 GEMM: y = (xq @ wq.T) * x_scale * w_scale (+ bias) with int32 accumulation.

    Args:
        xq: int8 activations (..., K); x_scale: per token ((..., 1), (M,)) or a scalar.
        wq: int8 weight (N, K); w_scale: per output channel ((N,), (N, 1)) or a scalar.
        bias: optional (N,). out_dtype: dtype of y (..., N).
    """
    if use_triton(xq, wq):
        return int8_gemm_triton(xq, x_scale, wq, w_scale, bias=bias, out_dtype=out_dtype)
    return int8_gemm_reference(xq, x_scale, wq, w_scale, bias=bias, out_dtype=out_dtype)


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor | float, *, bias: Tensor | None = None) -> Tensor:
    """Dynamic per-token int8 quantization of ``x`` (..., K), then ``int8_gemm``; y (..., N) in x.dtype."""
    xq, xs = quantize_dynamic(x, fmt="int8")  # (..., K) int8, (..., 1) fp32
    return int8_gemm(xq, xs, wq, w_scale, bias=bias, out_dtype=x.dtype)


