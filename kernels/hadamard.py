"""Fast Walsh-Hadamard transform over the last dimension, for the core's sizes (n = 2^k, 12 * 2^k, 40 * 2^k, ...).

What it is for: online Hadamard rotations (QuaRot / Quamba style) that spread outliers before quantization; the
non-power-of-two sizes cover Mamba widths (e.g. d_inner 1536 = 12 * 128, 5120 = 40 * 128).

Definition: the core's (``polyquant.transforms``). ``fwht(x) = x @ hadamard_matrix(n)`` for each vector
x = x[..., :], with ``hadamard_matrix`` the core's orthonormal matrix H_n = kron(Sylvester(2^k), B) / sqrt(n),
B a Paley base of order b (12, 20, 28, ...; 40 * 2^k = 20 * 2^(k + 1)), i.e. ``polyquant.transforms
.hadamard_transform``. With ``scale`` the output is ``x @ hadamard_matrix(n, normalize=False) * scale`` (entries
+-1); the default scale 1 / sqrt(n) is the orthonormal transform, whose inverse is ``y @ H_n.T``.

``fwht_quantize`` fuses int8 quantization of the output: dynamic per-token absmax scales, or a static scale.

Triton: n = F * L with F a power of two and H_n = kron(Sylvester(F), H_L) (the core's H_L, +-1, which holds the
base on the contiguous axis). Each tile holds R rows as (R * F, L) (row-major, so loads are contiguous) and
computes y = (I_R kron H_F) @ (X @ H_L) as two tensor-core products (fp16/bf16 operands, fp32 accumulation; fp32
inputs use exact fp32 products).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from polyquant.transforms import hadamard_matrix, hadamard_transform, is_hadamard_size

from ._dispatch import HAS_TRITON, cdiv, compute_dtype, next_pow2, require_triton, tl, tl_dtype, triton, use_triton
from .quant import quantize_dynamic_reference, quantize_reference

__all__ = [
    "fwht_reference",
    "fwht_quantize_reference",
    "fwht",
    "fwht_quantize",
]


# ----------------------------------------------------------------------------------------------------------------
# torch references


def fwht_reference(x: Tensor, *, scale: float | None = None) -> Tensor:
    """The core's ``hadamard_transform`` (x @ H_n), times ``scale * sqrt(n)`` when a scale is given; fp32 (fp64)
    math, result in x.dtype."""
    return _fwht_fp32(x, scale).to(x.dtype)


def _fwht_fp32(x: Tensor, scale: float | None) -> Tensor:
    y = hadamard_transform(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return y if scale is None else y * (scale * math.sqrt(x.shape[-1]))


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
    per_token = (*(1 for _ in x.shape[:-1]), x.shape[-1])
    return quantize_reference(y, s, fmt="int8", block_size=per_token), s


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel

if HAS_TRITON:

    @triton.jit
    def _fwht_kernel(
        x_ptr, hl_ptr, hf_ptr, y_ptr, s_ptr, M, stride_xm, stride_ym, num_tiles, out_scale,
        F: tl.constexpr, L: tl.constexpr, F_PAD: tl.constexpr, L_PAD: tl.constexpr, R: tl.constexpr,
        HAS_F: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, C1: tl.constexpr,
        C2: tl.constexpr, QUANT: tl.constexpr,
    ):
        """Persistent loop over tiles of R rows; QUANT: 0 none, 1 dynamic per-token int8, 2 static int8."""
        RF: tl.constexpr = R * F_PAD
        offs = tl.arange(0, RF)
        r = offs // F_PAD
        f = offs % F_PAD
        offs_l = tl.arange(0, L_PAD)
        hl = tl.load(hl_ptr + offs_l[:, None] * L_PAD + offs_l[None, :])  # H_L, padded with zeros
        if HAS_F:
            hf = tl.load(hf_ptr + offs[:, None] * RF + offs[None, :])  # kron(I_R, H_F), padded with zeros
        col = f[:, None] * L + offs_l[None, :]  # the row viewed as (F, L), row-major
        col_mask = (f[:, None] < F) & (offs_l[None, :] < L)
        for t in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            row = t * R + r
            mask = (row < M)[:, None] & col_mask
            row64 = row.to(tl.int64)[:, None]
            x = tl.load(x_ptr + row64 * stride_xm + col, mask=mask, other=0.0).to(DOT_DTYPE)  # (RF, L_PAD)
            y = tl.dot(x, hl, input_precision=PRECISION)  # H_L along the contiguous axis, fp32
            if HAS_F:
                y = tl.dot(hf, (y * C1).to(DOT_DTYPE), input_precision=PRECISION)  # H_F across the F rows
            y = y * C2  # C1 * C2 = the output scale (C1 a power of two keeping the fp16 operand in range)
            if QUANT == 0:
                tl.store(y_ptr + row64 * stride_ym + col, y.to(y_ptr.dtype.element_ty), mask=mask)
            else:
                # one row per tile when HAS_F (R == 1), else one row per tile row: no reshapes needed
                if QUANT == 1:
                    if HAS_F:
                        amax = tl.zeros([RF], dtype=tl.float32) + tl.max(tl.abs(y))
                    else:
                        amax = tl.max(tl.abs(y), axis=1)
                    s = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)  # (RF,)
                else:
                    s = tl.zeros([RF], dtype=tl.float32) + out_scale
                tl.store(s_ptr + row, s, mask=(row < M) & (f == 0))
                v = tl.math.div_rn(y, s[:, None])
                q = (tl.minimum(tl.maximum(v, -4194304.0), 4194304.0) + 12582912.0) - 12582912.0  # round half even
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                tl.store(y_ptr + row64 * stride_ym + col, q.to(tl.int8), mask=mask)


def _check_size(n: int) -> None:
    if not is_hadamard_size(n):
        raise ValueError(f"fwht: no Hadamard matrix of size {n} (see polyquant.transforms.is_hadamard_size)")


@functools.lru_cache(maxsize=64)
def _plan(n: int) -> tuple[int, int]:
    """(F, L) with n = F * L and H_n = kron(Sylvester(F), H_L): F the smallest power of two for which a row of
    L = n / F fits a tile of 128 columns (256 above n = 16384 or for a base of more than 128)."""
    _check_size(n)
    power = n & -n
    # the core's H_n = kron(Sylvester(p), B): p = n for powers of two, else p = power / 4 (B = 4 * odd part)
    p = n if power == n else power // 4
    max_cols = 256 if n > 16384 or n // p > 128 else 128
    f = 1
    while f < p and next_pow2(n // f) > max_cols:
        f *= 2
    if next_pow2(n // f) > 256 or f > 128:
        raise ValueError(f"fwht: size {n} is too large for the Triton kernel")
    return f, n // f


@functools.lru_cache(maxsize=64)
def _matrices(n: int, r: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """H_L (padded) for the columns and kron(I_R, Sylvester(F)) (padded) for the rows of a tile; entries +-1."""
    f, l = _plan(n)
    f_pad, l_pad = max(16, next_pow2(f)), max(16, next_pow2(l))
    hl = torch.zeros(l_pad, l_pad, dtype=torch.float64)
    hl[:l, :l] = hadamard_matrix(l, dtype=torch.float64, normalize=False)  # the core's H_L
    hf = torch.zeros(f_pad, f_pad, dtype=torch.float64)
    hf[:f, :f] = hadamard_matrix(f, dtype=torch.float64, normalize=False)  # Sylvester(F), symmetric
    hf = torch.kron(torch.eye(r, dtype=torch.float64), hf)
    return hl.to(dtype=dtype, device=device), hf.to(dtype=dtype, device=device)


def _num_programs(tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count * 4)
    return tiles


def _launch(x: Tensor, scale: float | None, quant: int, out_scale: float) -> tuple[Tensor, Tensor]:
    require_triton()
    n = x.shape[-1]
    f, l = _plan(n)
    f_pad, l_pad = max(16, next_pow2(f)), max(16, next_pow2(l))
    has_f = f > 1
    if has_f:  # the fused quantization reduces over one whole tile: one row per tile
        r = 1 if quant else max(1, min(128 // f_pad, 8192 // (f_pad * l_pad)))
    else:  # rows stack directly along the tile's first axis
        f_pad, r = 1, max(16, min(128, 8192 // l_pad))
    xm = x.reshape(-1, n)
    if xm.stride(-1) != 1:
        xm = xm.contiguous()
    m = xm.shape[0]
    y = torch.empty((m, n), dtype=torch.int8 if quant else x.dtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return y.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
    # tiny rows (L < 16, a padded tensor-core tile) take exact fp32 products: not a speed path
    dot_dtype = compute_dtype(x.dtype) if l >= 16 else torch.float32
    hl, hf = _matrices(n, r if has_f else 1, dot_dtype, x.device)
    total = 1.0 / math.sqrt(n) if scale is None else scale
    c1 = 2.0 ** -(int(math.log2(l)) // 2)
    tiles = cdiv(m, r)
    _fwht_kernel[(_num_programs(tiles, x.device),)](
        xm, hl, hf, y, s, m, xm.stride(0), y.stride(0), tiles, float(out_scale),
        F=f if has_f else 1, L=l, F_PAD=f_pad, L_PAD=l_pad, R=r, HAS_F=has_f, DOT_DTYPE=tl_dtype(dot_dtype),
        PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", C1=c1 if has_f else 1.0,
        C2=total / c1 if has_f else total, QUANT=quant, num_warps=8 if r * f_pad * l_pad >= 8192 else 4,
        num_stages=1 if dot_dtype == torch.float32 else 3,  # fp32 tiles of 128 x 128 overflow shared memory
    )
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def fwht_triton(x: Tensor, *, scale: float | None = None) -> Tensor:
    """Triton launcher of ``fwht_reference``."""
    _check_size(x.shape[-1])
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fwht: x must be fp16, bf16 or fp32, got {x.dtype}")
    return _launch(x, scale, 0, 0.0)[0]


def fwht_quantize_triton(
    x: Tensor, *, scale: float | None = None, out_scale: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``fwht_quantize_reference``."""
    _check_size(x.shape[-1])
    if out_scale is None:
        return _launch(x, scale, 1, 0.0)
    return _launch(x, scale, 2, float(out_scale))


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def fwht(x: Tensor, *, scale: float | None = None) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim: the core's ``x @ hadamard_matrix(n)``.

    Args:
        x: (..., n), fp16 / bf16 / fp32; n a size of ``polyquant.transforms.is_hadamard_size`` (2^k, 12 * 2^k,
            40 * 2^k, ...).
        scale: multiplier of the +-1 transform; None: 1 / sqrt(n) (orthonormal).

    Returns:
        ``x @ hadamard_matrix(n, normalize=False) * scale`` in x.dtype (``polyquant.transforms``).
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
