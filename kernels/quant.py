"""Quantize / dequantize to the core's INT and FP formats with the core's ``block_size`` granularity, fused.

What it is for: the real (not fake) quantization step of every plugin: packing weights, quantizing activations
for W8A8 GEMMs (``quantize_dynamic``: per-token scales fused with the max reduction, one pass over the data).

The core is the specification: ``quantize_reference`` / ``dequantize_reference`` are ``polyquant.primitives``'
``quantize_tensor`` / ``dequantize`` plus the code conversion below, and the Triton kernels compute the same
values bit for bit.

Formats are ``polyquant.formats`` objects or names (``get_format``): ``IntFormat`` (``"int2"`` .. ``"int8"``,
``"uint1"`` .. ``"uint8"``) and ``FloatFormat`` of at most 8 bits (``"e2m1"`` = fp4, ``"e2m3"``, ``"e3m2"``,
``"e4m3"`` = fp8 E4M3FN (max 448), ``"e5m2"`` (max 57344), ...). The Triton kernels take their constants
(qmin / qmax, exponent and mantissa bits, bias, max) from the format object.

Granularity is the core's ``block_size`` (one entry per dimension of ``x``, each dividing it; None: per tensor).
Scales and zero points have the core's scale shape ``x.shape / block_size`` (any shape with that many elements
is accepted, a float for per-tensor). The kernels view ``x`` (..., K) as M rows of K and walk groups of
``g = block_size[-1]`` elements along K; blocks over the leading dimensions are expanded on the host.

| granularity (x of shape (M, K))   | block_size | scale shape | core granularity   |
|-----------------------------------|------------|-------------|--------------------|
| per tensor                        | (M, K)     | (1, 1)      | PerTensor()        |
| per row (out channel, token)      | (1, K)     | (M, 1)      | PerChannel(0)      |
| per column (input channel)        | (M, 1)     | (1, K)      | PerChannel(1)      |
| per group of g along K            | (1, g)     | (M, K / g)  | PerGroup(g)        |

Codes (what ``quantize`` returns, same shape as ``x``):
  - IntFormat: the grid values q = clamp(round_half_even(x / scale + zero_point), qmin, qmax) of
    ``quantize_tensor``, as int8 (signed formats) or uint8 (unsigned); ``fmt.encode`` would give q - qmin.
    x_hat = (q - zero_point) * scale.
  - FloatFormat: ``fmt.encode(quantize_tensor(...))``, the bit pattern sign | exponent | mantissa as uint8 (the
    bits of torch.float8_e4m3fn / float8_e5m2 for the 8-bit formats); x / scale saturates at +-max, negative
    zero is stored as +0. x_hat = value(code) * scale. No zero point.

Checks (``ValueError``): shapes and block sizes everywhere. Values: the references (the CPU path) refuse NaN inputs,
scales that are not positive and finite and NaN / Inf zero points (the core's ``quantize_tensor``; dynamic
quantization: NaN / Inf inputs); +-Inf inputs saturate. The Triton kernels check values only where that costs no
device sync (a per-tensor scale given as a number): NaN / Inf inputs and bad tensor scales give unspecified codes
there.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from polyquant.formats import FloatFormat, Format, IntFormat, checking_values, get_format
from polyquant.primitives import block_expand, block_reduce, dequantize as core_dequantize, quantize_tensor, scale_shape

from ._dispatch import HAS_TRITON, as_rows, cdiv, interpreting, next_pow2, require_triton, tl, triton, use_triton

__all__ = [
    "quantize_reference",
    "dequantize_reference",
    "quantize_dynamic_reference",
    "quantize",
    "dequantize",
    "quantize_dynamic",
]

KernelFormat = IntFormat | FloatFormat


# ----------------------------------------------------------------------------------------------------------------
# formats and blocks (the core's, validated for the kernels)


def _kernel_format(fmt: str | Format) -> KernelFormat:
    """The core format ``fmt`` (a name or a Format), checked to have a kernel: INT, or FP of at most 8 bits."""
    fmt = get_format(fmt)
    if isinstance(fmt, IntFormat):
        return fmt
    if isinstance(fmt, FloatFormat) and fmt.bits <= 8 and fmt.exp_bits <= 5:
        return fmt
    raise ValueError(
        f"no kernel for format {fmt.name}: the kernels take integer formats and floating-point formats of at most "
        "8 bits with at most 5 exponent bits"
    )


def _code_dtype(fmt: KernelFormat) -> torch.dtype:
    return torch.int8 if isinstance(fmt, IntFormat) and fmt.signed else torch.uint8


def _symmetric_max(fmt: KernelFormat) -> float:
    """The divisor of absmax scales, as in ``polyquant.primitives.qparams_from_minmax``: qmax or the FP max."""
    return float(fmt.qmax) if isinstance(fmt, IntFormat) else fmt.max_value


def _check_block_size(shape: Sequence[int], block_size: Sequence[int] | None) -> tuple[int, ...]:
    """The core ``block_size`` for a tensor of ``shape`` (None: per tensor), validated as the core does."""
    bs = tuple(shape) if block_size is None else tuple(int(b) for b in block_size)
    scale_shape(shape, bs)  # raises ValueError unless bs has one entry per dim and divides shape
    return bs


def _row_block_size(shape: Sequence[int], block_size: Sequence[int] | None) -> tuple[int, ...]:
    """A block of g consecutive elements along the last dim (None: per token), as dynamic quantization needs."""
    bs = _check_block_size(shape, (*(1 for _ in shape[:-1]), shape[-1]) if block_size is None else block_size)
    if any(b != 1 for b in bs[:-1]):
        raise ValueError(f"dynamic quantization takes blocks along the last dim, (1, ..., 1, g); got {bs}")
    return bs


def _check_number_scale(scale: Tensor | float) -> None:
    """A scale given as a number must be positive and finite (checked on the host: no device sync)."""
    if not isinstance(scale, Tensor) and not 0 < float(scale) < math.inf:
        raise ValueError(f"scales must be positive and finite, got {scale!r}")


def _as_blocks(p: Tensor | float, shape: Sequence[int], block_size: tuple[int, ...], device: torch.device) -> Tensor:
    """A scale / zero point as fp32 in the core's scale shape (one value per block)."""
    blocks = scale_shape(shape, block_size)
    p = torch.as_tensor(p, dtype=torch.float32, device=device)
    if p.numel() != math.prod(blocks):
        raise ValueError(
            f"scale / zero point of shape {tuple(p.shape)} does not fit block_size {block_size} on a tensor of "
            f"shape {tuple(shape)}: expected the scale shape {blocks}"
        )
    return p.reshape(blocks)


