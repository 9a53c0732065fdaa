"""Quantize / dequantize to INT-k and FP ExMy codes with per-tensor, per-channel, per-group and per-token scales.

What it is for: the real (not fake) quantization step of every plugin: packing weights, quantizing activations
for W8A8 GEMMs (``quantize_dynamic``: per-token scales fused with the max reduction, one pass over the data).

Granularity. ``x`` of shape (..., K) is viewed as M = prod(...) rows of K. Scales (and zero points) have one
value per group of ``group_size`` consecutive elements of a row, i.e. shape (..., G) with G = ceil(K / group_size);
any shape that broadcasts to that is accepted:

| granularity                   | group_size | scale shape for x (M, K) |
|-------------------------------|------------|--------------------------|
| per-tensor                    | None       | () or (1, 1)             |
| per-row (weight out-channel,  | None       | (M, 1)                   |
|   activation token)           |            |                          |
| per-column (input channel)    | 1          | (K,) or (1, K)           |
| per-group along K             | g          | (M, ceil(K / g))         |

Formats. ``fmt`` is a name or a spec:
  - ``"int2"`` .. ``"int8"``: signed two's-complement codes in [-2^(b-1), 2^(b-1) - 1], stored as int8;
    ``"uint1"`` .. ``"uint8"``: codes in [0, 2^b - 1], stored as uint8 (use a zero point).
    code = clamp(round_half_even(x / scale) + zero_point, qmin, qmax); x_hat = (code - zero_point) * scale.
  - FP ExMy (``"e2m1"`` = fp4, ``"e2m3"``, ``"e3m2"``, ``"e4m3"`` = fp8 E4M3FN (max 448), ``"e5m2"`` (max 57344)):
    x / scale is rounded to the nearest value of the format's grid (ties to even mantissa), saturating at
    +-max; the code is the bit pattern sign | exponent | mantissa in a uint8 (the same bits as
    torch.float8_e4m3fn / float8_e5m2 for the 8-bit formats). Negative zero is stored as +0.
    x_hat = value(code) * scale.
  Objects with the attributes of polyquant.formats (``bits``/``signed``, or ``exp_bits``/``man_bits``/
  ``exponent_bias``/``max_value``) are accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._dispatch import HAS_TRITON, as_rows, cdiv, interpreting, next_pow2, require_triton, tl, triton, use_triton

__all__ = [
    "IntSpec",
    "FPSpec",
    "FP_FORMATS",
    "resolve_format",
    "fp_round_reference",
    "fp_encode_reference",
    "fp_decode_reference",
    "quantize_reference",
    "dequantize_reference",
    "quantize_dynamic_reference",
    "quantize",
    "dequantize",
    "quantize_dynamic",
]


# ----------------------------------------------------------------------------------------------------------------
# formats


@dataclass(frozen=True)
class IntSpec:
    """Uniform integer codes: ``bits`` in 1..8, signed (two's complement, int8 storage) or unsigned (uint8)."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"IntSpec: bits must be an integer in 1..8, got {self.bits!r}")
        if self.signed and self.bits < 2:
            raise ValueError("IntSpec: signed codes need at least 2 bits")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """The largest symmetric magnitude, used for absmax scales: scale = absmax / max_value."""
        return float(self.qmax)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


@dataclass(frozen=True)
class FPSpec:
    """Saturating minifloat: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits, ``bias``.

    ``max_value`` is the largest finite magnitude (it fixes which top patterns are inf/NaN: none for the
    OCP MX FP4/FP6 formats, S.1111.111 for E4M3FN, the whole top exponent for E5M2). Subnormals are kept.
    """

    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    def __post_init__(self) -> None:
        if not 1 <= self.exp_bits <= 5 or not 0 <= self.man_bits <= 5 or 1 + self.exp_bits + self.man_bits > 8:
            raise ValueError(f"FPSpec: need 1..5 exponent bits, 0..5 mantissa bits, at most 8 bits in all: {self}")
        if not self.max_value > 0:
            raise ValueError(f"FPSpec: max_value must be positive, got {self.max_value}")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal binade, 1 - bias (subnormals share its step)."""
        return 1 - self.bias

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8


# name -> spec; max values: (2 - 2^-M) * 2^(2^E - 1 - bias) for the formats with no specials.
FP_FORMATS: dict[str, FPSpec] = {
    "e2m1": FPSpec(2, 1, 1, 6.0),
    "e2m3": FPSpec(2, 3, 1, 7.5),
    "e3m2": FPSpec(3, 2, 3, 28.0),
    "e4m3": FPSpec(4, 3, 7, 448.0),
    "e5m2": FPSpec(5, 2, 15, 57344.0),
}
_ALIASES = {"fp4": "e2m1", "fp8": "e4m3", "e4m3fn": "e4m3", "fp6_e2m3": "e2m3", "fp6_e3m2": "e3m2"}

Format = IntSpec | FPSpec


def resolve_format(fmt: str | Any) -> Format:
    """A format from a name (``"int4"``, ``"uint8"``, ``"e2m1"``/``"fp4"``, ``"e4m3"``/``"fp8"``, ``"e5m2"``), a spec,
    or a duck-typed format object."""
    if isinstance(fmt, (IntSpec, FPSpec)):
        return fmt
    if isinstance(fmt, str):
        key = fmt.strip().lower()
        key = _ALIASES.get(key, key)
        if key in FP_FORMATS:
            return FP_FORMATS[key]
        for prefix, signed in (("uint", False), ("int", True)):
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                return IntSpec(int(key[len(prefix):]), signed)
        raise ValueError(f"unknown format {fmt!r}: expected intN, uintN or one of {sorted(FP_FORMATS)}")
    if hasattr(fmt, "exp_bits") and hasattr(fmt, "man_bits"):
        bias = getattr(fmt, "exponent_bias", getattr(fmt, "bias", None))
        return FPSpec(int(fmt.exp_bits), int(fmt.man_bits), int(bias), float(fmt.max_value))
    if hasattr(fmt, "bits") and hasattr(fmt, "signed"):
        return IntSpec(int(fmt.bits), bool(fmt.signed))
    raise TypeError(f"format must be a name or a format spec, got {type(fmt).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# torch references (the specification, and the CPU path)


_rows = as_rows


def _groups(k: int, group_size: int | None) -> tuple[int, int]:
    """(group size, number of groups G) along a row of K elements."""
    gs = k if group_size is None else group_size
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    return gs, (cdiv(k, gs) if gs > 0 else 0)


def _group_params(p: Tensor | float, shape: torch.Size, group_size: int | None, device: torch.device) -> Tensor:
    """Broadcast a scale / zero point to one fp32 value per (row, group): (M, G), contiguous."""
    _, g = _groups(shape[-1], group_size)
    p = torch.as_tensor(p, dtype=torch.float32, device=device)
    target = (*shape[:-1], g)
    try:
        return as_rows(torch.broadcast_to(p.reshape(1) if p.dim() == 0 else p, target)).contiguous()
    except RuntimeError as err:
        raise ValueError(
            f"scale / zero point of shape {tuple(p.shape)} does not broadcast to {target} "
            f"(x {tuple(shape)}, group_size={group_size})"
        ) from err


def _per_element(p: Tensor, k: int, gs: int) -> Tensor:
    """(M, G) group parameters -> (M, K) per element."""
    return p.repeat_interleave(gs, dim=1)[:, :k]


def fp_round_reference(v: Tensor, fmt: FPSpec) -> Tensor:
    """Round fp32 values onto the format's grid: nearest, ties to even mantissa, saturating at +-max."""
    a = v.abs().clamp(max=fmt.max_value)  # (M, K)
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): the binade exponent is e - 1
    e = (e - 1).clamp(min=fmt.min_exp)  # subnormals share the smallest normal binade's step
    step = torch.ldexp(torch.ones_like(a), e - fmt.man_bits)
    q = torch.round(a / step) * step  # exact: step is a power of two
    return torch.where(v < 0, -q, q)


