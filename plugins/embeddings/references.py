"""External reference points for the embedding formats, run on the same vectors: sentence-transformers, FAISS, usearch.

Spec: ../shared/specs/gs_audio_ssm_emb.md section (d) (Anchors; Small CPU reproduction). Each constructor takes the
float32 corpus (N, d) (and the calibration split where the reference fits ranges), builds the library's index
once, and returns a ``SearchMethod``: a name, ``search(queries (Q, d) float32, k) -> ids (Q, k) int64`` (best first,
``-1`` where fewer than k were found) and the stored bytes per vector. The benchmark and the store's formats use
the same ``SearchMethod`` type, so every row of the table is searched the same way.

| constructor (``docs`` (N, d) float32)          | library path                                     | bytes / vector |
|------------------------------------------------|--------------------------------------------------|----------------|
| exact_float32(docs)                            | torch ``queries @ docs.T`` + ``topk``: the truth | 4 d            |
| st_int8(docs, calibration=, rescore_multiplier=) | ``quantize_embeddings("int8")`` +              | d              |
|                                                | ``semantic_search_usearch`` (usearch i8, IP)     |                |
| st_ubinary(docs, rescore_multiplier=)          | ``quantize_embeddings("ubinary")`` +             | d / 8          |
|                                                | ``semantic_search_faiss`` (IndexBinaryFlat)      |                |
| faiss_scalar_quantizer(docs, qtype=, calibration=) | ``IndexScalarQuantizer(d, qtype, IP)``,      | ``sa_code_size`` |
|                                                | trained on the calibration split                 |                |
| faiss_binary_flat(docs)                        | ``IndexBinaryFlat`` on ``packbits(x > 0)``       | d / 8          |
| usearch_native(docs, dtype=)                   | ``Index(metric="cos", dtype=f16 / bf16 / i8)``,  | 2 d / 2 d / d  |
|                                                | its own cast, ``exact=True`` search              |                |

sentence-transformers is called through its own functions, not rewritten: the corpus index is built by its
``semantic_search_*`` (``output_index=True`` on a one-query warm-up call) and every search goes through the same
function with ``corpus_index=``, ``rescore`` and ``rescore_multiplier``, as its embedding-quantization examples do
(int8 on usearch, ubinary on FAISS). What that means, as of sentence-transformers 6.2:

- int8: document and query codes are ``floor((x - min) / step) - 128`` with per-dimension min / max from the
  calibration split (step = (max - min) / 255); the first pass scores **raw codes** (integer inner product in
  usearch), which is not the inner product of the vectors. With rescoring it fetches ``k * rescore_multiplier``
  candidates and rescores them with the float query against **dequantised** candidates (``min + (code + 128) *
  step``, the bucket's lower edge): the fix of sentence-transformers PR #4058 is in this version; before it the
  rescoring used the raw codes. ``rescore_multiplier=None`` is the code-space search alone.
- ubinary: ``packbits(x > 0)``, Hamming search in ``faiss.IndexBinaryFlat``; rescoring takes the float query's
  dot product with the candidates' unpacked {0, 1} bits (not with the original vectors).
- Its timings include its Python-side rescoring (a ``reconstruct`` / ``get`` per candidate) and result dicts.
- usearch searches use all cores (sentence-transformers does not pass ``threads``); FAISS follows
  ``faiss.omp_set_num_threads``.

FAISS scalar quantizers: per-dimension ranges trained (min / max, ``RS_minmax``) on the calibration split;
decoding is ``vmin + (code + 0.5) / (2^b - 1) * vdiff``. ``QT_8bit_direct(_signed)`` are left out: they store
``round(x)`` (+128), which maps every component of a unit vector to the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

__all__ = [
    "SearchFn",
    "SearchMethod",
    "FAISS_SQ_TYPES",
    "USEARCH_DTYPES",
    "exact_float32",
    "st_int8",
    "st_ubinary",
    "faiss_scalar_quantizer",
    "faiss_binary_flat",
    "usearch_native",
    "default_references",
    "require",
    "usearch_results",
]

SearchFn = Callable[[np.ndarray, int], np.ndarray]  # (queries (Q, d) float32, k) -> ids (Q, k) int64, -1 = none

# FAISS ScalarQuantizer types run by default_references (those this faiss build lacks are skipped).
FAISS_SQ_TYPES: tuple[str, ...] = ("QT_fp16", "QT_bf16", "QT_8bit", "QT_8bit_uniform", "QT_6bit", "QT_4bit",
                                   "QT_4bit_uniform")
# usearch scalar kinds run by default_references -> bytes per component.
USEARCH_DTYPES: dict[str, float] = {"f16": 2.0, "bf16": 2.0, "i8": 1.0}


@dataclass(frozen=True)
class SearchMethod:
    """One searchable representation of the corpus: a row of the evaluation table.

    Attributes:
        name: label in the table, e.g. ``"faiss SQ QT_8bit"``.
        search: ``search(queries, k) -> ids``: queries (Q, d) float32, ids (Q, k) int64 best first, -1 = none.
        bytes_per_vector: stored bytes per corpus vector (codes and per-vector scales; shared per-dimension
            ranges, codebooks or projections are not counted).
        note: how the method scores and stores, in a few words.
    """

    name: str
    search: SearchFn
    bytes_per_vector: float
    note: str = ""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _vectors(x: np.ndarray, name: str, *, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array, checked: 2-D, finite, non-empty, ``d == dim``."""
    arr = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] < 1 or (arr.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, expected {dim} (the corpus dimension)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _pad(ids: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) int64 with -1 in the columns past ``ids``' own."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    out[:, : min(k, ids.shape[1])] = ids[:, :k]
    return out


def _hits_to_ids(hits: Sequence[Sequence[dict]], k: int) -> np.ndarray:
    """sentence-transformers' ``[[{"corpus_id": i, "score": s}, ...], ...]`` as (Q, k) int64, -1 padded."""
    out = np.full((len(hits), k), -1, dtype=np.int64)
    for row, query_hits in enumerate(hits):
        ids = [int(hit["corpus_id"]) for hit in query_hits[:k]]
        out[row, : len(ids)] = ids
    return out


def require(module: str, pip: str) -> ModuleType:
    """Import an optional dependency (faiss, usearch, qdrant_client, sentence_transformers), or raise ImportError
    naming its pip package (used by the references and by ``export``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError(f"{module} is needed here: pip install {pip}") from err


def usearch_results(matches: Any, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A usearch search result as arrays: keys (Q, K) int64, distances (Q, K) float64 (0 where not found) and
    found (Q, K) bool (False past each query's count). usearch returns ``BatchMatches`` (with ``counts``) for
    several queries and ``Matches`` (its own length, keys trimmed to it) for one (a (1, d) or (d,) query)."""
    batch = hasattr(matches, "counts")
    rows = queries if batch else 1
    keys = np.asarray(matches.keys).reshape(rows, -1).astype(np.int64)
    with np.errstate(invalid="ignore"):  # the padding past a count holds signalling NaNs
        distances = np.asarray(matches.distances, dtype=np.float64).reshape(rows, -1)
    counts = np.asarray(matches.counts).reshape(-1, 1) if batch else np.array([[len(matches)]])
    found = np.arange(keys.shape[1])[None, :] < counts
    return keys, np.where(found, distances, 0.0), found


def _st_quantization() -> ModuleType:
    return require("sentence_transformers.util.quantization", "sentence-transformers")


def _multiplier_label(rescore_multiplier: int | None) -> str:
    if rescore_multiplier is None:
        return ""
    if not isinstance(rescore_multiplier, int) or rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be None or an integer >= 1, got {rescore_multiplier!r}")
    return f" + rescore x{rescore_multiplier}"


# ----------------------------------------------------------------------------------------------------------------
# references


def exact_float32(documents: np.ndarray, *, chunk: int = 1024) -> SearchMethod:
    """Exact inner-product search on the float32 vectors (cosine for unit vectors): the ground truth.

    ``chunk`` queries are scored at a time, so the score matrix stays (chunk, N).
    """
    docs = torch.from_numpy(_vectors(documents, "documents"))  # (N, d)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        q = torch.from_numpy(_vectors(queries, "queries", dim=docs.shape[1]))  # (Q, d)
        parts = [torch.topk(q[s:s + chunk] @ docs.T, min(k, docs.shape[0]), dim=1).indices  # (chunk, k)
                 for s in range(0, q.shape[0], chunk)]
        return _pad(torch.cat(parts).numpy().astype(np.int64), k)

    return SearchMethod(name="float32 exact", search=search, bytes_per_vector=4.0 * docs.shape[1],
                        note="torch matmul + topk")


def st_int8(documents: np.ndarray, *, calibration: np.ndarray, rescore_multiplier: int | None = None
            ) -> SearchMethod:
    """sentence-transformers int8: calibrated ``quantize_embeddings`` + ``semantic_search_usearch`` (module docstring).

    Args:
        documents: corpus (N, d) float32.
        calibration: vectors (C, d) whose per-dimension min / max give the int8 ranges (C >= 2).
        rescore_multiplier: None searches the codes only; m >= 1 rescores ``k * m`` candidates with the float query.
    """
    st = _st_quantization()
    require("usearch.index", "usearch")
    docs = _vectors(documents, "documents")
    calib = _vectors(calibration, "calibration", dim=docs.shape[1])
    if calib.shape[0] < 2:
        raise ValueError("int8 ranges need at least 2 calibration vectors")
    label = _multiplier_label(rescore_multiplier)
    codes = st.quantize_embeddings(docs, precision="int8", calibration_embeddings=calib)  # (N, d) int8
    _, _, index = st.semantic_search_usearch(docs[:1], corpus_embeddings=codes, corpus_precision="int8", top_k=1,
                                             calibration_embeddings=calib, rescore=False, exact=True,
                                             output_index=True)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        q = _vectors(queries, "queries", dim=docs.shape[1])
        hits, _ = st.semantic_search_usearch(q, corpus_index=index, corpus_precision="int8", top_k=int(k),
                                             calibration_embeddings=calib, rescore=rescore_multiplier is not None,
                                             rescore_multiplier=rescore_multiplier or 1, exact=True)
        return _hits_to_ids(hits, k)

    return SearchMethod(name=f"st int8 (usearch i8){label}", search=search, bytes_per_vector=float(docs.shape[1]),
                        note="code-space inner product" + (", dequantised rescoring" if label else ""))


def st_ubinary(documents: np.ndarray, *, rescore_multiplier: int | None = None) -> SearchMethod:
    """sentence-transformers ubinary: ``quantize_embeddings("ubinary")`` + ``semantic_search_faiss`` (Hamming).

    ``rescore_multiplier``: None is the Hamming search alone; m >= 1 rescores ``k * m`` candidates with the float
    query against their {0, 1} bits.
    """
    st = _st_quantization()
    require("faiss", "faiss-cpu")
    docs = _vectors(documents, "documents")
    if docs.shape[1] % 8:
        raise ValueError(f"ubinary needs a dimension divisible by 8, got {docs.shape[1]}")
    label = _multiplier_label(rescore_multiplier)
    codes = st.quantize_embeddings(docs, precision="ubinary")  # (N, d / 8) uint8
    _, _, index = st.semantic_search_faiss(docs[:1], corpus_embeddings=codes, corpus_precision="ubinary", top_k=1,
                                           rescore=False, exact=True, output_index=True)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        q = _vectors(queries, "queries", dim=docs.shape[1])
        hits, _ = st.semantic_search_faiss(q, corpus_index=index, corpus_precision="ubinary", top_k=int(k),
                                           rescore=rescore_multiplier is not None,
                                           rescore_multiplier=rescore_multiplier or 1, exact=True)
        return _hits_to_ids(hits, k)

    return SearchMethod(name=f"st ubinary (faiss){label}", search=search, bytes_per_vector=docs.shape[1] / 8,
                        note="Hamming" + (", float query x {0,1} bits rescoring" if label else ""))


def faiss_scalar_quantizer(documents: np.ndarray, *, qtype: str, calibration: np.ndarray) -> SearchMethod:
    """``faiss.IndexScalarQuantizer`` of type ``qtype`` (``"QT_8bit"``, ``"QT_fp16"``, ...), inner product,
    trained on ``calibration`` (per-dimension min / max), searched exactly with the float query."""
    faiss = require("faiss", "faiss-cpu")
    docs = _vectors(documents, "documents")
    calib = _vectors(calibration, "calibration", dim=docs.shape[1])
    code = getattr(faiss.ScalarQuantizer, qtype, None) if qtype.startswith("QT_") else None
    if not isinstance(code, int):
        known = sorted(n for n in dir(faiss.ScalarQuantizer) if n.startswith("QT_") and n != "QT_count")
        raise ValueError(f"unknown FAISS scalar quantizer type {qtype!r}; this faiss has {', '.join(known)}")
    index = faiss.IndexScalarQuantizer(docs.shape[1], code, faiss.METRIC_INNER_PRODUCT)
    index.train(calib)
    index.add(docs)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        _, ids = index.search(_vectors(queries, "queries", dim=docs.shape[1]), int(k))
        return ids.astype(np.int64)

    return SearchMethod(name=f"faiss SQ {qtype}", search=search, bytes_per_vector=float(index.sa_code_size()),
                        note="decoded codes x float query")


def faiss_binary_flat(documents: np.ndarray) -> SearchMethod:
    """``faiss.IndexBinaryFlat`` on ``packbits(x > 0)``, queries binarised the same way: exact Hamming search
    (the same ranking as ``st_ubinary`` without rescoring)."""
    faiss = require("faiss", "faiss-cpu")
    docs = _vectors(documents, "documents")
    if docs.shape[1] % 8:
        raise ValueError(f"IndexBinaryFlat needs a dimension divisible by 8, got {docs.shape[1]}")
    index = faiss.IndexBinaryFlat(docs.shape[1])
    index.add(np.packbits(docs > 0, axis=1))

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        q = _vectors(queries, "queries", dim=docs.shape[1])
        _, ids = index.search(np.packbits(q > 0, axis=1), int(k))
        return ids.astype(np.int64)

    return SearchMethod(name="faiss IndexBinaryFlat", search=search, bytes_per_vector=docs.shape[1] / 8,
                        note="Hamming, no rescoring")


def usearch_native(documents: np.ndarray, *, dtype: str, threads: int = 0) -> SearchMethod:
    """usearch ``Index(metric="cos", dtype=dtype)`` with its own float32 -> ``dtype`` cast (i8: 127 * x / |x|),
    searched exactly (``exact=True``) with ``threads`` workers (0 = all cores)."""
    if dtype not in USEARCH_DTYPES:
        raise ValueError(f"usearch dtype must be one of {', '.join(USEARCH_DTYPES)}, got {dtype!r}")
    index_module = require("usearch.index", "usearch")
    docs = _vectors(documents, "documents")
    index = index_module.Index(ndim=docs.shape[1], metric="cos", dtype=dtype)
    index.add(np.arange(docs.shape[0]), docs, threads=threads)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        _check_k(k)
        q = _vectors(queries, "queries", dim=docs.shape[1])
        ids, _, found = usearch_results(index.search(q, int(k), exact=True, threads=threads), q.shape[0])
        return _pad(np.where(found, ids, -1), k)

    return SearchMethod(name=f"usearch {dtype}", search=search,
                        bytes_per_vector=USEARCH_DTYPES[dtype] * docs.shape[1], note="cosine, exact search")


def default_references(
    documents: np.ndarray, *, calibration: np.ndarray, rescore_multipliers: Sequence[int] = (1, 2, 4, 10),
    threads: int = 0,
) -> list[SearchMethod]:
    """Every reference of the benchmark on the same vectors (float32 exact not included):
    FAISS SQ types (``FAISS_SQ_TYPES`` this faiss has), usearch ``USEARCH_DTYPES``, sentence-transformers int8
    without rescoring and with x2 and x4, FAISS IndexBinaryFlat (= ubinary without rescoring) and
    sentence-transformers ubinary with each of ``rescore_multipliers``.
    """
    faiss = require("faiss", "faiss-cpu")
    methods = [faiss_scalar_quantizer(documents, qtype=qt, calibration=calibration)
               for qt in FAISS_SQ_TYPES if hasattr(faiss.ScalarQuantizer, qt)]
    methods += [usearch_native(documents, dtype=dt, threads=threads) for dt in USEARCH_DTYPES]
    methods += [st_int8(documents, calibration=calibration, rescore_multiplier=m) for m in (None, 2, 4)]
    methods.append(faiss_binary_flat(documents))
    methods += [st_ubinary(documents, rescore_multiplier=m) for m in rescore_multipliers]
    return methods
