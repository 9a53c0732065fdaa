"""Vector quantization: nearest-codeword assignment and codebook decode (plain and residual VQ).

What it is for: VQ / RVQ plugins (Gaussian-splat attributes, audio codec codebooks, sub-vector weight VQ) assign
millions of vectors to a codebook. ``vq_assign`` fuses the squared distance with the argmin and walks the codebook
in chunks, so the N x K distance matrix is never materialized (torch's cdist + argmin writes all of it).

    d(n, k) = ||x_n - c_k||^2 = ||x_n||^2 - 2 x_n . c_k + ||c_k||^2        index(n) = argmin_k d(n, k)

Ties go to the smallest index. Distances are computed in fp32 with the expansion above (as cdist does for large
inputs), so two codewords within rounding of each other may be ranked differently by the two paths.
Decode: ``vq_decode(idx, C) = C[idx]``; ``rvq_decode(idx, Cs) = sum_q Cs[q][idx[..., q]]``.
Indices must lie in [0, K): the torch reference (the CPU path) raises a ``ValueError`` for others (one reduction
over the indices); the Triton decode checks nothing on the host (that would sync the device on every call) and
gives a row of NaN for such an index, never an out-of-bounds read or another codeword.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polyquant.formats import checking_values

from ._dispatch import (
    HAS_TRITON, as_rows, cdiv, compute_dtype, interpreting, next_pow2, require_triton, tl, tl_dtype, triton, use_triton,
)

__all__ = [
    "vq_assign_reference",
    "vq_decode_reference",
    "rvq_decode_reference",
    "vq_assign",
    "vq_decode",
    "rvq_decode",
    "rvq_assign",
]


# ----------------------------------------------------------------------------------------------------------------
# torch references


def _check_codebook(x: Tensor, codebook: Tensor) -> None:
    if codebook.dim() != 2 or x.dim() < 1 or x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"need x (..., D) and codebook (K, D), got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")


def vq_assign_reference(x: Tensor, codebook: Tensor, *, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest codeword of each row of ``x`` (..., D) in ``codebook`` (K, D).

    Returns:
        indices (...) int64 and squared distances (...) fp32. Rows are processed ``chunk_rows`` at a time
        (default: about 4M distances per chunk) so memory stays bounded.
    """
    from polyquant.vq import nearest_codes

    _check_codebook(x, codebook)
    k = codebook.shape[0]
    xm = as_rows(x).float()  # (N, D)
    step = chunk_rows or max(1, (1 << 22) // k)
    idx, dist = nearest_codes(xm[None], codebook.float()[None], step)  # (1, N) each: the core's definition
    return idx[0].reshape(x.shape[:-1]), dist[0].reshape(x.shape[:-1])


def _check_indices(indices: Tensor, k: int) -> None:
    """``ValueError`` unless ``indices`` are integers in [0, k) (-2 wrapped to K - 2 and K raised an IndexError)."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"VQ indices must be integers, got {indices.dtype}")
    if indices.numel() and checking_values():
        lo, hi = torch.aminmax(indices)
        if not bool((lo >= 0) & (hi < k)):
            raise ValueError(f"VQ indices must lie in [0, {k}) (the codebook size), got values in [{int(lo)}, {int(hi)}]")


def vq_decode_reference(indices: Tensor, codebook: Tensor) -> Tensor:
    """codebook[indices]: (...) -> (..., D); indices outside [0, K) are a ``ValueError``."""
    if codebook.dim() != 2:
        raise ValueError(f"need a codebook (K, D), got {tuple(codebook.shape)}")
    _check_indices(indices, codebook.shape[0])
    return codebook[indices.long()]


def rvq_decode_reference(indices: Tensor, codebooks: Tensor) -> Tensor:
    """Residual VQ decode: sum_q codebooks[q][indices[..., q]], fp32 sum; (..., Q), (Q, K, D) -> (..., D).
    Indices outside [0, K) are a ``ValueError``."""
    if codebooks.dim() != 3 or indices.dim() == 0 or indices.shape[-1] != codebooks.shape[0]:
        raise ValueError(f"need indices (..., Q) and codebooks (Q, K, D), got {tuple(indices.shape)} and "
                         f"{tuple(codebooks.shape)}")
    _check_indices(indices, codebooks.shape[1])
    out = torch.zeros(*indices.shape[:-1], codebooks.shape[2], dtype=torch.float32, device=codebooks.device)
    for q in range(codebooks.shape[0]):
        out += codebooks[q].float()[indices[..., q].long()]
    return out.to(codebooks.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _vq_assign_kernel(
        x_ptr, c_ptr, c2_ptr, idx_ptr, dist_ptr, N, K, stride_xn, stride_ck,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """BLOCK_N rows against the codebook in chunks of BLOCK_K.

        Per chunk: dist = ||c||^2 + (-2 x) . c as one tensor-core product accumulating onto ||c||^2, then an
        elementwise running (min, index) per tile column; one reduction across the columns at the end.
        """
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_d = tl.arange(0, D_PAD)
        x_rows = x_ptr + offs_n.to(tl.int64) * stride_xn
        xt = tl.load(x_rows[:, None] + offs_d[None, :], mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        xt = xt.to(tl.float32)  # (BLOCK_N, D_PAD)
        x2 = tl.sum(xt * xt, axis=1)
        xm2 = (xt * -2.0).to(DOT_DTYPE)  # exact scaling
        best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            c2 = tl.load(c2_ptr + offs_k, mask=k_mask, other=float("inf"))  # padding codewords never win
            ct = tl.load(c_ptr + offs_k[None, :] * stride_ck + offs_d[:, None],
                         mask=k_mask[None, :] & (offs_d[:, None] < D), other=0.0)  # (D_PAD, BLOCK_K)
            acc = tl.broadcast_to(c2[None, :], (BLOCK_N, BLOCK_K))
            dist = tl.dot(xm2, ct.to(DOT_DTYPE), acc, input_precision=PRECISION)  # ||c||^2 - 2 x.c
            better = dist < best  # strict: an earlier chunk keeps its ties
            best = tl.where(better, dist, best)
            best_i = tl.where(better, offs_k[None, :], best_i)
        m = tl.min(best, axis=1)  # (BLOCK_N,)
        i = tl.min(tl.where(best == m[:, None], best_i, 2147483647), axis=1)  # the smallest index among ties
        tl.store(idx_ptr + offs_n, i.to(tl.int64), mask=n_mask)
        tl.store(dist_ptr + offs_n, tl.maximum(m + x2, 0.0), mask=n_mask)

    @triton.jit
    def _rvq_decode_kernel(
        idx_ptr, c_ptr, y_ptr, N, Q, K, D, stride_in, stride_iq, stride_cq, stride_ck,
        D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """y[n] = sum_q C[q, idx[n, q]] (Q = 1: a plain gather), fp32 accumulation; NaN where an index is not in
        [0, K)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_d = tl.arange(0, D_PAD)
        mask = n_mask[:, None] & (offs_d[None, :] < D)
        acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for q in range(Q):
            i = tl.load(idx_ptr + offs_n.to(tl.int64) * stride_in + q * stride_iq, mask=n_mask, other=0)
            valid = (i >= 0) & (i < K)
            rows = c_ptr + q * stride_cq + tl.where(valid, i, 0).to(tl.int64) * stride_ck  # never out of bounds
            row = tl.load(rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(valid[:, None], row, float("nan"))
        y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def vq_assign_triton(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``vq_assign_reference``."""
    require_triton()
    _check_codebook(x, codebook)
    k, d = codebook.shape
    xm = as_rows(x)
    if xm.stride(-1) != 1:
        xm = xm.contiguous()
    c = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    n = xm.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])
    c2 = c.float().pow(2).sum(dim=1)  # (K,)
    d_pad = max(16, next_pow2(d))
    if interpreting():
        block_n, block_k = 64, min(256, max(16, next_pow2(k)))
    else:
        block_n, block_k = 128, 64
    dot_dtype = compute_dtype(torch.promote_types(x.dtype, codebook.dtype))
    precision = ("ieee" if interpreting() else "tf32x3") if dot_dtype == torch.float32 else "tf32"
    _vq_assign_kernel[(cdiv(n, block_n),)](
        xm, c, c2, idx, dist, n, k, xm.stride(0), c.stride(0), D=d, D_PAD=d_pad, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_DTYPE=tl_dtype(dot_dtype), PRECISION=precision, num_warps=8,
    )
    return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])


def rvq_decode_triton(indices: Tensor, codebooks: Tensor) -> Tensor:
    """Triton launcher of ``rvq_decode_reference`` (and of ``vq_decode_reference`` with Q = 1)."""
    require_triton()
    if codebooks.dim() != 3 or indices.dim() == 0 or indices.shape[-1] != codebooks.shape[0]:
        raise ValueError(f"need indices (..., Q) and codebooks (Q, K, D), got {tuple(indices.shape)} and "
                         f"{tuple(codebooks.shape)}")
    qn, k, d = codebooks.shape
    im = as_rows(indices)
    c = codebooks if codebooks.stride(-1) == 1 else codebooks.contiguous()
    n = im.shape[0]
    y = torch.empty((n, d), dtype=codebooks.dtype, device=codebooks.device)
    if n == 0 or d == 0:
        return y.reshape(*indices.shape[:-1], d)
    d_pad = next_pow2(d)
    block_n = max(1, min(next_pow2(n), (16384 if interpreting() else 4096) // d_pad))
    _rvq_decode_kernel[(cdiv(n, block_n),)](
        im, c, y, n, qn, k, d, im.stride(0), im.stride(1), c.stride(0), c.stride(1), D_PAD=d_pad, BLOCK_N=block_n,
    )
    return y.reshape(*indices.shape[:-1], d)


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def vq_assign(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codeword (squared L2) of each vector, never materializing the N x K distances.

    Args:
        x: (..., D) vectors. codebook: (K, D).

    Returns:
        indices (...) int64 and squared distances (...) fp32.
    """
    if use_triton(x, codebook):
        return vq_assign_triton(x, codebook)
    return vq_assign_reference(x, codebook)


def vq_decode(indices: Tensor, codebook: Tensor) -> Tensor:
    """Gather codewords: (...) indices in [0, K), (K, D) codebook -> (..., D) (others: module docstring)."""
    if use_triton(indices, codebook):
        return rvq_decode_triton(indices.unsqueeze(-1), codebook.unsqueeze(0))
    return vq_decode_reference(indices, codebook)


def rvq_decode(indices: Tensor, codebooks: Tensor) -> Tensor:
    """Residual VQ decode: (..., Q) indices in [0, K), (Q, K, D) codebooks -> (..., D) = sum of the Q codewords
    (others: module docstring)."""
    if use_triton(indices, codebooks):
        return rvq_decode_triton(indices, codebooks)
    return rvq_decode_reference(indices, codebooks)


def rvq_assign(x: Tensor, codebooks: Tensor) -> Tensor:
    """Greedy residual VQ encode: stage q assigns the residual left by stages < q. Returns indices (..., Q)."""
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (Q, K, D), got {tuple(codebooks.shape)}")
    residual = x.float()
    out = []
    for q in range(codebooks.shape[0]):
        idx, _ = vq_assign(residual, codebooks[q])
        residual = residual - vq_decode(idx, codebooks[q]).float()
        out.append(idx)
    return torch.stack(out, dim=-1) if out else torch.empty(*x.shape[:-1], 0, dtype=torch.int64, device=x.device)
