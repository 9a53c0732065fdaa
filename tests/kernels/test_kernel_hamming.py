"""Packed binary vectors and Hamming top-k search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyquant.kernels import hamming


def test_pack_binary_layout() -> None:
    bits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert hamming.pack_binary(bits).tolist() == [[0x81, 0x03]]
    x = torch.rand(3, 4, 21) > 0.5
    packed = hamming.pack_binary(x)
    assert torch.equal(packed, torch.from_numpy(np.packbits(x.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(hamming.unpack_binary(packed, 21), x)


def test_distance_hand() -> None:
    q = torch.tensor([[0b1011_0000, 0xFF]], dtype=torch.uint8)
    db = torch.tensor([[0b1011_0000, 0xFF], [0b0000_0000, 0x00], [0b1111_0000, 0x0F]], dtype=torch.uint8)
    assert hamming.hamming_distance_reference(q, db).tolist() == [[0, 11, 5]]


def test_topk_reference_ties_and_order() -> None:
    q = torch.tensor([[0x00]], dtype=torch.uint8)
    db = torch.tensor([[0x03], [0x01], [0xFF], [0x10], [0x00], [0x30]], dtype=torch.uint8)  # distances 2 1 8 1 0 2
    dist, idx = hamming.hamming_topk_reference(q, db, 4)
    assert dist.tolist() == [[0, 1, 1, 2]] and idx.tolist() == [[4, 1, 3, 0]]
    with pytest.raises(ValueError, match="k must be"):
        hamming.hamming_topk_reference(q, db, 7)


def test_topk_reference_chunks_agree_with_full_sort() -> None:
    q = hamming.pack_binary(torch.rand(6, 64) > 0.5)
    db = hamming.pack_binary(torch.rand(3000, 64) > 0.5)
    dist, idx = hamming.hamming_topk_reference(q, db, 25)
    full = hamming.hamming_distance_reference(q, db).long()
    keys = (full << 32) | torch.arange(3000)
    expected = keys.sort(dim=1).values[:, :25]
    assert torch.equal(idx, expected & 0xFFFFFFFF) and torch.equal(dist.long(), expected >> 32)


@pytest.mark.parametrize("nq, n, d, k", [(5, 300, 64, 7), (17, 1000, 256, 10), (3, 20, 20, 20), (40, 130, 100, 1),
                                         (2, 600, 24, 200)])
def test_topk_triton_matches_reference(triton_path: str, nq: int, n: int, d: int, k: int) -> None:
    q = hamming.pack_binary(torch.rand(nq, d, device=triton_path) > 0.5)
    db = hamming.pack_binary(torch.rand(n, d, device=triton_path) > 0.5)
    db[n // 2] = q[0]  # an exact match
    dist, idx = hamming.hamming_topk(q, db, k)
    ref_dist, ref_idx = hamming.hamming_topk_reference(q, db, k)
    assert dist.dtype == torch.int32 and idx.dtype == torch.int64
    assert torch.equal(dist, ref_dist) and torch.equal(idx, ref_idx)
    assert dist[0, 0].item() == 0


def test_topk_triton_empty_queries(triton_path: str) -> None:
    db = torch.randint(0, 256, (10, 4), dtype=torch.uint8, device=triton_path)
    dist, idx = hamming.hamming_topk(db[:0], db, 3)
    assert dist.shape == (0, 3) and idx.shape == (0, 3)


@pytest.mark.gpu
def test_topk_gpu_large() -> None:
    q = hamming.pack_binary(torch.rand(64, 1024, device="cuda") > 0.5)
    db = hamming.pack_binary(torch.rand(200_000, 1024, device="cuda") > 0.5)
    dist, idx = hamming.hamming_topk(q, db, 10)
    ref_dist, ref_idx = hamming.hamming_topk_reference(q, db, 10)
    assert torch.equal(dist, ref_dist) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("engine", ["faiss", "numpy"])
@pytest.mark.parametrize("nq, n, d, k", [(5, 300, 64, 7), (3, 2000, 8, 50), (4, 257, 20, 257), (2, 900, 384, 40),
                                         (1, 70, 128, 1)])
def test_cpu_engine_matches_reference_ties_included(monkeypatch: pytest.MonkeyPatch, engine: str, nq: int, n: int,
                                                     d: int, k: int) -> None:
    """FAISS's knn_hamming and the numpy popcount give the reference's distances and indices, ties (8-bit codes:
    9 distinct distances over 2,000 rows; duplicated rows) to the smaller index, whole words or not."""
    if engine == "faiss":
        pytest.importorskip("faiss")
    else:
        monkeypatch.setattr(hamming, "_faiss", lambda: None)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = hamming.pack_binary(torch.rand(nq, d, generator=g) > 0.5)
        db = hamming.pack_binary(torch.rand(n, d, generator=g) > 0.5)
        db[n // 3 : n // 3 + 5] = db[:5]  # duplicates: equal distances at different indices
        dist, idx = hamming.hamming_topk_cpu(q, db, k)
        ref_dist, ref_idx = hamming.hamming_topk_reference(q, db, k)
        assert dist.dtype == torch.int32 and idx.dtype == torch.int64
        assert torch.equal(dist, ref_dist) and torch.equal(idx, ref_idx)
        assert torch.equal(hamming.hamming_topk(q, db, k)[1], ref_idx)  # the CPU dispatch runs the engine
    with pytest.raises(ValueError, match="k must be"):
        hamming.hamming_topk_cpu(q, db, n + 1)


def test_cpu_engine_reads_a_memory_mapped_database_in_place(tmp_path) -> None:
    db = np.memmap(tmp_path / "codes", dtype=np.uint8, mode="w+", shape=(500, 48))
    db[:] = np.random.default_rng(0).integers(0, 256, (500, 48), dtype=np.uint8)
    q = torch.from_numpy(np.array(db[[3, 400]]))
    dist, idx = hamming.hamming_topk_cpu(q, torch.from_numpy(db[100:]), 5)
    assert idx[1, 0].item() == 300 and dist[1, 0].item() == 0  # row 400 of the file is row 300 of the view
    assert torch.equal(idx, hamming.hamming_topk_reference(q, torch.from_numpy(np.array(db[100:])), 5)[1])
