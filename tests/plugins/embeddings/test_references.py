"""The external references on a small seeded set: each against brute force where it is exact, and the quality
ordering that must hold (fp16 ~ exact, int8 close, ubinary rescoring better than none)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("usearch")
pytest.importorskip("sentence_transformers")

from polyquant.plugins.embeddings import references as refs  # noqa: E402
from polyquant.plugins.embeddings.metrics import overlap_at_k, recall_at_k  # noqa: E402

D, N, C, Q = 64, 1500, 300, 100


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """Clustered unit vectors (neighbourhoods that quantization can scramble); queries are noisy copies of
    documents ``relevant``."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, D))
    docs = _unit(centres[rng.integers(0, 30, N)] + 0.6 * rng.standard_normal((N, D)))
    calib = _unit(centres[rng.integers(0, 30, C)] + 0.6 * rng.standard_normal((C, D)))
    relevant = rng.choice(N, Q, replace=False)
    queries = _unit(docs[relevant] + 0.05 * rng.standard_normal((Q, D)))
    exact = np.argsort(-(queries @ docs.T), axis=1)
    return {"docs": docs, "calib": calib, "queries": queries, "relevant": relevant, "exact": exact}


def overlap10(ids: np.ndarray, data: dict[str, np.ndarray]) -> float:
    return float(overlap_at_k(ids, data["exact"][:, :10], 10).mean())


def test_exact_float32_is_brute_force(data) -> None:
    method = refs.exact_float32(data["docs"], chunk=7)  # several chunks
    np.testing.assert_array_equal(method.search(data["queries"], 10), data["exact"][:, :10])
    assert method.bytes_per_vector == 4 * D
    small = refs.exact_float32(data["docs"][:3])
    ids = small.search(data["queries"][:2], 5)  # k > N: padded with -1
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and sorted(ids[0, :3]) == [0, 1, 2]


def test_faiss_scalar_quantizers(data) -> None:
    fp16 = refs.faiss_scalar_quantizer(data["docs"], qtype="QT_fp16", calibration=data["calib"])
    top1 = fp16.search(data["queries"], 10)[:, 0]
    assert (top1 == data["exact"][:, 0]).mean() >= 0.99
    assert overlap10(fp16.search(data["queries"], 10), data) >= 0.99
    int8 = refs.faiss_scalar_quantizer(data["docs"], qtype="QT_8bit", calibration=data["calib"])
    ids = int8.search(data["queries"], 10)
    assert overlap10(ids, data) >= 0.9
    assert recall_at_k(ids, data["relevant"], 10).mean() == 1.0  # retention of the labelled task
    four = refs.faiss_scalar_quantizer(data["docs"], qtype="QT_4bit", calibration=data["calib"])
    assert overlap10(four.search(data["queries"], 10), data) < overlap10(ids, data)
    assert (fp16.bytes_per_vector, int8.bytes_per_vector, four.bytes_per_vector) == (2 * D, D, D / 2)
    with pytest.raises(ValueError, match="QT_8bit"):
        refs.faiss_scalar_quantizer(data["docs"], qtype="QT_9bit", calibration=data["calib"])


def _hamming(q_bits: np.ndarray, d_bits: np.ndarray) -> np.ndarray:
    """(Q, N) Hamming distances between packed bit rows, by brute force."""
    return np.unpackbits(q_bits[:, None, :] ^ d_bits[None, :, :], axis=2).sum(axis=2)


def test_binary_flat_and_st_ubinary_are_exact_hamming(data) -> None:
    dist = _hamming(np.packbits(data["queries"] > 0, axis=1), np.packbits(data["docs"] > 0, axis=1))  # (Q, N)
    best = np.sort(dist, axis=1)[:, :10]
    rows = np.arange(Q)[:, None]
    for method in (refs.faiss_binary_flat(data["docs"]), refs.st_ubinary(data["docs"])):
        ids = method.search(data["queries"], 10)
        np.testing.assert_array_equal(dist[rows, ids], best)  # the k smallest distances (ties in any order)
        assert method.bytes_per_vector == D / 8


