"""Exports to FAISS, usearch and Qdrant (local mode): each exported index is searched and its top k compared with
the store's own scores. Stores hold deleted vectors and ids that are not 0..N-1, so the ids must survive.

"Exact up to ties" below means: every returned id carries the store's score for that id (within float rounding),
and the returned scores are the k largest of the store's scores (so only the order among equal scores may differ).
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from polyquant.plugins.embeddings.configs import (
    BFloat16Config,
    BinaryConfig,
    EmbeddingConfig,
    Float16Config,
    FP8E4M3Config,
    FP8E5M2Config,
    Int4Config,
    Int8Config,
    UInt8Config,
)
from polyquant.plugins.embeddings.data import example_vectors
from polyquant.plugins.embeddings.metrics import overlap_at_k
from polyquant.plugins.embeddings.store import EmbeddingStore

faiss = pytest.importorskip("faiss")
usearch_index = pytest.importorskip("usearch.index")
qdrant_client = pytest.importorskip("qdrant_client")

from polyquant.plugins.embeddings.export import ExportedIndex, to_faiss, to_qdrant, to_usearch  # noqa: E402

D, N, K = 64, 500, 10
X = example_vectors(N, D, clusters=24, seed=0)
_G = torch.Generator().manual_seed(5)
Q = X[torch.randint(0, N, (12,), generator=_G)] + 0.1 * torch.randn(12, D, generator=_G)
Q = Q / Q.norm(dim=1, keepdim=True)
DELETED = torch.tensor([1003, 1030, 1303])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    faiss.omp_set_num_threads(1)


def _store(config: EmbeddingConfig) -> EmbeddingStore:
    store = EmbeddingStore.fit(X[:300], config=config, chunk_size=128)  # chunks that do not divide N
    store.add(X, ids=torch.arange(N) * 3 + 1000)
    store.delete(DELETED)
    return store


def _centred_store(config: BinaryConfig) -> EmbeddingStore:
    """``_store`` for centred binary codes, built from its parts (``EmbeddingStore.fit`` does not pass ``center``
    on to ``fit_codec`` yet)."""
    from polyquant.plugins.embeddings.formats import fit_codec
    from polyquant.plugins.embeddings.reduce import fit_reducer
    from polyquant.plugins.embeddings.store import unit_rows

    calibration = unit_rows(X[:300], "calibration", D)
    reducer = fit_reducer(calibration, config.reduce, config.reduced_dim(D), seed=config.seed)
    codec = fit_codec(reducer.documents(calibration), "binary", center=config.center)
    store = EmbeddingStore(config=config, reducer=reducer, codec=codec, chunk_size=128)
    store.add(X, ids=torch.arange(N) * 3 + 1000)
    store.delete(DELETED)
    assert store.codec.centred
    return store


def _code_scores(store: EmbeddingStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's scores on its codes (Q, live) (what ``search(rescore=1)`` ranks by) and the live ids."""
    return store(Q), store.ids()