def _group_params(p: Tensor | float, shape: Sequence[int], block_size: tuple[int, ...], device: torch.device) -> Tensor:
    """A scale / zero point -> one fp32 value per (row, group of ``block_size[-1]`` along K): (M, K / g), contiguous."""
    groups = (*shape[:-1], shape[-1] // block_size[-1])
    blocks = _as_blocks(p, shape, block_size, device)
    return as_rows(block_expand(blocks, groups, (*block_size[:-1], 1))).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# torch references: the core's primitives (the specification, and the CPU path)


def quantize_reference(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    block_size: Sequence[int] | None = None,
) -> Tensor:
    """Codes of ``x`` with static scales (module docstring): the core's ``quantize_tensor``, then the code dtype."""
    fmt = _kernel_format(fmt)
    if zero_point is not None and isinstance(fmt, FloatFormat):
        raise ValueError(f"{fmt.name} takes no zero point")
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=_code_dtype(fmt), device=x.device)
    bs = _check_block_size(x.shape, block_size)
    s = _as_blocks(scale, x.shape, bs, x.device)
    z = None if zero_point is None else _as_blocks(zero_point, x.shape, bs, x.device)
    q = quantize_tensor(x, fmt, s, z, bs)
    return fmt.encode(q) if isinstance(fmt, FloatFormat) else q.to(_code_dtype(fmt))


def dequantize_reference(
    codes: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    block_size: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values of ``codes``: the core's ``dequantize`` of q (INT) or of ``fmt.decode(codes)`` (FP)."""
    fmt = _kernel_format(fmt)
    if codes.numel() == 0:
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)
    bs = _check_block_size(codes.shape, block_size)
    s = _as_blocks(scale, codes.shape, bs, codes.device)
    if isinstance(fmt, FloatFormat):
        return core_dequantize(fmt.decode(codes), s, None, bs, dtype=dtype)
    z = None if zero_point is None else _as_blocks(zero_point, codes.shape, bs, codes.device)
    return core_dequantize(codes, s, z, bs, dtype=dtype)


