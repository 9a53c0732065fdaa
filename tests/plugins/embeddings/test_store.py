"""EmbeddingStore: top-k against brute force, rescoring, ids / delete / update, memory-mapped building, save / load
(also memory-mapped), sizes, and bad inputs that must leave the store (and its file) as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import polyquant as pq
from polyquant.artifact import Artifact, ArtifactError
from polyquant.artifact import load as load_artifact
from polyquant.artifact import save as save_artifact
from polyquant.config import UsageError
from polyquant.plugins.embeddings.configs import (
    METHODS,
    BinaryConfig,
    EmbeddingConfig,
    Float16Config,
    FP8E4M3Config,
    Int4Config,
    Int8Config,
    UInt8Config,
)
from polyquant.plugins.embeddings.data import example_vectors
from polyquant.plugins.embeddings.store import EmbeddingStore

D = 64
X = example_vectors(600, D, clusters=24, seed=0)
_G = torch.Generator().manual_seed(5)
Q = X[torch.randint(0, 600, (12,), generator=_G)] + 0.1 * torch.randn(12, D, generator=_G)  # near stored vectors
Q = Q / Q.norm(dim=1, keepdim=True)


def _store(config: EmbeddingConfig, n: int = 600, **kwargs: object) -> EmbeddingStore:
    store = EmbeddingStore.fit(X[:400], config=config, chunk_size=97, **kwargs)  # chunks that do not divide N
    store.add(X[:n])
    return store


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)) / truth.numel()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CONFIGS = [cls() for cls in METHODS.values()] + [
    FP8E4M3Config(reduce="pca", keep=0.5), Int8Config(reduce="random", keep=0.75),
    UInt8Config(reduce="truncate", dims=20),
    BinaryConfig(reduce="pca", keep=0.5, rescore=1), Int4Config(keep_originals=True),
]
IDS = [f"{type(c).__name__}-{c.reduce}" for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_search_is_the_top_k_of_the_code_scores(config: EmbeddingConfig) -> None:
    store = _store(config)
    brute = store(Q)  # (Q, N) scores on the codes, storage order = ids 0..N-1
    assert brute.shape == (len(Q), 600)
    scores, ids = store.search(Q, 10, rescore=1)
    want = torch.topk(brute, 10, dim=1)
    torch.testing.assert_close(scores, want.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(brute.gather(1, ids), scores, rtol=0, atol=1e-6)  # the ids carry those scores


def test_binary_search_uses_hamming_ties_to_the_smaller_id() -> None:
    store = _store(BinaryConfig(rescore=1))
    store.add(X[:3].clone())  # ids 600..602: exact duplicates of ids 0..2
    scores, ids = store.search(X[:2], 20, rescore=1)
    assert ids[:, 0].tolist() == [0, 1] and 600 in ids[0].tolist() and 601 in ids[1].tolist()
    for s, i in zip(scores.tolist(), ids.tolist()):  # equal Hamming distances: ascending slots (= ids here)
        assert all(i[j] < i[j + 1] for j in range(len(i) - 1) if s[j] == s[j + 1])


def test_rescoring_improves_recall_of_the_float_neighbours() -> None:
    truth = torch.topk(Q @ X.T, 10).indices
    binary = _store(BinaryConfig())
    plain = _recall(binary.search(Q, 10, rescore=1)[1], truth)
    rescored = _recall(binary.search(Q, 10, rescore=4)[1], truth)
    assert rescored > plain + 0.08, (plain, rescored)  # measured 0.51 -> 0.64 (sign bits of 64 dims)
    assert binary.search(Q, 10)[1].tolist() == binary.search(Q, 10, rescore=4)[1].tolist()  # config default 4x
    # with the original vectors kept, rescoring is exact: with every vector a candidate, the float top 10
    exact = _store(BinaryConfig(keep_originals=True))
    scores, ids = exact.search(Q, 10, rescore=60)
    assert _recall(ids, truth) == 1.0
    torch.testing.assert_close(scores, torch.topk(Q @ X.T, 10).values, rtol=0, atol=1e-5)
    int4 = _store(Int4Config(keep_originals=True))
    assert _recall(int4.search(Q, 10, rescore=1)[1], truth) < _recall(int4.search(Q, 10, rescore=4)[1], truth) == 1


def test_rescoring_against_dequantized_codes_without_originals() -> None:
    store = _store(Int8Config(reduce="pca", keep=0.5))
    scores, ids = store.search(Q, 5, rescore=3)
    prep = store.codec.prepare(*store.reducer.queries(Q))
    codes, _ = store.codec.encode(store.reducer.documents(X))
    want = store.codec.dequantized_scores(prep, codes)  # float query . decoded vectors (+ PCA offset)
    torch.testing.assert_close(scores, want.gather(1, ids), rtol=0, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_ids_delete_update_and_re_add() -> None:
    store = _store(Float16Config(), n=100)
    assert len(store) == 100 and store.ids().tolist() == list(range(100))
    new = store.add(X[100:103], ids=torch.tensor([1000, 7000, 5000]))
    assert new.tolist() == [1000, 7000, 5000]
    assert store.add(X[103:104]).tolist() == [7001]  # default ids continue after the largest
    _, ids = store.search(X[100:101], 1)
    assert ids.tolist() == [[1000]]
    assert store.delete(torch.tensor([1000, 3])) == 2
    assert len(store) == 102 and store.slots == 104
    _, ids = store.search(X[[100, 3]], 5)
    assert 1000 not in ids.tolist()[0] and 3 not in ids.tolist()[1]
    assert store(Q).shape == (len(Q), 102)  # forward skips tombstones too
    store.update(torch.tensor([5]), X[200:201])
    _, ids = store.search(X[200:201], 1)
    assert ids.tolist() == [[5]]
    assert store.add(X[100:101], ids=torch.tensor([1000])).tolist() == [1000]  # a deleted id can come back


def test_bad_inputs_leave_the_store_intact(tmp_path: Path) -> None:
    store = _store(Int8Config(), n=200)
    path = store.save(tmp_path / "s.pqs")
    digest, before = _sha(path), store(Q)
    nan = X[:5].clone()
    nan[3, 1] = float("nan")
    inf = X[:5].clone()
    inf[0, 0] = float("inf")
    cases = [
        (lambda: store.add(X[:5, :10]), "must be float vectors \\(N, 64\\)"),
        (lambda: store.add(torch.cat([X[:150], nan])), "1 vectors contain NaN or Inf \\(first: row 153\\)"),
        (lambda: store.add(inf), "NaN or Inf"),
        (lambda: store.add(torch.zeros(2, D)), "2 vectors are zero"),
        (lambda: store.add(X[:2], ids=torch.tensor([5, 6])), "2 ids are in the store already \\(first: 5\\)"),
        (lambda: store.add(X[:2], ids=torch.tensor([900, 900])), "duplicates"),
        (lambda: store.add(X[:2], ids=torch.tensor([1.0, 2.0])), "ids must be integers"),
        (lambda: store.delete(torch.tensor([3, 12345])), "1 ids are not in the store \\(first: 12345\\)"),
        (lambda: store.update(torch.tensor([3]), nan[3:4]), "NaN or Inf"),
        (lambda: store.update(torch.tensor([3, 4]), X[:1]), "2 ids but 1 vectors"),
        (lambda: store.search(Q[:, :16], 3), "queries must be float vectors \\(N, 64\\)"),
        (lambda: store.search(nan, 3), "queries: 1 vectors contain NaN"),
        (lambda: store.search(Q, 0), "k must be a positive integer"),
        (lambda: store.search(Q, 3, rescore=0), "rescore must be a positive integer"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert len(store) == 200 and store.slots == 200
        assert torch.equal(store(Q), before)
    assert store.add(X[200:201]).tolist() == [200]  # the failed adds did not consume ids
    assert _sha(path) == digest
    empty = EmbeddingStore.fit(X, config=Int8Config())
    with pytest.raises(ValueError, match="the store is empty"):
        empty.search(Q, 3)


def test_k_is_capped_at_the_live_vectors() -> None:
    store = _store(UInt8Config(), n=5)
    store.delete(torch.tensor([0]))
    scores, ids = store.search(Q[:2], 10)
    assert scores.shape == ids.shape == (2, 4) and sorted(ids[0].tolist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("config", [FP8E4M3Config(reduce="pca", keep=0.5), BinaryConfig(keep_originals=True),
                                    Int4Config(reduce="truncate", keep=0.5)], ids=["fp8-pca", "binary", "int4"])
def test_save_load_and_mmap_round_trips(config: EmbeddingConfig, tmp_path: Path) -> None:
    store = _store(config)
    store.delete(torch.tensor([4, 9]))
    path = store.save(tmp_path / "s.pqs")
    digest = _sha(path)
    out = store(Q)
    searched = store.search(Q, 7)
    for loaded in (EmbeddingStore.load(path), EmbeddingStore.load(path, mmap=True), pq.load(path).model):
        assert isinstance(loaded, EmbeddingStore)
        assert torch.equal(loaded(Q), out)
        assert all(torch.equal(a, b) for a, b in zip(loaded.search(Q, 7), searched))
        assert loaded.ids().tolist() == store.ids().tolist() and loaded.slots == 600
        assert loaded.bytes_per_vector() == store.bytes_per_vector()
    mapped = EmbeddingStore.load(path, mmap=True)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the file is mapped, not read
        assert str(path.resolve()) in maps.read_text()
    mapped.delete(torch.tensor([0]))  # copy-on-write: memory changes, the file does not
    mapped.update(torch.tensor([1]), X[50:51])
    assert mapped.add(X[:3]).tolist() == [600, 601, 602]
    assert len(mapped) == 600 and _sha(path) == digest
    assert torch.equal(EmbeddingStore.load(path, mmap=True)(Q), out)


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    other = Artifact(tensors={"w": torch.zeros(2)}, plugin="vit", method="minmax")
    save_artifact(other, tmp_path / "vit.pqs")
    with pytest.raises(ArtifactError, match="not an embedding store \\(plugin 'vit', method 'minmax'\\)"):
        EmbeddingStore.load(tmp_path / "vit.pqs")
    (tmp_path / "v.npy").write_bytes(b"\x93NUMPY" + b"\0" * 100)
    with pytest.raises(ArtifactError, match="v.npy"):
        EmbeddingStore.load(tmp_path / "v.npy", mmap=True)
    # an int8 store file whose manifest claims another format: its tensors do not fit
    path = _store(Int8Config(), n=10).save(tmp_path / "s.pqs")
    art = load_artifact(path)
    art.method = "binary"
    art.config["method"] = BinaryConfig().to_dict()
    save_artifact(art, tmp_path / "wrong.pqs")
    with pytest.raises(ArtifactError, match="not a valid binary embedding store: tensor 'codes' is torch.int8"):
        EmbeddingStore.load(tmp_path / "wrong.pqs")


def test_building_in_a_memory_mapped_workdir(tmp_path: Path) -> None:
    """A small version of benchmarks/embeddings_store.py: chunks into files, save, mmap load, search."""
    ram = EmbeddingStore.fit(X[:400], config=Int8Config())
    disk = EmbeddingStore.fit(X[:400], config=Int8Config(), workdir=tmp_path, chunk_size=256)
    folder = next(tmp_path.glob("pq-store-*"))
    for start in range(0, 3000, 500):  # grows the files past their first 1024 rows in place
        chunk = example_vectors(500, D, clusters=24, seed=10 + start)
        ram.add(chunk)
        disk.add(chunk)
    assert {p.suffix for p in folder.iterdir()} == {".rows"}
    assert sum(p.stat().st_size for p in folder.iterdir()) >= 3000 * (D + 8 + 1)
    assert torch.equal(disk(Q), ram(Q))
    path = disk.save(tmp_path / "big.pqs")
    loaded = EmbeddingStore.load(path, mmap=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(Q, 10), ram.search(Q, 10)))
    disk.close()
    assert not folder.exists() and len(disk) == 0


def test_bytes_per_vector_by_hand() -> None:
    n = 600
    assert _store(Int8Config()).bytes_per_vector() == D + D * 4 / n  # codes + amortised step
    assert _store(UInt8Config()).bytes_per_vector() == D + 2 * D * 4 / n  # + offset
    assert _store(Int4Config()).bytes_per_vector() == D / 2 + 2 * D * 4 / n
    assert _store(BinaryConfig()).bytes_per_vector() == D / 8 + D * 4 / n
    assert _store(FP8E4M3Config()).bytes_per_vector() == D + 4  # + the float32 row scale
    assert _store(Float16Config(keep_originals=True)).bytes_per_vector() == 2 * D + 4 * D
    # PCA to 32 dims, fp8 with a vector scale: codes + scale, then the (32, 64) matrix and the mean amortised
    assert _store(FP8E4M3Config(reduce="pca", keep=0.5)).bytes_per_vector() == 32 + 4 + (32 * D + D) * 4 / n


def test_quantize_builds_a_store_from_a_table() -> None:
    from polyquant.plugins.embeddings.models import EmbeddingTable

    table = EmbeddingTable(vectors=X * 3.0, ids=torch.arange(600) * 2)  # any norm: normalised on the way in
    qm = pq.quantize(table, Float16Config(calib_size=100), calib=[X[:300]], progress=False)
    assert (qm.plugin, qm.method) == ("embeddings", "float16")
    store = qm.model
    assert store.ids().tolist() == (torch.arange(600) * 2).tolist()
    torch.testing.assert_close(store(Q), table(Q), rtol=0, atol=2e-3)  # fp16: ~2^-11 relative per entry
    with pytest.raises(UsageError, match="quantize an EmbeddingTable"):  # the CLI: one line, exit 2
        pq.quantize(torch.nn.Linear(2, 2), Float16Config(), calib=[X], progress=False)


# --- centred binary codes -----------------------------------------------------------------------------------------


def _centred_store(config: BinaryConfig, n: int = 600) -> EmbeddingStore:
    """A store of centred binary codes fitted on the first 400 vectors, holding the first ``n``."""
    store = EmbeddingStore.fit(X[:400], config=config, chunk_size=97)
    store.add(X[:n])
    return store


def test_centred_binary_search_and_rescoring_on_the_codes(tmp_path: Path) -> None:
    store = _centred_store(BinaryConfig(center=True))
    mu = X[:400].mean(dim=0)
    assert store.codec.centred and torch.allclose(store.codec.offset, mu, rtol=0, atol=1e-6)
    # Hamming stage: sign(q) against sign(x - mu), brute force from the floats, ties to the smaller id
    h = ((D - torch.where(Q >= 0, 1.0, -1.0) @ torch.where(X - mu >= 0, 1.0, -1.0).T) / 2).long()  # (Q, N)
    want = torch.sort(h, dim=1, stable=True)
    scores, ids = store.search(Q, 10, rescore=1)
    assert torch.equal(ids, want.indices[:, :10])
    assert torch.equal(scores, (D - 2 * want.values[:, :10]).float() / D)
    # rescoring: the 40 Hamming candidates, ranked by the float query . (mu + sign * m), m = mean |x - mu| over the
    # calibration set and the dimensions (the default uniform magnitude)
    decoded = mu + torch.where(X - mu >= 0, 1.0, -1.0) * (X[:400] - mu).abs().mean()  # (N, D)
    cand = want.indices[:, :40]
    exact = (Q @ decoded.T).gather(1, cand)
    top = torch.sort(exact, dim=1, descending=True, stable=True)
    scores, ids = store.search(Q, 10, rescore=4)
    assert torch.equal(ids, cand.gather(1, top.indices[:, :10]))
    torch.testing.assert_close(scores, top.values[:, :10], rtol=0, atol=1e-5)
    # same bytes per vector as uncentred codes, plus the amortised centre; save / load keep the centring
    assert store.bytes_per_vector() == D / 8 + 2 * D * 4 / 600
    path = store.save(tmp_path / "c.pqs")
    for loaded in (EmbeddingStore.load(path), EmbeddingStore.load(path, mmap=True)):
        assert loaded.codec.centred and loaded.config.center is True
        assert all(torch.equal(a, b) for a, b in zip(loaded.search(Q, 10), store.search(Q, 10)))


def test_old_binary_configs_load_uncentred() -> None:
    old = BinaryConfig().to_dict()
    del old["center"]  # an artifact written before the field existed
    assert BinaryConfig.from_dict(old) == BinaryConfig() and BinaryConfig.VERSION == 1


def test_fit_honours_center() -> None:
    assert _store(BinaryConfig(center=True)).codec.centred


# --- damaged and forged stores (issue 21) -----------------------------------------------------------------------


def _forged(path: Path, out: Path, name: str, index: tuple[int, ...], value: float | int) -> Path:
    """A copy of the store at ``path`` with one entry of tensor ``name`` changed and fresh, valid checksums (only
    the value checks can refuse it)."""
    art = load_artifact(path)
    t = art.tensors[name].clone()
    t[index] = value
    art.tensors[name] = t
    return save_artifact(art, out)


FORGED_CODEC = [("codec.step", v) for v in (float("nan"), 0.0, -0.5, float("inf"), 3e38)] + [
    ("codec.offset", float("nan")), ("codec.offset", 3e38), ("reduce.matrix", float("nan")),
    ("reduce.matrix", float("-inf")), ("reduce.matrix", 3e38), ("reduce.mean", float("nan")),
]


@pytest.mark.parametrize(("name", "value"), FORGED_CODEC, ids=[f"{n}={v}" for n, v in FORGED_CODEC])
def test_forged_codec_and_reduction_tensors_are_refused_at_load(tmp_path: Path, name: str, value: float) -> None:
    path = _store(UInt8Config(reduce="pca", keep=0.5), n=50).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", name, (3,) if name != "reduce.matrix" else (3, 7), value)
    for load in (lambda: EmbeddingStore.load(forged), lambda: EmbeddingStore.load(forged, mmap=True),
                 lambda: EmbeddingStore.load(forged, mmap=True, verify=False)):
        with pytest.raises(ArtifactError, match=f"^{forged}: not a valid uint8 embedding store: {name} must be "
                                                "finite and in .*: 1 entries are not \\(first: entry "):
            load()


def test_codec_step_bounds_are_what_a_fit_gives() -> None:
    """The bounds refuse no fitted codec: the smallest fitted step (a constant calibration dimension) is the fit's
    eps, in float32."""
    x = X[:50].clone()
    x[:, 5] = 0.25  # a dimension with no range: step clamped to eps
    for config in (UInt8Config(), Int4Config(reduce="random", keep=0.5), Int8Config(), BinaryConfig(center=True),
                   FP8E4M3Config(scale="dimension")):
        store = EmbeddingStore.fit(x, config=config)
        assert store.codec.step is not None and bool((store.codec.step > 0).all())


def test_duplicate_live_ids_are_refused_at_load_but_a_deleted_id_may_return(tmp_path: Path) -> None:
    path = _store(Int8Config(), n=20).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", "ids", (3,), 4)
    for mmap in (False, True):
        with pytest.raises(ArtifactError, match=f"^{forged}: .*tensor 'ids' holds 1 live ids more than once "
                                                "\\(first: 4\\)"):
            EmbeddingStore.load(forged, mmap=mmap)
    store = EmbeddingStore.load(path)
    store.delete(torch.tensor([4]))
    store.add(X[30:31], ids=torch.tensor([4]))  # slot 4 (deleted) and slot 20 both hold id 4
    again = EmbeddingStore.load(store.save(tmp_path / "again.pqs"), mmap=True)
    assert sorted(again.ids().tolist()) == list(range(20)) and again.search(X[30:31], 1)[1].item() == 4


@pytest.mark.parametrize("value", [float("nan"), 3e38], ids=["nan", "3e38"])
def test_forged_originals_are_refused_where_rescoring_reads_them(tmp_path: Path, value: float) -> None:
    path = _store(Int8Config(keep_originals=True, rescore=2), n=50).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", "originals", (7, 2), value)
    store = EmbeddingStore.load(forged, mmap=True)
    with pytest.raises(ValueError, match="the store is damaged: the vector in slot 7 \\(tensor 'originals': not a "
                                         "unit vector\\)"):
        store.search(X[7:8], 3)
    assert store.search(X[7:8], 3, rescore=1)[1][0, 0].item() == 7  # the codes themselves are fine


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_codes_are_refused_where_a_scan_reads_them(tmp_path: Path, value: float) -> None:
    path = _store(Float16Config(rescore=2), n=50).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", "codes", (9, 0), value)
    store = EmbeddingStore.load(forged, mmap=True)
    for call in (lambda: store.search(X[:2], 3), lambda: store.search(X[:2], 3, rescore=1), lambda: store(X[:2])):
        with pytest.raises(ValueError, match="the store is damaged: the vector in slot 9 \\(tensor 'codes': "
                                             "scores NaN or Inf\\)"):
            call()
    store.delete(torch.tensor([9]))  # a deleted vector is never scored, so it is no longer an error
    assert 9 not in store.search(X[:2], 3)[1].flatten().tolist()


def test_e4m3_nan_codes_are_refused_where_they_are_returned(tmp_path: Path) -> None:
    """The scan reads an E4M3 NaN byte as a finite value (``formats.Codec.upcast``), so a NaN code is refused when
    its vector is returned (or scored by ``forward``), not wherever it is scanned."""
    path = _store(FP8E4M3Config(rescore=1), n=50).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", "codes", (9, 0), float("nan"))
    store = EmbeddingStore.load(forged, mmap=True)
    assert store.tensors()["codes"][9].view(torch.uint8)[0].item() & 0x7F == 0x7F
    for call in (lambda: store.search(X[9:10], 3), lambda: store.search(X[9:10], 3, rescore=2), lambda: store(X[:2])):
        with pytest.raises(ValueError, match="the store is damaged: the vector in slot 9 \\(tensor 'codes': "):
            call()
    assert 9 not in store.search(X[20:21], 3)[1].flatten().tolist()  # not returned: the search answers


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, 3e38], ids=["nan", "zero", "negative", "3e38"])
def test_forged_row_scales_are_refused_where_a_scan_reads_them(tmp_path: Path, value: float) -> None:
    path = _store(FP8E4M3Config(scale="vector"), n=50).save(tmp_path / "s.pqs")
    forged = _forged(path, tmp_path / "f.pqs", "row_scale", (11,), value)
    store = EmbeddingStore.load(forged, mmap=True)
    for call in (lambda: store.search(X[:2], 3), lambda: store(X[:2])):
        with pytest.raises(ValueError, match="the store is damaged: the vector in slot 11 \\(tensor 'row_scale': "
                                             "not in \\(0, 1e6\\]\\)"):
            call()


def test_corrupted_bytes_are_found_by_the_default_verification(tmp_path: Path) -> None:
    """A byte flip in the codes: the memory-mapped load verifies the checksums by default; ``verify=False`` is the
    documented opt-out (the flip is then silent)."""
    path = _store(Int8Config(), n=50).save(tmp_path / "s.pqs")
    data = bytearray(path.read_bytes())
    data[-300] ^= 0x40  # inside the codes (data order: ids, codec.step, codes (3,200 bytes), live (50 bytes))
    path.write_bytes(bytes(data))
    for mmap in (False, True):
        with pytest.raises(ArtifactError, match=f"^{path}: checksum mismatch for tensor"):
            EmbeddingStore.load(path, mmap=mmap)
    assert len(EmbeddingStore.load(path, mmap=True, verify=False)) == 50


def test_huge_and_tiny_finite_vectors_keep_their_direction() -> None:
    """3e38 entries overflow a direct norm (x / inf = 0: all codes 0, all scores 0); 1e-30 entries underflow it
    (taken for zero vectors); float64 1e300 does not fit float32 at all. Each is normalised to the same unit rows
    as the plain vectors, in the store (add, search), the float table and ``unit_rows``."""
    from polyquant.plugins.embeddings.models import EmbeddingTable
    from polyquant.plugins.embeddings.store import unit_rows

    x = X[:50]
    for scaled in (x * 3e38, x * 1e-30, x.double() * 1e300, x.double() * 1e-300):
        torch.testing.assert_close(unit_rows(scaled, "v", D), x, rtol=0, atol=1e-6)
        torch.testing.assert_close(EmbeddingTable(vectors=scaled)(scaled), EmbeddingTable(vectors=x)(x),
                                   rtol=0, atol=1e-5)
    plain = EmbeddingStore.fit(x, config=Int8Config())
    plain.add(x)
    huge = EmbeddingStore.fit(x * 3e38, config=Int8Config())
    huge.add(x * 3e38)
    torch.testing.assert_close(huge.codec.step, plain.codec.step)
    scores, ids = huge.search(x[:5] * 3e38, 3, rescore=1)
    plain_scores, plain_ids = plain.search(x[:5], 3, rescore=1)
    assert ids[:, 0].tolist() == list(range(5)) and torch.equal(ids, plain_ids)
    torch.testing.assert_close(scores, plain_scores, rtol=0, atol=1e-3)
    assert bool((scores[:, 0] > 0.9).all())


@pytest.mark.parametrize("deleted", [range(0, 0), range(150, 260), range(0, 600, 3)], ids=["none", "a run", "spread"])
def test_binary_search_over_long_spans_and_tombstones_is_the_brute_force(deleted: range) -> None:
    """The CPU Hamming scan reads long spans in one call and falls back to chunk-sized pieces where a span holds
    more deleted vectors than a chunk: the same top k as the brute force on the live codes, ties to the smaller
    slot, either way."""
    from polyquant.kernels import hamming_distance_reference

    store = _store(BinaryConfig(rescore=1))  # chunk_size 97: 110 or 200 deleted exceed a chunk
    store.delete(torch.tensor(list(deleted), dtype=torch.int64))
    t = store.tensors()
    prep = store.codec.prepare(Q, torch.zeros(len(Q)))
    h = hamming_distance_reference(prep.bits, t["codes"]).long()  # (Q, 600)
    h[:, ~t["live"]] = 1 << 20
    want = torch.sort(h * 1024 + torch.arange(600), dim=1).values[:, :10] % 1024  # ties to the smaller slot
    scores, ids = store.search(Q, 10)
    assert torch.equal(ids, t["ids"][want]) and not set(deleted) & set(ids.flatten().tolist())
    assert torch.equal(scores, (D - 2 * h.gather(1, want)).float() / D)


@pytest.mark.parametrize("config", [Int8Config(), FP8E4M3Config(reduce="pca", keep=0.5), Int4Config()],
                         ids=["int8", "fp8-pca", "int4"])
def test_dense_scan_steps_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch, config: EmbeddingConfig) -> None:
    """A search of few queries scans long steps; chunk-sized steps (97 rows, tombstones inside) and one-row tiles
    give the same ids and scores."""
    from polyquant.plugins.embeddings import formats, store as store_module

    store = _store(config)
    store.delete(torch.tensor([5, 96, 97, 98, 400]))
    want = store.search(Q, 10, rescore=1)
    monkeypatch.setattr(store_module, "_SCORES_PER_STEP", 0)
    monkeypatch.setattr(formats, "TILE_ROWS", 7)
    got = store.search(Q, 10, rescore=1)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
