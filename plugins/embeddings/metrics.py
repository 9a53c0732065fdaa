"""Retrieval metrics on top-k result ids: nDCG@k, Recall@k, overlap@k with the float32 neighbours, retention.

Spec: ../shared/specs/gs_audio_ssm_emb.md section (d), "Small CPU reproduction" (metrics). All functions are
vectorised over queries and return one value per query (a float64 tensor (Q,)); take ``.mean()`` for the table.

    ndcg_at_k(ids, relevant, k) -> Tensor (Q,)
    recall_at_k(ids, relevant, k) -> Tensor (Q,)
    overlap_at_k(ids, reference_ids, k) -> Tensor (Q,)
    retention(value, baseline) -> float
    retrieval_metrics(ids, relevant, *, reference_ids=None, ks=(10, 100)) -> dict[str, float]

| argument        | shape / meaning                                                                              |
|-----------------|----------------------------------------------------------------------------------------------|
| ids             | (Q, K) int: ranked document ids per query, best first, distinct within a row; ``-1`` = no hit |
| relevant        | (Q,) int: the one relevant document per query, or (Q, R) int padded with ``-1`` (qrels)       |
| reference_ids   | (Q, K') int: the float32 exact search's ids, for the label-free overlap                      |

| metric      | definition (binary relevance)                                                                     |
|-------------|---------------------------------------------------------------------------------------------------|
| DCG@k       | sum over ranks r = 1..k of rel_r / log2(r + 1)                                                   |
| nDCG@k      | DCG@k / IDCG@k, IDCG@k = sum over r = 1..min(k, R_q) of 1 / log2(r + 1), R_q = #relevant of q     |
| Recall@k    | #relevant in the top k / R_q                                                                      |
| overlap@k   | #(top k of ids) in (top k of reference_ids) / k                                                   |
| retention   | value / baseline (e.g. nDCG@10 of a format / nDCG@10 of float32)                                  |

``ids`` and ``relevant`` may be torch tensors or numpy arrays. ``ids`` must have at least k columns (a search that
found fewer pads with ``-1``, which never counts as a hit).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["ndcg_at_k", "recall_at_k", "overlap_at_k", "retention", "retrieval_metrics"]


def _as_ids(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def _checked(ids: Tensor | np.ndarray, relevant: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
    """(ids[:, :k], relevant as (Q, R)), validated."""
    ids_t = _as_ids(ids, "ids")
    rel = _as_ids(relevant, "relevant")
    if rel.ndim == 1:
        rel = rel[:, None]  # (Q, 1)
    if ids_t.ndim != 2 or rel.ndim != 2 or ids_t.shape[0] != rel.shape[0]:
        raise ValueError(f"ids must be (Q, K) and relevant (Q,) or (Q, R) with the same Q, got "
                         f"{tuple(ids_t.shape)} and {tuple(rel.shape)}")
    if not isinstance(k, int) or not 1 <= k <= ids_t.shape[1]:
        raise ValueError(f"k must be an integer in [1, {ids_t.shape[1]}] (the columns of ids), got {k!r}")
    if bool(((rel >= 0).sum(dim=1) == 0).any()):
        raise ValueError("every query needs at least one relevant document (relevant holds only -1 in a row)")
    return ids_t[:, :k], rel


def _hits(ids: Tensor, rel: Tensor) -> Tensor:
    """(Q, k) bool: ids[q, r] is one of query q's relevant documents."""
    match = ids[:, :, None] == rel[:, None, :]  # (Q, k, R)
    return (match & (rel[:, None, :] >= 0)).any(dim=2) & (ids >= 0)


def ndcg_at_k(ids: Tensor | np.ndarray, relevant: Tensor | np.ndarray, k: int) -> Tensor:
    """nDCG@k per query with binary relevance and the log2 discount (module docstring), float64 (Q,)."""
    top, rel = _checked(ids, relevant, k)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))  # (k,) 1/log2(r+1), r = 1..k
    dcg = (_hits(top, rel).to(torch.float64) * discount).sum(dim=1)  # (Q,)
    n_ideal = (rel >= 0).sum(dim=1).clamp(max=k)  # (Q,)
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discount.cumsum(0)])[n_ideal]  # (Q,)
    return dcg / ideal


def recall_at_k(ids: Tensor | np.ndarray, relevant: Tensor | np.ndarray, k: int) -> Tensor:
    """Recall@k per query: the share of its relevant documents found in the top k, float64 (Q,)."""
    top, rel = _checked(ids, relevant, k)
    return _hits(top, rel).sum(dim=1).to(torch.float64) / (rel >= 0).sum(dim=1).to(torch.float64)


def overlap_at_k(ids: Tensor | np.ndarray, reference_ids: Tensor | np.ndarray, k: int) -> Tensor:
    """Label-free overlap@k per query: |top k of ids ∩ top k of reference_ids| / k, float64 (Q,)."""
    top = _as_ids(ids, "ids")
    ref = _as_ids(reference_ids, "reference_ids")
    if top.ndim != 2 or ref.ndim != 2 or top.shape[0] != ref.shape[0]:
        raise ValueError(f"ids and reference_ids must be (Q, K) with the same Q, got {tuple(top.shape)} and "
                         f"{tuple(ref.shape)}")
    if not isinstance(k, int) or not 1 <= k <= min(top.shape[1], ref.shape[1]):
        raise ValueError(f"k must be an integer in [1, {min(top.shape[1], ref.shape[1])}], got {k!r}")
    top, ref = top[:, :k], ref[:, :k]
    shared = ((top[:, :, None] == ref[:, None, :]) & (ref[:, None, :] >= 0)).any(dim=2) & (top >= 0)  # (Q, k)
    return shared.sum(dim=1).to(torch.float64) / k


def retention(value: float, baseline: float) -> float:
    """``value / baseline`` (1.0 = as good as the baseline); NaN when the baseline is 0."""
    return float(value) / float(baseline) if baseline else math.nan


def retrieval_metrics(
    ids: Tensor | np.ndarray, relevant: Tensor | np.ndarray, *, reference_ids: Tensor | np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 100),
) -> dict[str, float]:
    """Mean nDCG@k and Recall@k for every k in ``ks`` that ``ids`` has columns for, and overlap@k with
    ``reference_ids`` (when given) for those k both have: ``{"ndcg@10": ..., "recall@10": ..., "overlap@10": ...}``.
    """
    ids_t = _as_ids(ids, "ids")
    out: dict[str, float] = {}
    for k in ks:
        if ids_t.ndim == 2 and k <= ids_t.shape[1]:
            out[f"ndcg@{k}"] = float(ndcg_at_k(ids_t, relevant, k).mean())
            out[f"recall@{k}"] = float(recall_at_k(ids_t, relevant, k).mean())
            if reference_ids is not None and k <= np.shape(reference_ids)[1]:
                out[f"overlap@{k}"] = float(overlap_at_k(ids_t, reference_ids, k).mean())
    if not out:
        raise ValueError(f"ids of shape {tuple(ids_t.shape)} has too few columns for any k in {ks}")
    return out