def quantize_dynamic_reference(
    x: Tensor, *, fmt: str | Format = "int8", block_size: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic quantization: scale = absmax / qmax (INT) or absmax / max (FP) per block along K.

    ``block_size`` is (1, ..., 1, g); None: per token (1, ..., 1, K).

    Returns:
        codes (same shape as x) and fp32 scales in the core's scale shape (..., K / g). A block of zeros gets
        scale 1 (the core's ``choose_qparams`` gives it ``eps``; both dequantize it to 0).
    """
    fmt = _dynamic_format(fmt)
    if x.numel() == 0:
        return _empty_dynamic(x, fmt, block_size)
    bs = _row_block_size(x.shape, block_size)
    amax = block_reduce(x.float(), bs, "absmax")  # (..., K / g)
    if checking_values() and not bool(torch.isfinite(amax).all()):
        raise ValueError("dynamic quantization: the input contains NaN or Inf (no absmax scale fits it)")
    # tensor / tensor: torch divides by a Python scalar on CUDA through its reciprocal, which is not exact
    scale = torch.where(amax > 0, amax / torch.full_like(amax, _symmetric_max(fmt)), torch.ones_like(amax))
    return quantize_reference(x, scale, fmt=fmt, block_size=bs), scale


def _dynamic_format(fmt: str | Format) -> KernelFormat:
    fmt = _kernel_format(fmt)
    if isinstance(fmt, IntFormat) and (not fmt.signed or fmt.qmax < 1):
        raise ValueError(f"dynamic quantization is symmetric: use a signed integer format of at least 2 bits or a "
                         f"floating-point format, got {fmt.name}")
    return fmt


def _empty_dynamic(x: Tensor, fmt: KernelFormat, block_size: Sequence[int] | None) -> tuple[Tensor, Tensor]:
    k = x.shape[-1] if x.dim() else 0
    g = k if block_size is None else int(block_size[-1])
    groups = k // g if g else 0
    codes = torch.empty(x.shape, dtype=_code_dtype(fmt), device=x.device)
    return codes, torch.empty((*x.shape[:-1], groups), dtype=torch.float32, device=x.device)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _rne(v):
        """Round half to even, exact for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits in fp32."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _pow2(e):
        """2^e as fp32 for an int32 tensor e in [-126, 127], built from the exponent bits."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp_round(v, MAN: tl.constexpr, MIN_EXP: tl.constexpr, MAXV: tl.constexpr):
        """``FloatFormat.round``: saturate, then round to the binade's step (ties to even)."""
        a = tl.minimum(tl.abs(v), MAXV)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a); fp32 subnormals give -127
        e = tl.maximum(e, MIN_EXP)
        q = _rne(a * _pow2(MAN - e)) * _pow2(e - MAN)  # both scalings are exact powers of two
        return tl.where(v < 0, -q, q)

    @triton.jit
    def _fp_encode(q, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
        """``FloatFormat.encode``: grid value -> int32 bit pattern."""
        a = tl.abs(q)
        bits = a.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        mant = (bits >> (23 - MAN)) & ((1 << MAN) - 1)
        normal = ((e + BIAS) << MAN) | mant
        is_normal = e >= 1 - BIAS
        subnormal = (tl.where(is_normal, 0.0, a) * _pow2(tl.full(a.shape, BIAS - 1 + MAN, tl.int32))).to(tl.int32)
        code = tl.where(is_normal, normal, subnormal)
        return code | tl.where(q < 0, 1 << (EXP + MAN), 0)

    @triton.jit
    def _fp_decode(code, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
        """``FloatFormat.decode`` of the finite patterns: int32 bit pattern -> fp32 value."""
        s = (code >> (EXP + MAN)) & 1
        e = (code >> MAN) & ((1 << EXP) - 1)
        m = code & ((1 << MAN) - 1)
        normal = (((e - BIAS + 127) << 23) | (m << (23 - MAN))).to(tl.float32, bitcast=True)
        subnormal = m.to(tl.float32) * _pow2(tl.full(m.shape, 1 - BIAS - MAN, tl.int32))
        v = tl.where(e == 0, subnormal, normal)
        return tl.where(s == 1, -v, v)

    @triton.jit
    def _to_codes(v, z, HAS_ZP: tl.constexpr, IS_FP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                  EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr):
        """x / scale -> int32 codes (integer value, or FP bit pattern); INT: round(x / scale + zero_point)."""
        if IS_FP:
            code = _fp_encode(_fp_round(v, MAN, 1 - BIAS, MAXV), EXP, MAN, BIAS)
        else:
            if HAS_ZP:
                v = v + z
            q = _rne(tl.minimum(tl.maximum(v, -4194304.0), 4194304.0))
            code = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)
        return code

    @triton.jit
    def _quantize_kernel(
        x_ptr, s_ptr, z_ptr, q_ptr, M, K, G, stride_xm,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZP: tl.constexpr,
        IS_FP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
        EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)[:, None]
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        p_off = rows * G + (offs_k // GROUP)[None, :]
        s = tl.load(s_ptr + p_off, mask=mask, other=1.0)
        z = 0.0
        if HAS_ZP:
            z = tl.load(z_ptr + p_off, mask=mask, other=0.0)
        code = _to_codes(tl.math.div_rn(x, s), z, HAS_ZP, IS_FP, QMIN, QMAX, EXP, MAN, BIAS, MAXV)
        tl.store(q_ptr + rows * K + offs_k[None, :], code.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize_kernel(
        q_ptr, s_ptr, z_ptr, y_ptr, M, K, G, stride_qm,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZP: tl.constexpr,
        IS_FP: tl.constexpr, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)[:, None]
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        c = tl.load(q_ptr + rows * stride_qm + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        p_off = rows * G + (offs_k // GROUP)[None, :]
        s = tl.load(s_ptr + p_off, mask=mask, other=1.0)
        if IS_FP:
            v = _fp_decode(c, EXP, MAN, BIAS)
        else:
            v = c.to(tl.float32)
            if HAS_ZP:
                v = v - tl.load(z_ptr + p_off, mask=mask, other=0.0)
        tl.store(y_ptr + rows * K + offs_k[None, :], (v * s).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
        IS_FP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
        EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr,
    ):
        """Per-token dynamic quantization: absmax over each row, scale, codes; one read when K <= BLOCK_K."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        m_mask = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        if SINGLE_PASS:
            mask = m_mask[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=1)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = m_mask[:, None] & (k0 + offs_k[None, :] < K)
                xk = tl.load(x_ptr + rows * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(xk.to(tl.float32)), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, MAXV), 1.0)  # (BLOCK_M,)
        tl.store(s_ptr + offs_m, scale, mask=m_mask)
        if SINGLE_PASS:
            code = _to_codes(tl.math.div_rn(x, scale[:, None]), 0.0, False, IS_FP, QMIN, QMAX, EXP, MAN, BIAS, MAXV)
            tl.store(q_ptr + rows * K + offs_k[None, :], code.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            for k0 in range(0, K, BLOCK_K):
                mask = m_mask[:, None] & (k0 + offs_k[None, :] < K)
                xk = tl.load(x_ptr + rows * stride_xm + k0 + offs_k[None, :], mask=mask, other=0.0)
                v = tl.math.div_rn(xk.to(tl.float32), scale[:, None])
                code = _to_codes(v, 0.0, False, IS_FP, QMIN, QMAX, EXP, MAN, BIAS, MAXV)
                tl.store(q_ptr + rows * K + k0 + offs_k[None, :], code.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_groups_kernel(
        x_ptr, q_ptr, s_ptr, M, K, G, stride_xm,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
        IS_FP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
        EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr,
    ):
        """Per-group dynamic quantization on a (BLOCK_M, BLOCK_G, GROUP_PAD) tile: absmax per group."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_j = tl.arange(0, GROUP_PAD)
        rows = offs_m.to(tl.int64)[:, None, None]
        cols = offs_g[None, :, None] * GROUP + offs_j[None, None, :]  # (1, BLOCK_G, GROUP_PAD)
        mask = (offs_m[:, None, None] < M) & (offs_j[None, None, :] < GROUP) & (cols < K)
        x = tl.load(x_ptr + rows * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=2)  # (BLOCK_M, BLOCK_G)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, MAXV), 1.0)
        s_mask = (offs_m[:, None] < M) & (offs_g[None, :] < G)
        tl.store(s_ptr + offs_m.to(tl.int64)[:, None] * G + offs_g[None, :], scale, mask=s_mask)
        v = tl.math.div_rn(x, scale[:, :, None])
        code = _to_codes(v, 0.0, False, IS_FP, QMIN, QMAX, EXP, MAN, BIAS, MAXV)
        tl.store(q_ptr + rows * K + cols, code.to(q_ptr.dtype.element_ty), mask=mask)


def _format_constants(fmt: KernelFormat) -> dict[str, Any]:
    """The Triton kernels' constexpr parameters, from the core format."""
    if isinstance(fmt, FloatFormat):
        return dict(IS_FP=True, QMIN=0, QMAX=0, EXP=fmt.exp_bits, MAN=fmt.man_bits, BIAS=fmt.exponent_bias,
                    MAXV=fmt.max_value)
    return dict(IS_FP=False, QMIN=fmt.qmin, QMAX=fmt.qmax, EXP=0, MAN=0, BIAS=0, MAXV=_symmetric_max(fmt))


def _tile(m: int, k: int, elems: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of about ``elems`` elements for an (m, k) elementwise op."""
    block_k = min(next_pow2(k), elems)
    block_m = min(next_pow2(m), max(1, elems // block_k))
    return block_m, block_k


def _elems() -> int:
    return 16384 if interpreting() else 4096


def _rows_contig(x: Tensor) -> Tensor:
    xm = as_rows(x)
    return xm if xm.stride(-1) == 1 else xm.contiguous()


def quantize_triton(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | float | None = None, *, fmt: str | Format = "int8",
    block_size: Sequence[int] | None = None,
) -> Tensor:
    """Triton launcher of ``quantize_reference`` (same arguments and result)."""
    require_triton()
    fmt = _kernel_format(fmt)
    if zero_point is not None and isinstance(fmt, FloatFormat):
        raise ValueError(f"{fmt.name} takes no zero point")
    _check_number_scale(scale)
    out = torch.empty(x.shape, dtype=_code_dtype(fmt), device=x.device)
    if x.numel() == 0:
        return out
    bs = _check_block_size(x.shape, block_size)
    k, gs = x.shape[-1], bs[-1]
    xm = _rows_contig(x)
    m = xm.shape[0]
    s = _group_params(scale, x.shape, bs, x.device)  # (M, K / gs)
    z = s if zero_point is None else _group_params(zero_point, x.shape, bs, x.device)
    bm, bk = _tile(m, k, _elems())
    _quantize_kernel[(cdiv(m, bm), cdiv(k, bk))](
        xm, s, z, out, m, k, k // gs, xm.stride(0), GROUP=gs, BLOCK_M=bm, BLOCK_K=bk,
        HAS_ZP=zero_point is not None, **_format_constants(fmt),
    )
    return out


def dequantize_triton(
    codes: Tensor, scale: Tensor | float, zero_point: Tensor | float | None = None, *,
    fmt: str | Format = "int8", block_size: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton launcher of ``dequantize_reference``."""
    require_triton()
    fmt = _kernel_format(fmt)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if codes.numel() == 0:
        return out
    bs = _check_block_size(codes.shape, block_size)
    k, gs = codes.shape[-1], bs[-1]
    cm = _rows_contig(codes)
    m = cm.shape[0]
    s = _group_params(scale, codes.shape, bs, codes.device)
    z = s if zero_point is None else _group_params(zero_point, codes.shape, bs, codes.device)
    c = _format_constants(fmt)
    bm, bk = _tile(m, k, _elems())
    _dequantize_kernel[(cdiv(m, bm), cdiv(k, bk))](
        cm, s, z, out, m, k, k // gs, cm.stride(0), GROUP=gs, BLOCK_M=bm, BLOCK_K=bk,
        HAS_ZP=zero_point is not None and not c["IS_FP"], IS_FP=c["IS_FP"], EXP=c["EXP"], MAN=c["MAN"],
        BIAS=c["BIAS"],
    )
    return out


def quantize_dynamic_triton(
    x: Tensor, *, fmt: str | Format = "int8", block_size: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``quantize_dynamic_reference``: one kernel, the max reduction fused."""
    require_triton()
    fmt = _dynamic_format(fmt)
    if x.numel() == 0:
        return _empty_dynamic(x, fmt, block_size)
    bs = _row_block_size(x.shape, block_size)
    k, gs = x.shape[-1], bs[-1]
    g = k // gs
    codes = torch.empty(x.shape, dtype=_code_dtype(fmt), device=x.device)
    scale = torch.empty((*x.shape[:-1], g), dtype=torch.float32, device=x.device)
    xm = _rows_contig(x)
    m = xm.shape[0]
    consts = _format_constants(fmt)
    elems = _elems()
    if g == 1:  # per token (or one group per row)
        block_k = min(next_pow2(k), 8192 if not interpreting() else 16384)
        block_m = min(next_pow2(m), max(1, elems // block_k))
        _quantize_rows_kernel[(cdiv(m, block_m),)](
            xm, codes, scale, m, k, xm.stride(0), BLOCK_M=block_m, BLOCK_K=block_k,
            SINGLE_PASS=block_k >= k, **consts, num_warps=4 if block_k * block_m <= 4096 else 8,
        )
    else:
        group_pad = next_pow2(gs)
        if group_pad > 8192:
            raise ValueError(f"block_size {bs}: groups of {gs} are too large for the Triton kernel (at most 8192)")
        block_g = min(next_pow2(g), max(1, elems // group_pad))
        block_m = min(next_pow2(m), max(1, elems // (group_pad * block_g)))
        _quantize_groups_kernel[(cdiv(m, block_m), cdiv(g, block_g))](
            xm, codes, scale, m, k, g, xm.stride(0), GROUP=gs, GROUP_PAD=group_pad, BLOCK_M=block_m,
            BLOCK_G=block_g, **consts,
        )
    return codes, scale


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    block_size: Sequence[int] | None = None,
) -> Tensor:
    """Quantize ``x`` to codes with static scales (module docstring); Triton on CUDA.

    Args:
        x: float tensor (..., K).
        scale: one scale per block, in the core's scale shape ``x.shape / block_size``; a float for per tensor.
        zero_point: integer formats only; same shape as ``scale``.
        fmt: a ``polyquant.formats`` format or name: ``"int8"``, ``"int4"``, ``"uint8"``, ``"e2m1"``, ``"e4m3"``, ...
        block_size: the core's block size, e.g. ``(1, 128)`` for groups of 128 along K; None: per tensor.

    Returns:
        Codes, same shape as ``x``: int8 for signed integer formats, uint8 otherwise.

    Raises:
        ValueError: bad shapes; NaN inputs or scales that are not positive and finite (the Triton path checks only
            a scale given as a number: module docstring).
    """
    if use_triton(x):
        return quantize_triton(x, scale, zero_point, fmt=fmt, block_size=block_size)
    return quantize_reference(x, scale, zero_point, fmt=fmt, block_size=block_size)


def dequantize(
    codes: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    block_size: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of ``quantize``: values of ``codes`` (..., K) times their scales, as ``dtype``."""
    if use_triton(codes):
        return dequantize_triton(codes, scale, zero_point, fmt=fmt, block_size=block_size, dtype=dtype)
    return dequantize_reference(codes, scale, zero_point, fmt=fmt, block_size=block_size, dtype=dtype)


def quantize_dynamic(
    x: Tensor, *, fmt: str | Format = "int8", block_size: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic quantization with absmax scales per token (``block_size=None``) or per group along K.

    Used for W8A8 activations (per-token int8, then ``gemm.int8_gemm``) and for packing weights per group.

    Args:
        block_size: ``(1, ..., 1, g)``, g dividing K; None: per token, ``(1, ..., 1, K)``.

    Returns:
        (codes like ``x``, fp32 scales (..., K / g)); scale = absmax / qmax (INT) or absmax / max (FP), 1 for a
        block of zeros.
    """
    if use_triton(x):
        return quantize_dynamic_triton(x, fmt=fmt, block_size=block_size)
    return quantize_dynamic_reference(x, fmt=fmt, block_size=block_size)
