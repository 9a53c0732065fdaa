"""Fast Walsh-Hadamard transform over the last dimension, for n = 2^k, 12 * 2^k and 40 * 2^k (20 * 2^k).

What it is for: online Hadamard rotations (QuaRot / Quamba style) that spread outliers before quantization; the
non-power-of-two sizes cover Mamba widths (e.g. d_inner 1536 = 12 * 128, 5120 = 40 * 128).

Definition (orthonormal):  y = H_n x / sqrt(n)  for each vector x = x[..., :], i.e. ``y = x @ H_n.T / sqrt(n)``,
with H_n = H_m kron H_{2^k} (index i = a * 2^k + b), H_{2^k} the Sylvester matrix (H[i, j] = (-1)^popcount(i & j)),
and H_12, H_20 the Paley I matrices of GF(11), GF(19); 40 * 2^k is handled as 20 * 2^(k + 1) (so 20 * 2^k sizes
work too; Paley II needs q = 1 mod 4 and 19 is not). ``hadamard_matrix(n)`` returns H_n;
H_n H_n^T = n I, and the inverse transform is ``x = y @ H_n / sqrt(n)`` (H_n is symmetric for n = 2^k).

``fwht_quantize`` fuses int8 quantization of the output: dynamic per-token absmax scales, or a static scale.

Triton: each tile holds R rows as (R * A, B) with n = A * B (B a power of two <= 256); y = H_A-blocks @ (X @ H_B^T)
as two tensor-core products (fp16/bf16 operands, fp32 accumulation; fp32 inputs use exact fp32 products).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._dispatch import HAS_TRITON, cdiv, compute_dtype, next_pow2, require_triton, tl, tl_dtype, triton, use_triton
from .quant import quantize_dynamic_reference, quantize_reference

__all__ = [
    "hadamard_matrix",
    "fwht_reference",
    "fwht_quantize_reference",
    "fwht",
    "fwht_quantize",
]


# ----------------------------------------------------------------------------------------------------------------
# Hadamard matrices


def _legendre(a: int, q: int) -> int:
    """Quadratic character of a modulo the prime q: 0, 1 or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = chi(j - i) over GF(q)."""
    return torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _paley1(q: int) -> Tensor:
    """Paley construction I, q = 3 mod 4 prime: H = I + S with S = [[0, 1^T], [-1, Q]] skew; size q + 1."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


_BASE = {1: lambda: torch.ones(1, 1, dtype=torch.float64), 12: lambda: _paley1(11), 20: lambda: _paley1(19)}


def _split(n: int) -> tuple[int, int]:
    """n = m * 2^k with m in {1, 12, 20}: (m, 2^k). (40 * 2^k = 20 * 2^(k + 1).)"""
    if n >= 1:
        for m in (20, 12, 1):
            p = n // m
            if n % m == 0 and p & (p - 1) == 0:
                return m, p
    raise ValueError(f"Hadamard size must be 2^k, 12 * 2^k or 20 * 2^k (e.g. 40 * 2^k), got {n}")