def _dequantized_scores(store: EmbeddingStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The float query against the decoded codes (Q, live), and the live ids."""
    t = store.tensors()
    live = t["live"]
    row_scale = t["row_scale"][live] if "row_scale" in t else None
    prep = store.codec.prepare(*store.reducer.queries(Q))
    return store.codec.dequantized_scores(prep, t["codes"][live], row_scale), t["ids"][live]


def _assert_top_k(scores: np.ndarray, ids: np.ndarray, want: tuple[torch.Tensor, torch.Tensor], atol: float) -> None:
    """Exact up to ties (module docstring) against the (Q, live) score matrix ``want`` with its ids."""
    matrix, live_ids = want
    column = {int(i): c for c, i in enumerate(live_ids.tolist())}
    assert not set(DELETED.tolist()) & set(ids.reshape(-1).tolist())
    expected = torch.stack([matrix[q, [column[int(i)] for i in row]] for q, row in enumerate(ids.tolist())])
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=atol)  # each id carries its score
    top = torch.topk(matrix, ids.shape[1], dim=1).values
    np.testing.assert_allclose(scores, top.numpy(), rtol=0, atol=atol)  # ... and they are the k best


def _overlap(ids: np.ndarray, other: torch.Tensor) -> float:
    return float(overlap_at_k(ids, other, ids.shape[1]).mean())


# --- FAISS --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, qtype", [
    (Float16Config(), "QT_fp16"), (BFloat16Config(reduce="truncate", keep=0.5), "QT_bf16"),
    (Int8Config(), "QT_8bit"), (Int8Config(reduce="pca", keep=0.5), "QT_8bit"), (UInt8Config(), "QT_8bit"),
    (Int4Config(reduce="random", dims=47), "QT_4bit"),  # an odd dimension: the last byte holds one code
], ids=["fp16", "bf16-truncate", "int8", "int8-pca", "uint8", "int4-random-odd"])
def test_faiss_scalar_quantizer_holds_the_codes(config: EmbeddingConfig, qtype: str) -> None:
    store = _store(config)
    exported = to_faiss(store)
    assert isinstance(exported, ExportedIndex) and exported.count == len(store) == N - 3
    sq = faiss.downcast_index(exported.index.index)
    assert isinstance(sq, faiss.IndexScalarQuantizer) and sq.sq.qtype == getattr(faiss.ScalarQuantizer, qtype)
    assert sq.sa_code_size() == store.codec.code_bytes()  # the store's bytes per vector: nothing was widened
    t = store.tensors()
    codes = faiss.vector_to_array(sq.codes).reshape(sq.ntotal, -1)
    if config.FORMAT == "int8":  # c + 128
        assert np.array_equal(codes.view(np.int8) ^ np.int8(-128), t["codes"][t["live"]].numpy())
    else:
        assert np.array_equal(codes, t["codes"][t["live"]].contiguous().view(torch.uint8).numpy())  # byte for byte
    # FAISS decodes exactly what the store decodes (its vmin / vdiff are the codec's cells)
    decoded = store.codec.decode(t["codes"][t["live"]])
    np.testing.assert_allclose(sq.reconstruct_n(0, sq.ntotal), decoded.numpy(), rtol=0, atol=1e-6)
    scores, ids = exported.search(Q, K)
    # FAISS scores the float query against the decoded codes: the store's dequantized scores, exact up to ties
    atol = 2e-5
    if config.FORMAT == "bfloat16":
        # ... in float32 (1.8e-7 off here), or in bf16 arithmetic where the CPU has it (AVX-512 BF16: the query is
        # rounded to bf16, up to 7.9e-4 off on such a Xeon). bf16 keeps 8 significant bits: each q_d moves by at most
        # 2^-8 |q_d|, so a score moves by at most 2^-8 sum_d |q_d x_d|, plus float32 accumulation over the D'
        # terms (D' 2^-24 of the same sum). Here sum_d |q_d x_d| <= 0.89: atol ~3.5e-3.
        q = store.reducer.queries(Q)[0]
        atol = (2**-8 + q.shape[1] * 2**-24) * float((q.abs() @ decoded.abs().T).max())
    _assert_top_k(scores, ids, _dequantized_scores(store), atol=atol)
    if config.FORMAT == "float16":  # the store scores float16 codes exactly, and so does FAISS: the same search
        want_scores, want_ids = store.search(Q, K, rescore=1)
        assert ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=2e-6)
    elif config.FORMAT == "bfloat16":  # the store scores the codes exactly: the same search, up to atol
        want_scores, want_ids = store.search(Q, K, rescore=1)
        np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=atol)
        # scores off by <= atol can only reorder near-ties: every id that beats the store's k-th score by more
        # than 2 atol is found (97 of the 120 here)
        for row, want_row, want_ids_row in zip(ids.tolist(), want_scores.tolist(), want_ids.tolist()):
            assert {i for i, v in zip(want_ids_row, want_row) if v > want_row[-1] + 2 * atol} <= set(row)
    else:  # the store's search rounds the query to int8 first: the same neighbours bar a few near-ties
        assert _overlap(ids, store.search(Q, K, rescore=1)[1]) >= 0.9  # measured 1.0 on these queries
    again = faiss.deserialize_index(faiss.serialize_index(exported.index))  # a plain FAISS index, saved and read
    assert np.array_equal(again.search(exported.queries(Q), K)[1], ids)


def test_faiss_binary_is_the_stores_hamming_search() -> None:
    store = _store(BinaryConfig(reduce="pca", dims=40))
    exported = to_faiss(store)
    assert isinstance(exported.index, faiss.IndexBinaryIDMap) and exported.query == "bits"
    assert exported.index.index.code_size == store.codec.code_width == 5
    scores, ids = exported.search(Q, K)
    _assert_top_k(scores, ids, _code_scores(store), atol=0)  # Hamming: exact integers, (D' - 2 h) / D'
    dist, _ = exported.index.search(exported.queries(Q), K)
    np.testing.assert_array_equal(scores, ((40 - 2 * dist) / 40).astype(np.float32))
    want_scores, _ = store.search(Q, K, rescore=1)
    np.testing.assert_array_equal(scores, want_scores.numpy())


def test_centred_binary_exports_are_the_stores_hamming_search() -> None:
    store = _centred_store(BinaryConfig(center=True))
    want_scores, want_ids = store.search(Q, K, rescore=1)
    for exported in (to_faiss(store), to_usearch(store, threads=1)):
        assert exported.query == "bits"
        np.testing.assert_array_equal(exported.queries(Q), store.codec.prepare(Q, torch.zeros(len(Q))).bits)
        scores, ids = exported.search(Q, K)
        _assert_top_k(scores, ids, _code_scores(store), atol=0)  # Hamming: exact integers, (D' - 2 h) / D'
        np.testing.assert_array_equal(scores, want_scores.numpy())
    assert to_faiss(store).search(Q, K)[1].tolist() == want_ids.tolist()  # FAISS breaks ties like the store


def test_faiss_dequantized_fp8_is_an_exact_flat_index() -> None:
    store = _store(FP8E4M3Config(reduce="pca", keep=0.5))  # vector scales, PCA offsets
    with pytest.raises(ValueError, match="FAISS has no format for fp8_e4m3 \\(scale vector\\) codes: .*dequantize"):
        to_faiss(store)
    exported = to_faiss(store, dequantize=True)
    assert isinstance(faiss.downcast_index(exported.index.index), faiss.IndexFlatIP)
    scores, ids = exported.search(Q, K)
    want_scores, want_ids = store.search(Q, K, rescore=1)  # fp8 codes are scored exactly (float32) by the store
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=2e-6)


# --- usearch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [Int8Config(), UInt8Config(reduce="pca", keep=0.5), BinaryConfig()],
                         ids=["int8", "uint8-pca", "binary"])
def test_usearch_integer_and_binary_kinds_rank_as_the_store(config: EmbeddingConfig) -> None:
    store = _store(config)
    exported = to_usearch(store, threads=1)
    index = exported.index
    assert len(index) == N - 3 and str(index.dtype) == ("ScalarKind.B1" if config.FORMAT == "binary" else
                                                        "ScalarKind.I8")
    scores, ids = exported.search(Q, K)
    if config.FORMAT == "binary":  # b1 = the store's Hamming search
        _assert_top_k(scores, ids, _code_scores(store), atol=1e-6)
        np.testing.assert_allclose(scores, store.search(Q, K, rescore=1)[0].numpy(), rtol=0, atol=1e-6)
        return
    # i8 ip on the codes with the codec's int8 query codes: the codes' scores with the query rounded (the store's
    # CUDA int8 GEMM); the store's CPU search uses the float query, within the rounding bound of that
    t = store.tensors()
    codes = store.codec.gemm_codes(t["codes"][t["live"]]).float()  # (live, D')
    prep = store.codec.prepare(*store.reducer.queries(Q), query_codes=True)
    rounded = prep.bias[:, None] + prep.qscale * (prep.qcodes.float() @ codes.T)
    _assert_top_k(scores, ids, (rounded, t["ids"][t["live"]]), atol=1e-6)
    bound = float((prep.qscale / 2 * codes.abs().sum(dim=1)[None, :]).max()) + 1e-6
    np.testing.assert_allclose(scores, store.search(Q, K, rescore=1)[0].numpy(), rtol=0, atol=2 * bound)


@pytest.mark.parametrize("config, kind", [(Float16Config(), "F16"), (BFloat16Config(reduce="pca", keep=0.75), "BF16")],
                         ids=["f16", "bf16-pca"])
def test_usearch_16_bit_floats_hold_the_codes(config: EmbeddingConfig, kind: str) -> None:
    store = _store(config)
    exported = to_usearch(store, threads=1)
    assert str(exported.index.dtype) == f"ScalarKind.{kind}"
    t = store.tensors()
    live_ids = t["ids"][t["live"]]
    stored = np.stack(exported.index.get(live_ids.numpy().astype(np.uint64), dtype="f32"))
    np.testing.assert_array_equal(stored, t["codes"][t["live"]].float().numpy())  # the codes, bit for bit
    # usearch casts the query to 16 bits: per component 2^-11 (f16) / 2^-8 (bf16) relative, so a score moves by
    # at most that times sum |q_d x_d| <= |q| |x| ~ 1: 5e-4 / 4e-3
    atol = 5e-4 if kind == "F16" else 4e-3
    scores, ids = exported.search(Q, K)
    matrix, live = _code_scores(store)
    column = {int(i): c for c, i in enumerate(live.tolist())}
    expected = torch.stack([matrix[q, [column[int(i)] for i in row]] for q, row in enumerate(ids.tolist())])
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=atol)
    # with the query already on the 16-bit grid the cast is exact: scores are the dot products with the codes
    native = torch.from_numpy(exported.queries(Q)).to(torch.float16 if kind == "F16" else torch.bfloat16).float()
    matches = exported.index.search(native.numpy(), K, exact=True, threads=1)
    rows = [[column[int(key)] for key in keys] for keys in matches.keys]
    codes = t["codes"][t["live"]].float()  # (live, D')
    want = torch.stack([native[q] @ codes[r].T for q, r in enumerate(rows)])
    np.testing.assert_allclose(1 - matches.distances, want.numpy(), rtol=0, atol=2e-6)
    assert _overlap(ids, store.search(Q, K, rescore=1)[1]) >= (0.98 if kind == "F16" else 0.9)  # near-ties only


def test_usearch_refuses_formats_it_cannot_hold() -> None:
    for config, what in [(Int4Config(), "int4 codes: it has no 4-bit kind"),
                         (FP8E5M2Config(scale="dimension"), "fp8_e5m2 \\(scale dimension\\) codes: its e4m3 / e5m2")]:
        store = _store(config)
        with pytest.raises(ValueError, match=f"usearch has no format for {what}"):
            to_usearch(store, threads=1)
        scores, ids = to_usearch(store, dequantize=True, threads=1).search(Q, K)  # the escape hatch: decoded float32
        _assert_top_k(scores, ids, _dequantized_scores(store), atol=2e-5)
    negative = EmbeddingStore.fit(X[:300], config=Int8Config())
    negative.add(X[:10], ids=torch.arange(-5, 5))
    with pytest.raises(ValueError, match="usearch keys must be >= 0: the store has negative ids"):
        to_usearch(negative)
    with pytest.raises(ValueError, match="the store is empty: nothing to export to usearch"):
        to_usearch(EmbeddingStore.fit(X[:300], config=Int8Config()))


# --- Qdrant -------------------------------------------------------------------------------------------------------


def _recording_client(path: Path | None = None) -> tuple[object, list[dict]]:
    """A local-mode client whose ``create_collection`` calls are recorded (the config a server would get)."""
    client = qdrant_client.QdrantClient(":memory:" if path is None else None, path=None if path is None
                                        else str(path))
    calls: list[dict] = []
    create = client.create_collection

    def recorded(**kwargs: object) -> bool:
        calls.append(kwargs)
        return create(**kwargs)

    client.create_collection = recorded  # type: ignore[method-assign]
    return client, calls


def _qdrant_search(exported: ExportedIndex) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():  # local mode: "search_params has no effect" (see the next test)
        warnings.filterwarnings("ignore", message="Local mode performs exact")
        return exported.search(Q, K)


def test_qdrant_local_mode_ignores_quantization_and_searches_exactly() -> None:
    """What the spec asked to check: qdrant-client's local mode drops the datatype and the quantization config,
    and searches the uploaded float vectors exactly."""
    from qdrant_client import models

    store = _store(Int8Config(rescore=3))
    client, calls = _recording_client()
    exported = to_qdrant(store, client, "docs")
    sent = calls[0]
    assert sent["vectors_config"].distance == models.Distance.DOT and sent["vectors_config"].on_disk is True
    scalar = sent["quantization_config"].scalar
    assert (scalar.type, scalar.quantile, scalar.always_ram) == (models.ScalarType.INT8, 0.99, True)
    assert exported.search_params.quantization == models.QuantizationSearchParams(rescore=True, oversampling=3.0)
    info = client.get_collection("docs")
    assert info.config.quantization_config is None and info.points_count == N - 3  # not applied locally
    with pytest.warns(UserWarning, match="Local mode performs exact \\(brute-force\\) search"):
        scores, ids = exported.search(Q, K)
    _assert_top_k(scores, ids, _dequantized_scores(store), atol=2e-5)  # exact float search of the decoded codes


def test_qdrant_float16_collection_is_the_stores_search(tmp_path: Path) -> None:
    from qdrant_client import models

    store = _store(Float16Config(reduce="pca", keep=0.5))
    client, calls = _recording_client(tmp_path / "qdrant")  # on-disk local mode, as a user would keep it
    exported = to_qdrant(store, client, "docs")
    assert calls[0]["vectors_config"].datatype == models.Datatype.FLOAT16 and calls[0]["quantization_config"] is None
    assert exported.search_params is None
    scores, ids = _qdrant_search(exported)
    want_scores, want_ids = store.search(Q, K, rescore=1)
    assert ids.tolist() == want_ids.tolist()  # fp16 values are exact in float32: the same scores, PCA offset added
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="Qdrant collection 'docs' exists already"):
        to_qdrant(store, client, "docs")
    assert client.count("docs").count == N - 3  # the failed export left it as it was
    client.close()


@pytest.mark.parametrize("centred", [False, True], ids=["sign", "centred"])
def test_qdrant_binary_collection_rescored_like_the_store(centred: bool) -> None:
    from qdrant_client import models

    from polyquant.kernels import pack_binary

    store = _centred_store(BinaryConfig(rescore=4, center=True)) if centred else _store(BinaryConfig(rescore=4))
    client, calls = _recording_client()
    exported = to_qdrant(store, client, "bits")
    assert calls[0]["quantization_config"].binary.always_ram is True
    assert exported.search_params.quantization == models.QuantizationSearchParams(rescore=True, oversampling=4.0)
    points = client.retrieve("bits", ids=[1000, 1006], with_vectors=True)
    t = store.tensors()
    stored = torch.tensor([p.vector for p in points])
    assert torch.equal(pack_binary(stored > 0), t["codes"][[0, 2]])  # Qdrant's bits (x > 0) are the store's codes
    torch.testing.assert_close(stored.abs(), store.codec.step.expand(2, -1), rtol=0, atol=0)  # sign * magnitude
    # locally every point is "rescored": the store's rescoring against the decoded codes with every candidate
    scores, ids = _qdrant_search(exported)
    want_scores, want_ids = store.search(Q, K, rescore=N)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=2e-6)


def test_qdrant_refuses_formats_it_cannot_hold() -> None:
    client, _ = _recording_client()
    for config, fmt in [(BFloat16Config(), "bfloat16"), (FP8E4M3Config(), "fp8_e4m3 \\(scale vector\\)")]:
        with pytest.raises(ValueError, match=f"Qdrant has no format for {fmt} codes: its datatypes are"):
            to_qdrant(_store(config), client, "x")
    assert not client.collection_exists("x")
    store = _store(BFloat16Config())
    scores, ids = _qdrant_search(to_qdrant(store, client, "x", dequantize=True))
    _assert_top_k(scores, ids, _dequantized_scores(store), atol=2e-5)


def test_k_beyond_the_exported_vectors_pads() -> None:
    store = EmbeddingStore.fit(X[:300], config=Int8Config())
    store.add(X[:4])
    scores, ids = to_faiss(store).search(Q[:2], 6)
    assert ids[:, 4:].tolist() == [[-1, -1]] * 2 and np.isneginf(scores[:, 4:]).all()
    assert sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="queries must be float vectors \\(N, 64\\)"):
        to_faiss(store).search(Q[:, :8], 3)


def test_a_memory_mapped_store_exports_the_same(tmp_path: Path) -> None:
    store = _store(UInt8Config(reduce="pca", keep=0.5))
    mapped = EmbeddingStore.load(store.save(tmp_path / "s.pqs"), mmap=True)
    for export in (to_faiss, partial(to_usearch, threads=1)):
        want, got = export(store).search(Q, K), export(mapped).search(Q, K)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


@pytest.mark.parametrize("config", [Int8Config(), Float16Config(), BinaryConfig()], ids=["int8", "float16", "binary"])
def test_every_export_searches_one_query_as_a_row_or_a_vector(config: EmbeddingConfig) -> None:
    """A single query, (1, D) or (D,), gives the first row of the batch search (usearch answers one query with
    ``Matches``, not ``BatchMatches``), also when k exceeds the exported vectors."""
    store = _store(config)
    client = qdrant_client.QdrantClient(":memory:")
    for exported in (to_faiss(store), to_usearch(store, threads=1), to_qdrant(store, client, "one")):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Local mode performs exact")
            scores, ids = exported.search(Q[:3], K)
            for query in (Q[:1], Q[0], Q[0].numpy()):
                one_scores, one_ids = exported.search(query, K)
                assert one_ids.shape == (1, K) and one_ids.tolist() == ids[:1].tolist(), exported.engine
                np.testing.assert_allclose(one_scores, scores[:1], rtol=0, atol=1e-6)
    small = EmbeddingStore.fit(X[:300], config=config)
    small.add(X[:4])
    for exported in (to_faiss(small), to_usearch(small, threads=1)):
        one_scores, one_ids = exported.search(Q[0], 6)
        assert sorted(one_ids[0, :4].tolist()) == [0, 1, 2, 3] and one_ids[0, 4:].tolist() == [-1, -1]
        assert np.isneginf(one_scores[0, 4:]).all() and np.isfinite(one_scores[0, :4]).all()
