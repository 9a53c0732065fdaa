"""Export an ``EmbeddingStore`` to the engines users serve with: FAISS, usearch and a Qdrant collection.

    from polyquant.plugins.embeddings.export import to_faiss, to_qdrant, to_usearch

    exported = to_faiss(store)                        # faiss.IndexIDMap over an IndexScalarQuantizer: our codes
    scores, ids = exported.search(queries, 10)        # (Q, D) float queries: normalised and reduced on the way
    faiss.write_index(exported.index, "docs.faiss")   # the engine's own object, ready to save or serve
    native = exported.queries(queries)                # what the engine's own search takes (see ``query``)

    exported = to_usearch(store)                      # usearch.index.Index, keys = our ids
    exported = to_qdrant(store, QdrantClient(":memory:"), "docs")                      # tests: embedded local mode
    exported = to_qdrant(store, QdrantClient(url="http://qdrant:6333", api_key=key), "docs")   # a server / cluster

Each engine gets the store's codes where it can hold them without dequantizing (the codes are copied byte for
byte; only the engine's own parameters are set to match the store's codec), and only the live vectors, keyed by
the store's ids (FAISS ``IndexIDMap`` / ``IndexBinaryIDMap``, usearch keys, Qdrant point ids; usearch and Qdrant
need ids >= 0). Where an engine has no matching format the export raises ``ValueError`` saying so; with
``dequantize=True`` any store is exported as its decoded float32 vectors instead (4 bytes per dimension: not a
native format, the escape hatch). The store's original vectors (``keep_originals``) are not exported.

| format     | FAISS                                   | usearch                       | Qdrant                       |
|------------|-----------------------------------------|-------------------------------|------------------------------|
| float16    | IndexScalarQuantizer QT_fp16            | f16, ip                       | datatype float16, exact      |
| bfloat16   | IndexScalarQuantizer QT_bf16            | bf16, ip                      | - (no bfloat16 datatype)     |
| fp8_*      | - (no fp8 quantizer type)               | - (fp8 kinds cast the query   | - (no fp8 datatype)          |
|            |                                         | to fp8 too; no scales)        |                              |
| int8       | QT_8bit: vmin = -128.5 step,            | i8, ip; the query as the      | Qdrant int8 quantization of  |
|            | vdiff = 255 step, codes c + 128         | codec's int8 query codes      | the decoded, rescored        |
| uint8      | QT_8bit: vmin = min, vdiff = 255 step   | i8, ip: codes c - 128         | as int8                      |
| int4       | QT_4bit: vmin = min, vdiff = 15 step    | - (no 4-bit kind)             | as int8                      |
| binary     | IndexBinaryFlat, Hamming                | b1, hamming                   | Qdrant binary quantization   |
|            |                                         |                               | of the decoded, rescored     |
| dequantize | IndexFlatIP, decoded float32            | f32, ip, decoded              | datatype float32, decoded    |

(min = the codec's per-dimension lower edge, offset - step / 2.) FAISS decodes vmin + (c + 0.5) / (2^b - 1) *
vdiff, which with those parameters is exactly the store's decode (``formats``), so FAISS ranks by the float query
against the dequantized codes (``Codec.dequantized_scores``), as the store's own CPU search does (its CUDA int8 GEMM
quantizes the query to int8 first, so there the two agree up to that rounding). usearch's i8 with the ``ip`` metric
takes int8 arrays as they are (no normalisation: that is its float -> i8 cast, used for ``cos``) and scores the raw
integer dot product of the codec's int8 query codes (``Codec.prepare(query_codes=True)``): the store's CUDA int8
GEMM score up to the per-query scale, and its CPU score up to the query's rounding. usearch's f16 / bf16 cast the
float query to 16 bits; its fp8 kinds would cast the query to fp8 (a unit query underflows E4M3) and cannot hold the
store's scales, hence no fp8. Binary codes keep their bit layout (``kernels.pack_binary``);
queries are packed the same way (``Codec.prepare``: the bits of q, also for centred codes), so Hamming distances
are the store's.

Qdrant holds float vectors and quantizes them itself: its int8 is one range for all dimensions (``quantile``),
its binary is the sign bits (x > 0). So the collection stores the store's decoded vectors (for binary, sign times
the per-dimension magnitude, without the centre mu of centred codes: its bits are exactly the store's codes, and
q . mu, the same for every vector, is added back to the scores), ``on_disk``, with Qdrant's int8 or binary
quantization kept in RAM, and searches with ``oversampling`` = the store's ``rescore`` and ``rescore=True``
(rescoring against the stored decoded vectors: the store's own rescoring). float16 stores go to a float16
collection as they are, without quantization. **Qdrant's embedded local mode (``QdrantClient(":memory:")`` or
``path=``) ignores the datatype, the quantization config and the quantization search parameters** (qdrant-client
1.20 keeps float32 numpy arrays and searches them exactly, warning that search params have no effect): in tests
a collection searches the uploaded vectors exactly. The same code against a server (``QdrantClient(url=...)``)
creates the quantized collection.

``ExportedIndex.search`` returns scores on the store's scale (the reducer's query offset added back, and q . mu
for a centred binary store in Qdrant; usearch's
i8 distances mapped back through the query's int8 scale; binary as (D' - 2 h) / D') and ids, -1 where the engine
found fewer than k. It searches exactly where the engine offers it (FAISS flat indexes, usearch ``exact=True``,
Qdrant local mode; a Qdrant server uses its HNSW index).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .formats import Codec, PreparedQueries
from .reduce import Reducer
from .references import require, usearch_results
from .store import EmbeddingStore, prepare_queries

__all__ = ["ExportedIndex", "to_faiss", "to_usearch", "to_qdrant"]

QueryKind = Literal["float", "int8", "bits"]
_QDRANT_BATCH = 1024  # points per upsert


@dataclass(frozen=True)
class ExportedIndex:
    """An engine's index holding a store's vectors, and how queries reach it.

    Args:
        engine: "faiss", "usearch" or "qdrant".
        index: the engine's object: a ``faiss.Index``, a ``usearch.index.Index`` or the ``QdrantClient``.
        query: what the engine's search takes (``queries``): "float" (reduced float32 queries (Q, D')), "int8"
            (the store codec's int8 query codes (Q, D')) or "bits" (packed sign bits (Q, ceil(D' / 8)) uint8).
        reducer: the store's reduction (applied to every query).
        codec: the store's codec (the query side of the integer and binary formats).
        count: vectors exported (the store's live vectors).
        note: the mapping, in a few words.
        collection: the Qdrant collection name (None for the other engines).
        search_params: the Qdrant ``SearchParams`` (oversampling, rescoring), or None.
        threads: usearch search threads (0: all cores).
        centred: the engine holds the decoded vectors less the codec's offset (Qdrant binary of a centred store),
            so q . offset is added back to its scores.
    """

    engine: str
    index: Any
    query: QueryKind
    reducer: Reducer
    codec: Codec
    count: int
    note: str
    collection: str | None = None
    search_params: Any = None
    threads: int = 0
    centred: bool = False

    def _prepared(self, queries: Tensor | np.ndarray) -> PreparedQueries:
        return prepare_queries(queries, self.reducer, self.codec, query_codes=self.query == "int8")[1]

    def queries(self, queries: Tensor | np.ndarray) -> np.ndarray:
        """(Q, D) float queries as the engine's search takes them (``query``): unit-normalised, reduced, and for
        "int8" / "bits" encoded like the store encodes its queries."""
        return _engine_queries(self._prepared(queries), self.query)

    def search(self, queries: Tensor | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The engine's top k for each query: (scores (Q, k) float32 on the store's scale, ids (Q, k) int64; -1
        and -inf where it found fewer)."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        prep = self._prepared(queries)
        native = _engine_queries(prep, self.query)
        k_engine = min(k, self.count)
        if self.engine == "faiss":
            raw, ids = self.index.search(native, k_engine)
        elif self.engine == "usearch":
            raw, ids = _usearch_search(self.index, native, k_engine, self.threads)
        else:
            raw, ids = _qdrant_search(self.index, self.collection, native, k_engine, self.search_params)
        scores = self._to_store_scale(np.asarray(raw, dtype=np.float64), prep).astype(np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        missing = ids < 0
        out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(ids), k), -1, dtype=np.int64)
        out_scores[:, :k_engine] = np.where(missing, -np.inf, scores)
        out_ids[:, :k_engine] = ids
        return out_scores, out_ids

    def _to_store_scale(self, raw: np.ndarray, prep: PreparedQueries) -> np.ndarray:
        """Engine scores / distances (Q, k) -> the store's scores."""
        if self.query == "bits":  # Hamming distance h over the padded bits (padding bits are 0 on both sides)
            return (self.codec.dim - 2 * raw) / self.codec.dim
        if self.query == "int8":  # usearch ip distance = 1 - integer dot product
            assert prep.qscale is not None
            return prep.bias.double().numpy()[:, None] + prep.qscale.double().numpy() * (1 - raw)
        if self.engine == "usearch":  # ip distance = 1 - dot
            raw = 1 - raw
        base = prep.bias if self.centred else prep.offset  # bias = offset + q . codec offset (binary formats)
        return base.double().numpy()[:, None] + raw


def _engine_queries(prep: PreparedQueries, kind: QueryKind) -> np.ndarray:
    if kind == "bits":
        assert prep.bits is not None
        return np.ascontiguousarray(prep.bits.cpu().numpy())
    if kind == "int8":
        assert prep.qcodes is not None
        return np.ascontiguousarray(prep.qcodes.cpu().numpy())
    return np.ascontiguousarray(prep.reduced.cpu().numpy(), dtype=np.float32)


def _live_chunks(store: EmbeddingStore, size: int) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """(codes, row scales or None, ids) of the store's live vectors, ``size`` slots at a time (views where all
    are live: a memory-mapped store is read chunk by chunk)."""
    tensors = store.tensors()
    codes, ids, live, row_scale = tensors["codes"], tensors["ids"], tensors["live"], tensors.get("row_scale")
    for start in range(0, len(ids), size):
        stop = min(start + size, len(ids))
        keep = live[start:stop]
        if bool(keep.all()):
            yield codes[start:stop], None if row_scale is None else row_scale[start:stop], ids[start:stop]
        elif bool(keep.any()):
            yield (codes[start:stop][keep], None if row_scale is None else row_scale[start:stop][keep],
                   ids[start:stop][keep])


def _check_exportable(store: EmbeddingStore, engine: str, *, unsigned_ids: bool) -> None:
    if len(store) == 0:
        raise ValueError(f"the store is empty: nothing to export to {engine}")
    if unsigned_ids and any(bool((chunk < 0).any()) for _, _, chunk in _live_chunks(store, store.chunk_size)):
        raise ValueError(f"{engine} keys must be >= 0: the store has negative ids")


def _no_match(engine: str, store: EmbeddingStore, why: str) -> ValueError:
    fmt = store.codec.format + (f" (scale {store.codec.scale})" if store.codec.format.startswith("fp8") else "")
    return ValueError(f"{engine} has no format for {fmt} codes: {why}; pass dequantize=True to export the decoded "
                      "float32 vectors")


# ----------------------------------------------------------------------------------------------------------------
# FAISS


def to_faiss(store: EmbeddingStore, *, dequantize: bool = False) -> ExportedIndex:
    """The store as a FAISS index with its ids (``faiss.IndexIDMap`` / ``IndexBinaryIDMap``; module docstring).

    Args:
        store: a non-empty store.
        dequantize: export the decoded float32 vectors to an ``IndexFlatIP`` (any format) instead of the codes.

    Raises:
        ValueError: the store is empty, or its format has no FAISS counterpart (fp8) and ``dequantize`` is False.
        ImportError: faiss is not installed (``pip install faiss-cpu``).
    """
    faiss = require("faiss", "faiss-cpu")
    _check_exportable(store, "FAISS", unsigned_ids=False)
    codec = store.codec
    if dequantize:
        index = faiss.IndexIDMap(faiss.IndexFlatIP(codec.dim))
        for codes, row_scale, ids in _live_chunks(store, store.chunk_size):
            index.add_with_ids(np.ascontiguousarray(codec.decode(codes, row_scale).numpy()), ids.numpy())
        return ExportedIndex("faiss", index, "float", store.reducer, codec, len(store),
                             "IndexFlatIP of the decoded float32 vectors")
    if codec.format == "binary":
        index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(8 * codec.code_width))
        for codes, _, ids in _live_chunks(store, store.chunk_size):
            index.add_with_ids(np.ascontiguousarray(codes.numpy()), ids.numpy())
        return ExportedIndex("faiss", index, "bits", store.reducer, codec, len(store),
                             "IndexBinaryFlat: the sign bits, Hamming (no rescoring)")
    qtype, trained, code_map = _faiss_scalar_quantizer(faiss, store)
    sq = faiss.IndexScalarQuantizer(codec.dim, qtype, faiss.METRIC_INNER_PRODUCT)
    if trained is not None:
        faiss.copy_array_to_vector(trained, sq.sq.trained)
        sq.is_trained = True
    index = faiss.IndexIDMap(sq)
    for codes, _, ids in _live_chunks(store, store.chunk_size):
        index.add_sa_codes(np.ascontiguousarray(code_map(codes).numpy()), np.ascontiguousarray(ids.numpy()))
    return ExportedIndex("faiss", index, "float", store.reducer, codec, len(store),
                         f"IndexScalarQuantizer {_faiss_name(faiss, qtype)}: the store's codes, decoded x float query")


def _faiss_scalar_quantizer(faiss: ModuleType, store: EmbeddingStore) -> tuple[int, np.ndarray | None, Any]:
    """(quantizer type, trained vmin / vdiff (2 D') or None, codes -> FAISS codes) matching the store's codec."""
    codec = store.codec
    sq = faiss.ScalarQuantizer
    if codec.format == "float16":
        return sq.QT_fp16, None, lambda c: c.contiguous().view(torch.uint8)
    if codec.format == "bfloat16":
        if not hasattr(sq, "QT_bf16"):
            raise _no_match("this FAISS", store, "it has no QT_bf16 (FAISS >= 1.9 has)")
        return sq.QT_bf16, None, lambda c: c.contiguous().view(torch.uint8)
    if codec.format.startswith("fp8"):
        raise _no_match("FAISS", store, "its scalar quantizers have no fp8 type")
    assert codec.step is not None
    step = codec.step.double()
    if codec.format == "int8":  # c in -128..127 -> c + 128; vmin + (c + 128 + 0.5) / 255 * vdiff = c * step
        vmin, vdiff = -128.5 * step, 255 * step
        return sq.QT_8bit, _trained(vmin, vdiff), lambda c: (c ^ -128).view(torch.uint8)  # c + 128 (2's complement)
    assert codec.offset is not None
    vmin = codec.offset.double() - step / 2  # the lower edge of cell 0
    if codec.format == "uint8":
        return sq.QT_8bit, _trained(vmin, 255 * step), lambda c: c
    return sq.QT_4bit, _trained(vmin, 15 * step), lambda c: c  # same nibble layout: low nibble = even dimension


def _trained(vmin: Tensor, vdiff: Tensor) -> np.ndarray:
    return torch.cat([vmin, vdiff]).float().numpy()


def _faiss_name(faiss: ModuleType, qtype: int) -> str:
    return next(n for n in dir(faiss.ScalarQuantizer) if n.startswith("QT_") and getattr(faiss.ScalarQuantizer, n)
                == qtype)


# ----------------------------------------------------------------------------------------------------------------
# usearch


def to_usearch(store: EmbeddingStore, *, dequantize: bool = False, threads: int = 0) -> ExportedIndex:
    """The store as a ``usearch.index.Index`` keyed by its ids (module docstring).

    Args:
        store: a non-empty store with ids >= 0.
        dequantize: export the decoded float32 vectors (``f32``, ``ip``) instead of the codes.
        threads: usearch threads for adding and for ``ExportedIndex.search`` (0: all cores).

    Raises:
        ValueError: the store is empty, has negative ids, or its format has no usearch kind (fp8, int4) and
            ``dequantize`` is False.
        ImportError: usearch is not installed (``pip install usearch``).
    """
    index_module = require("usearch.index", "usearch")
    _check_exportable(store, "usearch", unsigned_ids=True)
    codec = store.codec
    if dequantize:
        kind, metric, query, note = "f32", "ip", "float", "f32 ip of the decoded vectors"
    elif codec.format in ("float16", "bfloat16"):
        kind = "f16" if codec.format == "float16" else "bf16"
        metric, query, note = "ip", "float", f"{kind} ip on the codes (the query cast to {kind})"
    elif codec.format in ("int8", "uint8"):
        kind, metric, query, note = "i8", "ip", "int8", "i8 ip on the codes (int8 query codes)"
    elif codec.format == "binary":
        kind, metric, query, note = "b1", "hamming", "bits", "b1 Hamming on the sign bits (no rescoring)"
    elif codec.format == "int4":
        raise _no_match("usearch", store, "it has no 4-bit kind")
    else:
        raise _no_match("usearch", store, "its e4m3 / e5m2 kinds cast the query to fp8 too and hold no scale")
    ndim = 8 * codec.code_width if query == "bits" else codec.dim
    index = index_module.Index(ndim=ndim, metric=metric, dtype=kind)
    for codes, row_scale, ids in _live_chunks(store, store.chunk_size):
        if dequantize:
            vectors = codec.decode(codes, row_scale).numpy()
        elif query == "int8":
            vectors = codec.gemm_codes(codes).numpy()  # int8 as they are; uint8 as c - 128
        elif codec.format == "bfloat16":
            vectors = codes.float().numpy()  # bf16 values: usearch's cast back to bf16 is exact
        else:
            vectors = codes.numpy()  # float16 as they are; binary: the packed bytes
        index.add(ids.numpy().astype(np.uint64), np.ascontiguousarray(vectors), threads=threads)
    return ExportedIndex("usearch", index, query, store.reducer, codec, len(store), note, threads=threads)


def _usearch_search(index: Any, queries: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    keys, distances, found = usearch_results(index.search(queries, k, exact=True, threads=threads), len(queries))
    return distances, np.where(found, keys, -1)


# ----------------------------------------------------------------------------------------------------------------
# Qdrant


def to_qdrant(store: EmbeddingStore, client: Any, collection: str, *, quantile: float = 0.99,
              dequantize: bool = False) -> ExportedIndex:
    """The store as a new Qdrant collection (module docstring), through ``qdrant-client``.

    Args:
        store: a non-empty store with ids >= 0 (they become the point ids).
        client: a ``qdrant_client.QdrantClient``: ``QdrantClient(":memory:")`` or ``QdrantClient(path=folder)``
            (embedded local mode: no quantization, exact search) or ``QdrantClient(url="http://host:6333",
            api_key=...)`` (a server or cluster: the collection is quantized as the table says).
        collection: name of the collection to create (it must not exist: nothing is overwritten).
        quantile: Qdrant's int8 range quantile (int8 / uint8 / int4 stores).
        dequantize: a float32 collection of the decoded vectors, without quantization (any format).

    Raises:
        ValueError: the store is empty or has negative ids, the collection exists, or the format has no Qdrant
            counterpart (bfloat16, fp8) and ``dequantize`` is False.
        ImportError: qdrant-client is not installed (``pip install qdrant-client``).
    """
    models = require("qdrant_client.models", "qdrant-client")
    _check_exportable(store, "Qdrant", unsigned_ids=True)
    if not 0.5 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0.5, 1], got {quantile!r}")
    codec = store.codec
    quantization, datatype, note = None, models.Datatype.FLOAT32, "float32 decoded vectors, exact"
    if dequantize:
        pass
    elif codec.format == "float16":
        datatype, note = models.Datatype.FLOAT16, "float16 vectors, exact"
    elif codec.format in ("int8", "uint8", "int4"):
        quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=quantile, always_ram=True))
        note = f"decoded vectors on disk, Qdrant int8 (quantile {quantile}) in RAM, rescored"
    elif codec.format == "binary":
        quantization = models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
        note = "decoded vectors on disk, Qdrant binary (the store's bits) in RAM, rescored"
    else:  # bfloat16, fp8
        raise _no_match("Qdrant", store, "its datatypes are float32, float16 and uint8")
    if client.collection_exists(collection):
        raise ValueError(f"Qdrant collection {collection!r} exists already: choose another name or delete it first")
    client.create_collection(
        collection_name=collection,
        vectors_config=models.VectorParams(size=codec.dim, distance=models.Distance.DOT, datatype=datatype,
                                           on_disk=quantization is not None),
        quantization_config=quantization,
    )
    centred = codec.centred and not dequantize  # upload sign * magnitude: Qdrant's bits are the store's codes
    for codes, row_scale, ids in _live_chunks(store, _QDRANT_BATCH):
        if datatype == models.Datatype.FLOAT16:
            vectors = codes.float()
        elif centred:
            assert codec.step is not None
            vectors = codec.values(codes) * codec.step  # decode without the centre mu
        else:
            vectors = codec.decode(codes, row_scale)
        client.upsert(collection_name=collection, wait=True,
                      points=models.Batch(ids=ids.tolist(), vectors=vectors.tolist()))
    params = None
    if quantization is not None:
        params = models.SearchParams(quantization=models.QuantizationSearchParams(
            rescore=True, oversampling=float(store.config.rescore)))
    return ExportedIndex("qdrant", client, "float", store.reducer, codec, len(store), note, collection=collection,
                         search_params=params, centred=centred)


def _qdrant_search(client: Any, collection: str | None, queries: np.ndarray, k: int,
                   params: Any) -> tuple[np.ndarray, np.ndarray]:
    from qdrant_client import models

    requests = [models.QueryRequest(query=q.tolist(), limit=k, params=params) for q in queries]
    scores = np.zeros((len(queries), k))
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for row, response in enumerate(client.query_batch_points(collection_name=collection, requests=requests)):
        for col, point in enumerate(response.points[:k]):
            scores[row, col], ids[row, col] = point.score, int(point.id)
    return scores, ids