def _sylvester(p: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


@functools.lru_cache(maxsize=32)
def _hadamard64(n: int) -> Tensor:
    m, p = _split(n)
    return torch.kron(_BASE[m](), _sylvester(p))


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The unnormalized +-1 Hadamard matrix H_n (n, n) used by ``fwht`` (module docstring)."""
    return _hadamard64(n).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# torch references


def fwht_reference(x: Tensor, *, scale: float | None = None) -> Tensor:
    """y = x @ H_n.T * scale over the last dim (scale defaults to 1 / sqrt(n)); fp32 (fp64) math, result in x.dtype."""
    return _fwht_fp32(x, scale).to(x.dtype)


def _fwht_fp32(x: Tensor, scale: float | None) -> Tensor:
    n = x.shape[-1]
    m, p = _split(n)
    y = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(-1, m, p)  # (M, m, p)
    h = 1
    while h < p:  # butterflies over the power-of-two axis: (a, b) -> (a + b, a - b) at distance h
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("ij,bjp->bip", _BASE[m]().to(y), y)  # H_m over the other axis
    s = 1.0 / math.sqrt(n) if scale is None else scale
    return (y * s).reshape(x.shape)


def fwht_quantize_reference(
    x: Tensor, *, scale: float | None = None, out_scale: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """int8 codes of ``fwht(x)`` (computed in fp32) and fp32 scales (..., 1).

    ``out_scale=None``: dynamic per-token scales absmax / 127; else the static scale, returned expanded.
    """
    y = _fwht_fp32(x, scale)
    if out_scale is None:
        return quantize_dynamic_reference(y, fmt="int8")
    s = torch.as_tensor(out_scale, dtype=torch.float32, device=x.device).expand(*x.shape[:-1], 1).contiguous()
    return quantize_reference(y, s, fmt="int8"), s


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel

if HAS_TRITON:

    @triton.jit
    def _fwht_kernel(
        x_ptr, hb_ptr, ha_ptr, y_ptr, s_ptr, M, stride_xm, stride_ym, num_tiles, out_scale,
        A: tl.constexpr, B: tl.constexpr, A_PAD: tl.constexpr, B_PAD: tl.constexpr, R: tl.constexpr,
        HAS_A: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, C1: tl.constexpr,
        C2: tl.constexpr, QUANT: tl.constexpr,
    ):
        """Persistent loop over tiles of R rows; QUANT: 0 none, 1 dynamic per-token int8, 2 static int8."""
        RA: tl.constexpr = R * A_PAD
        offs = tl.arange(0, RA)
        r = offs // A_PAD
        a = offs % A_PAD
        offs_b = tl.arange(0, B_PAD)
        hb = tl.load(hb_ptr + offs_b[:, None] * B_PAD + offs_b[None, :])  # H_B^T, padded with zeros
        if HAS_A:
            ha = tl.load(ha_ptr + offs[:, None] * RA + offs[None, :])  # kron(I_R, H_A), padded with zeros
        col = a[:, None] * B + offs_b[None, :]
        col_mask = (a[:, None] < A) & (offs_b[None, :] < B)
        for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            row = t * R + r
            mask = (row < M)[:, None] & col_mask
            row64 = row.to(tl.int64)[:, None]
            x = tl.load(x_ptr + row64 * stride_xm + col, mask=mask, other=0.0).to(DOT_DTYPE)  # (RA, B_PAD)
            y = tl.dot(x, hb, input_precision=PRECISION)  # H_B along the last axis, fp32
            if HAS_A:
                y = tl.dot(ha, (y * C1).to(DOT_DTYPE), input_precision=PRECISION)  # H_A across the A rows
            y = y * C2  # C1 * C2 = the output scale (C1 a power of two keeping the fp16 operand in range)
            if QUANT == 0:
                tl.store(y_ptr + row64 * stride_ym + col, y.to(y_ptr.dtype.element_ty), mask=mask)
            else:
                # one row per tile when HAS_A (R == 1), else one row per tile row: no reshapes needed
                if QUANT == 1:
                    if HAS_A:
                        amax = tl.zeros([RA], dtype=tl.float32) + tl.max(tl.abs(y))
                    else:
                        amax = tl.max(tl.abs(y), axis=1)
                    s = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)  # (RA,)
                else:
                    s = tl.zeros([RA], dtype=tl.float32) + out_scale
                tl.store(s_ptr + row, s, mask=(row < M) & (a == 0))
                v = tl.math.div_rn(y, s[:, None])
                q = (tl.minimum(tl.maximum(v, -4194304.0), 4194304.0) + 12582912.0) - 12582912.0  # round half even
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                tl.store(y_ptr + row64 * stride_ym + col, q.to(tl.int8), mask=mask)


@functools.lru_cache(maxsize=64)
def _plan(n: int) -> tuple[int, int]:
    """n = A * B with B the power-of-two factor capped at 256 (B >= 16 when possible) and A the rest."""
    m, p = _split(n)
    b = min(p, 256 if n > 16384 else 128)
    a = n // b
    if next_pow2(a) > 128:
        raise ValueError(f"fwht: size {n} is too large for the Triton kernel")
    return a, b


@functools.lru_cache(maxsize=64)
def _matrices(n: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    a, b = _plan(n)
    a_pad, b_pad = max(16, next_pow2(a)), max(16, next_pow2(b))
    hb = torch.zeros(b_pad, b_pad, dtype=torch.float64)
    hb[:b, :b] = _sylvester(b).T
    ha = torch.zeros(a_pad, a_pad, dtype=torch.float64)
    ha[:a, :a] = _hadamard64(n)[::b, ::b] if a > 1 else 1.0  # H_n = H_A kron H_B: H_A = H_n[::B, ::B]
    ha = torch.kron(torch.eye(r, dtype=torch.float64), ha)
    return hb.to(dtype=dtype, device=device), ha.to(dtype=dtype, device=device)


def _num_programs(tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count * 4)
    return tiles


def _launch(x: Tensor, scale: float | None, quant: int, out_scale: float) -> tuple[Tensor, Tensor]:
    require_triton()
    n = x.shape[-1]
    a, b = _plan(n)
    a_pad, b_pad = max(16, next_pow2(a)), max(16, next_pow2(b))
    has_a = a > 1
    if has_a:  # the fused quantization reduces over one whole tile: one row per tile
        r = 1 if quant else max(1, min(128 // a_pad, 8192 // (a_pad * b_pad)))
    else:  # rows stack directly along the tile's first axis
        a_pad, r = 1, max(16, min(128, 8192 // b_pad))
    xm = x.reshape(-1, n)
    if xm.stride(-1) != 1:
        xm = xm.contiguous()
    m = xm.shape[0]
    y = torch.empty((m, n), dtype=torch.int8 if quant else x.dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return y.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
    # tiny power-of-two factors (B < 16, a padded tensor-core tile) take exact fp32 products: not a speed path
    dot_dtype = compute_dtype(x.dtype) if b >= 16 else torch.float32
    hb, ha = _matrices(n, r if has_a else 1, dot_dtype, x.device)
    total = 1.0 / math.sqrt(n) if scale is None else scale
    c1 = 2.0 ** -(int(math.log2(b)) // 2)
    tiles = cdiv(m, r)
    _fwht_kernel[(_num_programs(tiles, x.device),)](
        xm, hb, ha, y, s, m, xm.stride(0), y.stride(0), tiles, float(out_scale),
        A=a if has_a else 1, B=b, A_PAD=a_pad, B_PAD=b_pad, R=r, HAS_A=has_a, DOT_DTYPE=tl_dtype(dot_dtype),
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", C1=c1 if has_a else 1.0,
        C2=total / c1 if has_a else total, QUANT=quant, num_warps=8 if r * a_pad * b_pad >= 8192 else 4,
    )
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def fwht_triton(x: Tensor, *, scale: float | None = None) -> Tensor:
    """Triton launcher of ``fwht_reference``."""
    _split(x.shape[-1])
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fwht: x must be fp16, bf16 or fp32, got {x.dtype}")
    return _launch(x, scale, 0, 0.0)[0]


def fwht_quantize_triton(
    x: Tensor, *, scale: float | None = None, out_scale: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``fwht_quantize_reference``."""
    _split(x.shape[-1])
    if out_scale is None:
        return _launch(x, scale, 1, 0.0)
    return _launch(x, scale, 2, float(out_scale))


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def fwht(x: Tensor, *, scale: float | None = None) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (n = 2^k, 12 * 2^k or 40 * 2^k).

    Args:
        x: (..., n), fp16 / bf16 / fp32.
        scale: output multiplier; None: 1 / sqrt(n) (orthonormal).

    Returns:
        ``x @ hadamard_matrix(n).T * scale`` in x.dtype.
    """
    if use_triton(x):
        return fwht_triton(x, scale=scale)
    return fwht_reference(x, scale=scale)


def fwht_quantize(
    x: Tensor, *, scale: float | None = None, out_scale: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """``fwht`` fused with int8 quantization of its output.

    Args:
        x: (..., n). scale: as in ``fwht``.
        out_scale: None for dynamic per-token scales (absmax / 127); a float for a static per-tensor scale.

    Returns:
        int8 codes (..., n) and fp32 scales (..., 1): fwht(x) ~= codes * scales.
    """
    if use_triton(x):
        return fwht_quantize_triton(x, scale=scale, out_scale=out_scale)
    return fwht_quantize_reference(x, scale=scale, out_scale=out_scale)