def fp_encode_reference(q: Tensor, fmt: FPSpec) -> Tensor:
    """Grid values -> bit patterns sign | exponent | mantissa (uint8). Zero of either sign -> code 0."""
    a = q.abs().float()
    _, e = torch.frexp(a)
    e = e - 1
    man_scale = 2.0**fmt.man_bits
    subnormal = a * 2.0 ** (fmt.bias - 1 + fmt.man_bits)  # m for a = m * 2^(1 - bias - M)
    normal = (e + fmt.bias) * man_scale + (torch.ldexp(a, -e) - 1) * man_scale  # exponent field, mantissa
    mag = torch.where(a >= 2.0**fmt.min_exp, normal, subnormal).to(torch.int32)
    sign = (q < 0).to(torch.int32) << (fmt.exp_bits + fmt.man_bits)
    return (mag | sign).to(torch.uint8)


def fp_decode_reference(codes: Tensor, fmt: FPSpec) -> Tensor:
    """Bit patterns -> fp32 values (patterns above max_value decode as if finite; they are never produced)."""
    c = codes.to(torch.int32)
    s = (c >> (fmt.exp_bits + fmt.man_bits)) & 1
    e = (c >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    m = (c & (2**fmt.man_bits - 1)).float()
    one = torch.ones_like(m)
    sub = m * 2.0 ** (1 - fmt.bias - fmt.man_bits)
    normal = torch.ldexp(one + m / 2.0**fmt.man_bits, e - fmt.bias)
    v = torch.where(e == 0, sub, normal)
    return torch.where(s == 1, -v, v)


def quantize_reference(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    group_size: int | None = None,
) -> Tensor:
    """Codes of ``x`` (..., K) with static scales (see the module docstring); same shape as ``x``."""
    spec = resolve_format(fmt)
    if zero_point is not None and isinstance(spec, FPSpec):
        raise ValueError("floating-point formats take no zero point")
    k = x.shape[-1] if x.dim() else 0
    gs, _ = _groups(k, group_size)
    xm = _rows(x).float()  # (M, K)
    s = _per_element(_group_params(scale, x.shape, group_size, x.device), k, gs)  # (M, K)
    v = xm / s
    if isinstance(spec, FPSpec):
        codes = fp_encode_reference(fp_round_reference(v, spec), spec)
    else:
        q = torch.round(v)
        if zero_point is not None:
            q = q + _per_element(_group_params(zero_point, x.shape, group_size, x.device), k, gs)
        codes = q.clamp(spec.qmin, spec.qmax).to(spec.code_dtype)
    return codes.reshape(x.shape)


def dequantize_reference(
    codes: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Values of ``codes`` (..., K): (code - zero_point) * scale, or value(code) * scale for FP formats."""
    spec = resolve_format(fmt)
    k = codes.shape[-1] if codes.dim() else 0
    gs, _ = _groups(k, group_size)
    c = _rows(codes)  # (M, K)
    s = _per_element(_group_params(scale, codes.shape, group_size, codes.device), k, gs)
    if isinstance(spec, FPSpec):
        v = fp_decode_reference(c, spec)
    else:
        v = c.float()
        if zero_point is not None:
            v = v - _per_element(_group_params(zero_point, codes.shape, group_size, codes.device), k, gs)
    return (v * s).to(dtype).reshape(codes.shape)


def quantize_dynamic_reference(
    x: Tensor, *, fmt: str | Format = "int8", group_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic quantization: scale = absmax / max_value per row (per token) or per group.

    Returns:
        codes (same shape as x) and fp32 scales (..., G), G = 1 per token or ceil(K / group_size).
        A row or group of zeros gets scale 1.
    """
    spec = resolve_format(fmt)
    if isinstance(spec, IntSpec) and not spec.signed:
        raise ValueError("dynamic quantization is symmetric: use a signed integer or a floating-point format")
    k = x.shape[-1] if x.dim() else 0
    gs, g = _groups(k, group_size)
    xm = _rows(x).float()  # (M, K)
    m = xm.shape[0]
    pad = g * gs - k
    amax = torch.nn.functional.pad(xm.abs(), (0, pad)).reshape(m, g, gs).amax(dim=2) if g else xm.new_zeros(m, 0)
    # tensor / tensor: torch divides by a Python scalar on CUDA through its reciprocal, which is not exact
    scale = torch.where(amax > 0, amax / torch.full_like(amax, spec.max_value), torch.ones_like(amax))  # (M, G)
    codes = quantize_reference(x, scale.reshape(*x.shape[:-1], g), fmt=spec, group_size=group_size)
    return codes, scale.reshape(*x.shape[:-1], g)


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
        """``fp_round_reference``: saturate, then round to the binade's step (ties to even)."""
        a = tl.minimum(tl.abs(v), MAXV)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a); fp32 subnormals give -127
        e = tl.maximum(e, MIN_EXP)
        q = _rne(a * _pow2(MAN - e)) * _pow2(e - MAN)  # both scalings are exact powers of two
        return tl.where(v < 0, -q, q)

    @triton.jit
    def _fp_encode(q, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
        """``fp_encode_reference``: grid value -> int32 bit pattern."""
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
        """``fp_decode_reference``: int32 bit pattern -> fp32 value."""
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
        """x / scale -> int32 codes (integer value, or FP bit pattern)."""
        if IS_FP:
            code = _fp_encode(_fp_round(v, MAN, 1 - BIAS, MAXV), EXP, MAN, BIAS)
        else:
            q = _rne(tl.minimum(tl.maximum(v, -4194304.0), 4194304.0))
            if HAS_ZP:
                q = q + z
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


def _format_constants(spec: Format) -> dict[str, Any]:
    if isinstance(spec, FPSpec):
        return dict(IS_FP=True, QMIN=0, QMAX=0, EXP=spec.exp_bits, MAN=spec.man_bits, BIAS=spec.bias,
                    MAXV=float(spec.max_value))
    return dict(IS_FP=False, QMIN=spec.qmin, QMAX=spec.qmax, EXP=0, MAN=0, BIAS=0, MAXV=float(spec.max_value))


def _tile(m: int, k: int, elems: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of about ``elems`` elements for an (m, k) elementwise op."""
    block_k = min(next_pow2(k), elems)
    block_m = min(next_pow2(m), max(1, elems // block_k))
    return block_m, block_k


def _elems() -> int:
    return 16384 if interpreting() else 4096


def _rows_contig(x: Tensor) -> Tensor:
    xm = _rows(x)
    return xm if xm.stride(-1) == 1 else xm.contiguous()


def quantize_triton(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | float | None = None, *, fmt: str | Format = "int8",
    group_size: int | None = None,
) -> Tensor:
    """Triton launcher of ``quantize_reference`` (same arguments and result)."""
    require_triton()
    spec = resolve_format(fmt)
    if zero_point is not None and isinstance(spec, FPSpec):
        raise ValueError("floating-point formats take no zero point")
    out = torch.empty(x.shape, dtype=spec.code_dtype, device=x.device)
    if x.numel() == 0:
        return out
    k = x.shape[-1]
    gs, g = _groups(k, group_size)
    xm = _rows_contig(x)
    m = xm.shape[0]
    s = _group_params(scale, x.shape, group_size, x.device)
    z = s if zero_point is None else _group_params(zero_point, x.shape, group_size, x.device)
    bm, bk = _tile(m, k, _elems())
    _quantize_kernel[(cdiv(m, bm), cdiv(k, bk))](
        xm, s, z, out, m, k, g, xm.stride(0), GROUP=gs, BLOCK_M=bm, BLOCK_K=bk,
        HAS_ZP=zero_point is not None, **_format_constants(spec),
    )
    return out


def dequantize_triton(
    codes: Tensor, scale: Tensor | float, zero_point: Tensor | float | None = None, *,
    fmt: str | Format = "int8", group_size: int | None = None, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triton launcher of ``dequantize_reference``."""
    require_triton()
    spec = resolve_format(fmt)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if codes.numel() == 0:
        return out
    k = codes.shape[-1]
    gs, g = _groups(k, group_size)
    cm = _rows_contig(codes)
    m = cm.shape[0]
    s = _group_params(scale, codes.shape, group_size, codes.device)
    z = s if zero_point is None else _group_params(zero_point, codes.shape, group_size, codes.device)
    c = _format_constants(spec)
    bm, bk = _tile(m, k, _elems())
    _dequantize_kernel[(cdiv(m, bm), cdiv(k, bk))](
        cm, s, z, out, m, k, g, cm.stride(0), GROUP=gs, BLOCK_M=bm, BLOCK_K=bk,
        HAS_ZP=zero_point is not None and not c["IS_FP"], IS_FP=c["IS_FP"], EXP=c["EXP"], MAN=c["MAN"],
        BIAS=c["BIAS"],
    )
    return out


def quantize_dynamic_triton(
    x: Tensor, *, fmt: str | Format = "int8", group_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``quantize_dynamic_reference``: one kernel, the max reduction fused."""
    require_triton()
    spec = resolve_format(fmt)
    if isinstance(spec, IntSpec) and not spec.signed:
        raise ValueError("dynamic quantization is symmetric: use a signed integer or a floating-point format")
    k = x.shape[-1] if x.dim() else 0
    gs, g = _groups(k, group_size)
    codes = torch.empty(x.shape, dtype=spec.code_dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], g), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes, scale
    xm = _rows_contig(x)
    m = xm.shape[0]
    consts = _format_constants(spec)
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
            raise ValueError(f"group_size {gs} too large for the Triton kernel (at most 8192)")
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
    group_size: int | None = None,
) -> Tensor:
    """Quantize ``x`` (..., K) to codes with static scales (module docstring); Triton on CUDA.

    Args:
        x: float tensor (..., K).
        scale: one scale per (row, group), broadcastable to (..., ceil(K / group_size)).
        zero_point: integer formats only; same shape rules as ``scale``.
        fmt: ``"int8"``, ``"int4"``, ``"uint8"``, ``"e2m1"``, ``"e4m3"``, ``"e5m2"``, ... or a spec.
        group_size: elements per group along K; None: one group per row.

    Returns:
        Codes, same shape as ``x``: int8 for signed integer formats, uint8 otherwise.
    """
    if use_triton(x):
        return quantize_triton(x, scale, zero_point, fmt=fmt, group_size=group_size)
    return quantize_reference(x, scale, zero_point, fmt=fmt, group_size=group_size)


def dequantize(
    codes: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None = None,
    *,
    fmt: str | Format = "int8",
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of ``quantize``: values of ``codes`` (..., K) times their scales, as ``dtype``."""
    if use_triton(codes):
        return dequantize_triton(codes, scale, zero_point, fmt=fmt, group_size=group_size, dtype=dtype)
    return dequantize_reference(codes, scale, zero_point, fmt=fmt, group_size=group_size, dtype=dtype)


def quantize_dynamic(
    x: Tensor, *, fmt: str | Format = "int8", group_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic quantization with absmax scales per token (``group_size=None``) or per group.

    Used for W8A8 activations (per-token int8, then ``gemm.int8_gemm``) and for packing weights per group.

    Returns:
        (codes like ``x``, fp32 scales (..., G)); scale = absmax / max_value, 1 for an all-zero row or group.
    """
    if use_triton(x):
        return quantize_dynamic_triton(x, fmt=fmt, group_size=group_size)
    return quantize_dynamic_reference(x, fmt=fmt, group_size=group_size)