def test_st_ubinary_rescoring(data) -> None:
    plain = refs.st_ubinary(data["docs"]).search(data["queries"], 10)
    once = refs.st_ubinary(data["docs"], rescore_multiplier=1).search(data["queries"], 10)
    # x1 rescoring re-ranks the same 10 candidates by float query . {0, 1} bits
    assert all(set(a) == set(b) for a, b in zip(plain, once))
    bits = np.unpackbits(np.packbits(data["docs"] > 0, axis=1), axis=1)[:, :D].astype(np.float64)
    scores = np.einsum("qd,qkd->qk", data["queries"].astype(np.float64), bits[once])
    assert (np.diff(scores, axis=1) <= 1e-9).all()
    four = refs.st_ubinary(data["docs"], rescore_multiplier=4).search(data["queries"], 10)
    assert overlap10(four, data) > overlap10(plain, data) + 0.05
    assert recall_at_k(four, data["relevant"], 10).mean() >= recall_at_k(plain, data["relevant"], 10).mean()


def test_st_int8(data) -> None:
    from sentence_transformers.util import quantize_embeddings

    codes = quantize_embeddings(data["docs"], precision="int8", calibration_embeddings=data["calib"])
    q_codes = quantize_embeddings(data["queries"], precision="int8", calibration_embeddings=data["calib"])
    code_scores = q_codes.astype(np.int64) @ codes.astype(np.int64).T  # (Q, N) code-space inner products
    plain = refs.st_int8(data["docs"], calibration=data["calib"])
    ids = plain.search(data["queries"], 10)
    rows = np.arange(Q)[:, None]
    np.testing.assert_array_equal(code_scores[rows, ids], -np.sort(-code_scores, axis=1)[:, :10])
    rescored = refs.st_int8(data["docs"], calibration=data["calib"], rescore_multiplier=4)
    ids4 = rescored.search(data["queries"], 10)
    assert overlap10(ids4, data) >= max(0.9, overlap10(ids, data))
    assert recall_at_k(ids4, data["relevant"], 10).mean() == 1.0
    assert rescored.bytes_per_vector == D and "rescore x4" in rescored.name
    with pytest.raises(ValueError, match="rescore_multiplier"):
        refs.st_int8(data["docs"], calibration=data["calib"], rescore_multiplier=0)


def test_usearch_native(data) -> None:
    f16 = refs.usearch_native(data["docs"], dtype="f16", threads=1)
    assert overlap10(f16.search(data["queries"], 10), data) >= 0.99
    i8 = refs.usearch_native(data["docs"], dtype="i8", threads=1)
    assert overlap10(i8.search(data["queries"], 10), data) >= 0.9
    assert (f16.bytes_per_vector, i8.bytes_per_vector) == (2 * D, D)
    ids = refs.usearch_native(data["docs"][:3], dtype="f16", threads=1).search(data["queries"][:2], 5)
    assert (ids[:, 3:] == -1).all() and sorted(ids[1, :3]) == [0, 1, 2]
    for method in (f16, i8):  # one query: usearch answers with Matches (no counts), not BatchMatches
        assert method.search(data["queries"][:1], 10).tolist() == method.search(data["queries"][:4], 10)[:1].tolist()
    one = refs.usearch_native(data["docs"][:3], dtype="f16", threads=1).search(data["queries"][:1], 5)
    assert one.shape == (1, 5) and (one[:, 3:] == -1).all() and sorted(one[0, :3]) == [0, 1, 2]


def test_bad_inputs(data) -> None:
    nan_docs = data["docs"].copy()
    nan_docs[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refs.exact_float32(nan_docs)
    method = refs.faiss_binary_flat(data["docs"])
    with pytest.raises(ValueError, match="dimension 32, expected 64"):
        method.search(data["queries"][:, :32], 10)
    with pytest.raises(ValueError, match="k must be"):
        method.search(data["queries"], 0)
    with pytest.raises(ValueError, match="dtype"):
        refs.usearch_native(data["docs"], dtype="f8")


def test_default_references(data) -> None:
    methods = refs.default_references(data["docs"][:200], calibration=data["calib"], threads=1)
    names = [m.name for m in methods]
    assert len(set(names)) == len(names)
    assert {"faiss SQ QT_8bit", "usearch i8", "st int8 (usearch i8) + rescore x4", "faiss IndexBinaryFlat",
            "st ubinary (faiss) + rescore x10"} <= set(names)
    for m in methods:
        assert m.search(data["queries"][:4], 3).shape == (4, 3)
