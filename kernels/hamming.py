"""Binary embedding search: Hamming distance between packed bit vectors, top-k nearest.

What it is for: the embeddings plugin's 1-bit quantization (sign of each dimension) packs a D-dim embedding into
D / 8 bytes; search compares popcount(q XOR x) instead of dot products (32x less memory than fp32).

Packing: ``pack_binary(bits)`` is the core's row layout with 1 bit per code (``polyquant.pack.pack_rows(bits, 1)``):
(..., D) along the last dim into (..., ceil(D / 8)) uint8; bit j of byte i is element 8 i + j (little-endian bit
order, numpy ``packbits(bitorder="little")``); padding bits are 0. Bit 1 is the core ``BinaryFormat``'s code of +1,
so ``pack_binary(x >= 0)`` packs the binary (sign) quantization of x.
``hamming_topk(queries, database, k)`` returns, per query, the k smallest distances in ascending order, ties broken
by the smaller database index, so every path gives identical results.

CPU engine (``hamming_topk_cpu``, what ``hamming_topk`` runs on CPU tensors): popcount over the packed words, never
expanding bits. With FAISS installed (the embeddings extra) it is ``faiss.knn_hamming``, the scan behind FAISS's
``IndexBinaryFlat``, run on the caller's array as it is (no copy: a memory-mapped store is read in place; the codes
are byte-for-byte what FAISS takes, and the distance does not depend on the bit order); without it, numpy's
``bitwise_count`` over 64-bit words (bytes where the row length is not a multiple of 8). Measured on 100k x 384-bit
codes, one thread (``benchmarks/embeddings_store.py``): FAISS about 0.5-0.8 ms per query, numpy about 3 ms, the
+-1 matmul reference about 350 ms (it unpacks every bit). The engine's results are re-sorted by (distance, index),
so ties follow the contract whatever order the engine returns them in.

Triton: a program takes BLOCK_Q queries x BLOCK_N database rows; bits become +-1 int8 and an int8 tensor-core
product gives q . x = D - 2 hamming(q, x) (the database stays packed in memory and is unpacked in registers). Each
block keeps its k best (distance, index) pairs; torch.topk merges the ceil(N / BLOCK_N) * k candidates per query.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polyquant.pack import pack_rows, unpack_rows

from ._dispatch import (
    HAS_TRITON,
    cdiv,
    interpreting,
    kernel_preference,
    next_pow2,
    require_triton,
    tl,
    triton,
    use_triton,
)

__all__ = [
    "pack_binary",
    "unpack_binary",
    "hamming_distance_reference",
    "hamming_topk_reference",
    "hamming_topk_cpu",
    "hamming_topk",
]

_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def pack_binary(bits: Tensor) -> Tensor:
    """Pack (..., D) bits (bool, or nonzero = 1) into (..., ceil(D / 8)) uint8: ``pack_rows(bits != 0, 1)`` (on
    the CPU numpy's ``packbits(bitorder="little")``, the same bytes, 20x faster for a query)."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits((bits != 0).numpy(), axis=-1, bitorder="little"))
    return pack_rows(bits != 0, 1)


def unpack_binary(packed: Tensor, d: int) -> Tensor:
    """Inverse of ``pack_binary``: (..., ceil(d / 8)) uint8 -> (..., d) bool."""
    return unpack_rows(packed, 1, d).bool()


# ----------------------------------------------------------------------------------------------------------------
# torch references


def _check(queries: Tensor, database: Tensor) -> None:
    if (queries.dtype != torch.uint8 or database.dtype != torch.uint8 or queries.dim() != 2 or database.dim() != 2
            or queries.shape[1] != database.shape[1]):
        raise ValueError(f"need uint8 queries (Q, B) and database (N, B), got {queries.dtype} "
                         f"{tuple(queries.shape)} and {database.dtype} {tuple(database.shape)}")


def hamming_distance_reference(queries: Tensor, database: Tensor) -> Tensor:
    """All distances popcount(q XOR x): (Q, B), (N, B) uint8 -> (Q, N) int32 (materialized).

    Computed as a matmul of +-1 signs: with D = 8 B bits (padding bits are 0 on both sides), q . x = D - 2 h, and
    every partial sum is an integer below 2^24, so float32 (or TF32: +-1 is exact) gives h exactly.
    """
    _check(queries, database)
    d = 8 * queries.shape[1]
    if d >= 1 << 24:  # float32 sums would round: the byte-wise popcount
        x = queries[:, None, :] ^ database[None, :, :]  # (Q, N, B)
        return _POPCOUNT8.to(x.device)[x.long()].sum(dim=-1, dtype=torch.int32)
    q = _signs(queries, d)  # (Q, D)
    x = _signs(database, d)  # (N, D)
    return (d - q @ x.t()).div_(2).to(torch.int32)


def _signs(packed: Tensor, d: int) -> Tensor:
    """(..., B) packed bits -> (..., d) float32 +-1 (bit 1 -> +1)."""
    return unpack_rows(packed, 1, d).float().mul_(2).sub_(1)


def _topk_keys(keys: Tensor, k: int) -> Tensor:
    return torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values


def _split_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    return (keys >> 32).to(torch.int32), keys & 0xFFFFFFFF


def _chunked_topk(distances: Callable[[int, int], Tensor], nq: int, n: int, k: int, step: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """The k smallest ``distances(i, j)`` ((Q, j - i) int for database rows i..j) per query over ``step``-row
    chunks, ties to the smaller index (sort key distance * 2^32 + index): (distances, indices) as the op returns."""
    best = torch.empty(nq, 0, dtype=torch.int64, device=device)
    for i in range(0, n, step):
        dist = distances(i, min(i + step, n)).long()  # (Q, m)
        idx = torch.arange(i, i + dist.shape[1], device=device)
        best = _topk_keys(torch.cat([best, (dist << 32) | idx], dim=1), k)  # (Q, <= k)
    return _split_keys(best)


def hamming_topk_reference(queries: Tensor, database: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k nearest database rows per query: distances (Q, k) int32 ascending, indices (Q, k) int64.

    Ties are broken by the smaller index (sort key distance * 2^32 + index). The database is scanned in chunks.
    """
    _check(queries, database)
    n = database.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")
    step = max(1, (1 << 22) // max(1, queries.shape[0], 8 * queries.shape[1]))  # (Q, step) keys, (step, D) signs
    return _chunked_topk(lambda i, j: hamming_distance_reference(queries, database[i:j]), queries.shape[0], n, k,
                         step, queries.device)


# ----------------------------------------------------------------------------------------------------------------
# CPU engine


def _faiss() -> Any:
    """The faiss module, or None where it is not installed (or fails to load)."""
    try:
        import faiss
    except (ImportError, OSError, RuntimeError):
        return None
    return faiss


def _popcount_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """popcount(q XOR x) (Q, N) int32 with numpy (``bitwise_count`` over 64-bit words where the row length allows)."""
    b = queries.shape[1]
    if b % 8 == 0:
        queries, database = queries.view(np.uint64), database.view(np.uint64)
    out = np.empty((len(queries), len(database)), dtype=np.int32)
    for i, q in enumerate(queries):
        np.bitwise_count(database ^ q).sum(axis=1, dtype=np.int32, out=out[i])
    return out


def hamming_topk_cpu(queries: Tensor, database: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``hamming_topk_reference`` by popcount on CPU tensors (module docstring): FAISS's ``knn_hamming`` where
    faiss is installed, else numpy; same results, ties to the smaller index."""
    _check(queries, database)
    n = database.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")
    q = np.ascontiguousarray(queries.numpy())
    x = database.numpy() if database.is_contiguous() else np.ascontiguousarray(database.numpy())
    faiss = _faiss()
    if faiss is not None:
        dist, idx = faiss.knn_hamming(q, x, k)  # (Q, k) int32, int64
        keys = (torch.from_numpy(dist).long() << 32) | torch.from_numpy(idx)
        return _split_keys(torch.sort(keys, dim=1).values)
    step = max(1, (1 << 22) // max(1, len(q)))  # (Q, step) distances per step
    return _chunked_topk(lambda i, j: torch.from_numpy(_popcount_distances(q, x[i:j])), len(q), n, k, step,
                         queries.device)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel

if HAS_TRITON:

    @triton.jit
    def _hamming_topk_kernel(
        q_ptr, x_ptr, out_ptr, Q, N, B, k, num_blocks, D_TOT, stride_q,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        """Hamming distances of a (BLOCK_Q, BLOCK_N) block on the tensor cores, then its k best per query.

        With bits mapped to +-1, q . x = D - 2 hamming(q, x): the queries come pre-expanded as int8 +-1
        (Q, D_TOT); database bytes are unpacked in registers, BLOCK_B bytes (8 BLOCK_B bits) per step, and
        multiplied with an int8 dot. Keys distance * BLOCK_N + column are unique per row, so k rounds of
        (min, knock out) give the block's k best; they are stored as distance * 2^32 + index.
        """
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        offs_bits = tl.arange(0, 8 * BLOCK_B)
        shifts = tl.arange(0, 8)
        q_mask = offs_q < Q
        n_mask = offs_n < N
        q_rows = q_ptr + offs_q.to(tl.int64)[:, None] * stride_q
        x_cols = x_ptr + offs_n.to(tl.int64)[None, :] * B
        acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.int32)
        for b0 in range(0, B, BLOCK_B):
            qpm = tl.load(q_rows + 8 * b0 + offs_bits[None, :], mask=q_mask[:, None], other=1)  # (BQ, 8 BB) int8
            xb = tl.load(x_cols + b0 + offs_b[:, None], mask=((b0 + offs_b) < B)[:, None] & n_mask[None, :],
                         other=0).to(tl.int32)  # (BLOCK_B, BLOCK_N) bytes
            bits = (xb[:, None, :] >> shifts[None, :, None]) & 1  # (BLOCK_B, 8, BLOCK_N), bit j of byte i
            xpm = tl.reshape(bits * 2 - 1, (8 * BLOCK_B, BLOCK_N)).to(tl.int8)  # row 8 i + j
            acc = tl.dot(qpm, xpm, acc, out_dtype=tl.int32)
        dist = (D_TOT - acc) // 2
        big: tl.constexpr = 2147483647
        key = tl.where(n_mask[None, :], dist * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], big)
        out_rows = out_ptr + offs_q.to(tl.int64) * (num_blocks * k) + pid_n * k
        for j in range(0, k):
            m = tl.min(key, axis=1)  # (BLOCK_Q,)
            d = (m // BLOCK_N).to(tl.int64)
            i = (pid_n * BLOCK_N + m % BLOCK_N).to(tl.int64)
            cand = tl.where(m == big, 9223372036854775807, (d << 32) | i)
            tl.store(out_rows + j, cand, mask=q_mask)
            key = tl.where(key == m[:, None], big, key)


def hamming_topk_triton(
    queries: Tensor, database: Tensor, k: int, *, blocks: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``hamming_topk_reference``; ``blocks`` = (BLOCK_Q, BLOCK_N) overrides the heuristic."""
    require_triton()
    _check(queries, database)
    n, b = database.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N = {n}], got {k}")
    nq = queries.shape[0]
    if nq == 0:
        return (torch.empty(0, k, dtype=torch.int32, device=queries.device),
                torch.empty(0, k, dtype=torch.int64, device=queries.device))
    if blocks is not None:
        block_q, block_n = blocks
    elif interpreting():
        block_q, block_n = 16, 64
    else:
        block_q, block_n = 128, 256
    block_b = min(32, max(4, next_pow2(b)))  # bytes per step: a dot over 8 * block_b >= 32 bits
    steps = cdiv(b, block_b)
    qpm = unpack_binary(torch.nn.functional.pad(queries, (0, steps * block_b - b)), 8 * steps * block_b)
    qpm = (qpm.to(torch.int8) * 2 - 1).contiguous()  # (Q, D_TOT) +-1; padding bits are 0 -> -1 on both sides
    x = database if database.stride(-1) == 1 and database.stride(0) == b else database.contiguous()
    blocks_n = cdiv(n, block_n)
    cand = torch.empty(nq, blocks_n * k, dtype=torch.int64, device=queries.device)
    _hamming_topk_kernel[(cdiv(nq, block_q), blocks_n)](
        qpm, x, cand, nq, n, b, k, blocks_n, 8 * steps * block_b, qpm.stride(0), BLOCK_Q=block_q,
        BLOCK_N=block_n, BLOCK_B=block_b, num_warps=8,
    )
    return _split_keys(_topk_keys(cand, k))


# ----------------------------------------------------------------------------------------------------------------
# public, dispatching API


def hamming_topk(queries: Tensor, database: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k nearest packed binary vectors per query by Hamming distance.

    Args:
        queries: (Q, B) uint8 from ``pack_binary``. database: (N, B) uint8. k: 1 <= k <= N.

    Returns:
        distances (Q, k) int32 ascending and indices (Q, k) int64 (ties: smaller index first).
    """
    if use_triton(queries, database):
        return hamming_topk_triton(queries, database, k)
    if kernel_preference() == "auto" and queries.device.type == database.device.type == "cpu":
        return hamming_topk_cpu(queries, database, k)
    return hamming_topk_reference(queries, database, k)
