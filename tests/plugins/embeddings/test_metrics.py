"""Retrieval metrics: hand-computed nDCG@k / Recall@k / overlap@k, and nDCG against scikit-learn's ndcg_score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polyquant.plugins.embeddings.metrics import (
    ndcg_at_k,
    overlap_at_k,
    recall_at_k,
    retention,
    retrieval_metrics,
)

L3 = 1 / math.log2(3)  # discount of rank 2
L4 = 1 / math.log2(4)  # discount of rank 3 (= 0.5)


def test_ndcg_one_relevant_document_by_hand() -> None:
    ids = torch.tensor([[3, 1, 2], [1, 5, 6], [7, 8, 9]])
    got = ndcg_at_k(ids, torch.tensor([1, 1, 4]), 3)  # relevant at rank 2, rank 1, missing
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([L3, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(ndcg_at_k(ids, torch.tensor([1, 1, 4]), 1), torch.tensor([0.0, 1.0, 0.0],
                                                                                          dtype=torch.float64))


def test_ndcg_several_relevant_documents_by_hand() -> None:
    # relevant {1, 2} at ranks 2 and 3: DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    got = ndcg_at_k(np.array([[3, 1, 2]]), np.array([[1, 2, -1]]), 3)
    assert got.item() == pytest.approx((L3 + L4) / (1 + L3))
    # three relevant, k = 2: the ideal DCG counts only min(k, R) = 2 ranks
    assert ndcg_at_k([[1, 8, 9]], [[1, 2, 3]], 2).item() == pytest.approx(1 / (1 + L3))
    # -1 in ids (a short result list) never matches the -1 padding of relevant
    assert ndcg_at_k([[-1, 2]], [[2, -1]], 2).item() == pytest.approx(L3)


def test_ndcg_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    n_queries, n_docs = 25, 40
    y_true = (rng.random((n_queries, n_docs)) < 0.1).astype(np.int64)
    y_true[np.arange(n_queries), rng.integers(0, n_docs, n_queries)] = 1  # every query has a relevant document
    y_score = rng.random((n_queries, n_docs))  # distinct scores: no ties
    ids = np.argsort(-y_score, axis=1)
    width = int(y_true.sum(axis=1).max())
    relevant = np.full((n_queries, width), -1)
    for q in range(n_queries):
        hits = np.flatnonzero(y_true[q])
        relevant[q, : len(hits)] = hits
    for k in (1, 5, 10, 40):
        ours = ndcg_at_k(ids, relevant, k).numpy()
        ref = [sklearn_metrics.ndcg_score(y_true[q:q + 1], y_score[q:q + 1], k=k) for q in range(n_queries)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_recall_by_hand() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    relevant = torch.tensor([[3, 4], [5, -1]])
    torch.testing.assert_close(recall_at_k(ids, relevant, 3), torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(recall_at_k(ids, relevant, 1), torch.tensor([0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(recall_at_k(ids, torch.tensor([2, 6]), 2), torch.tensor([1.0, 0.0],
                                                                                         dtype=torch.float64))


def test_overlap_by_hand() -> None:
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ref = torch.tensor([[3, 2, 9], [7, 8, 9]])
    torch.testing.assert_close(overlap_at_k(ids, ref, 3), torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(overlap_at_k(ids, ref, 2), torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert overlap_at_k([[1, -1]], [[1, -1]], 2).item() == 0.5  # missing results never overlap
    assert overlap_at_k(ids, ids, 3).tolist() == [1.0, 1.0]


def test_retention_and_summary() -> None:
    assert retention(0.495, 0.5) == pytest.approx(0.99)
    assert math.isnan(retention(1.0, 0.0))
    ids = np.array([[3, 1, 2], [1, 5, 6]])
    out = retrieval_metrics(ids, np.array([1, 1]), reference_ids=np.array([[3, 1, 7], [1, 5, 6]]), ks=(2, 10))
    assert set(out) == {"ndcg@2", "recall@2", "overlap@2"}  # k = 10 skipped: only 3 columns
    assert out["ndcg@2"] == pytest.approx((L3 + 1) / 2)
    assert out["recall@2"] == 1.0
    assert out["overlap@2"] == 1.0


@pytest.mark.parametrize(
    "ids, relevant, k, match",
    [
        ([[1, 2]], [1], 3, "k must be"),
        ([[1.0, 2.0]], [1], 1, "integer ids"),
        ([[1, 2]], [[-1, -1]], 1, "at least one relevant"),
        ([[1, 2], [3, 4]], [1], 1, "same Q"),
    ],
)
def test_bad_inputs(ids: list, relevant: list, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ndcg_at_k(np.array(ids), np.array(relevant), k)
