"""Embedding stores on the CPU at 100k and 1M x 384: search speed beside FAISS and usearch, and a large int8 store's
life cycle (built chunk by chunk into memory-mapped files, saved, loaded memory-mapped, searched).

    python benchmarks/embeddings_store.py                        # 100k and 1M, every format, one thread
    python benchmarks/embeddings_store.py --sizes 100000 --out /tmp/small.json --table /tmp/small.md

Vectors are seeded random unit vectors, generated chunk by chunk (the whole set never exists in memory); queries
are stored vectors plus noise (cosine ~0.9 to their source), so the exact float top-10 of each query is known by
regenerating the chunks.

Speed (``speed`` in the report, one row per size and format): each of our stores (``EmbeddingStore``, codes in
memory-mapped files in the work folder, no rescoring: the scan alone) beside the engine a user would otherwise pick
for the same bytes per vector, built from the same vectors in the same run: FAISS ``IndexScalarQuantizer``
QT_8bit / QT_4bit (trained on the same 10,000 calibration vectors) for int8 / int4, ``IndexBinaryFlat`` on the
sign bits for binary, and usearch's exact (brute-force) search, ``usearch.index.search(exact=True)``, on the
store's own int8 codes (with the codec's int8 query codes, as ``export.to_usearch``) and sign bits. fp8 E4M3
(vector scale) has no FAISS or usearch format: its row is read against our int8. Columns: batch = queries / s of
one call with all queries (median of ``--repeats``), one query = milliseconds per call with a (1, 384) query
(median over ``--single`` queries), recall@10 against the exact float top 10. One thread everywhere (torch,
FAISS's OpenMP, usearch ``threads=1``).

Memory: ``peak_rss_GiB`` is ``resource.getrusage`` ru_maxrss (anonymous memory plus the pages of mapped files that
were resident, which the kernel can drop); ``rss_*`` are snapshots of /proc/self/status (RssAnon / RssFile) after
each phase. The FAISS indexes hold their codes in RAM; our stores' codes are memory-mapped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _env import environment, package_version, peak_rss_gib

from polyquant.plugins.embeddings.configs import METHODS, EmbeddingConfig, Int8Config
from polyquant.plugins.embeddings.store import EmbeddingStore, prepare_queries

GiB = 1024**3


def unit_chunk(index: int, size: int, dim: int, seed: int) -> torch.Tensor:
    """Chunk ``index`` of the seeded unit vectors (size, dim) both store benchmarks build their stores from."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.randn(size, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _rss() -> dict[str, float]:
    """RssAnon / RssFile of this process in GiB (Linux), else {}."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    out = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) * 1024 / GiB, 3)
    return out


def queries_near(n: int, chunk: int, dim: int, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` queries: stored vectors (seeded picks) plus noise, unit norm; and their sources (int64)."""
    g = torch.Generator().manual_seed(seed + 1)
    sources = torch.randint(0, n, (count,), generator=g)
    q = torch.stack([unit_chunk(int(s) // chunk, min(chunk, n - int(s) // chunk * chunk), dim, seed)[int(s) % chunk]
                     .clone() for s in sources])  # clone: a row view would keep its whole chunk alive
    q = q + 0.5 / dim**0.5 * torch.randn(count, dim, generator=g)
    return q / q.norm(dim=1, keepdim=True), sources


def exact_top_k(q: torch.Tensor, chunks: list[tuple[int, int]], chunk: int, dim: int, seed: int,
                k: int) -> torch.Tensor:
    """The exact float top-k ids (Q, k) of the queries, regenerating the vectors chunk by chunk."""
    best = torch.empty(len(q), 0)
    best_ids = torch.empty(len(q), 0, dtype=torch.int64)
    for i, size in chunks:
        s = q @ unit_chunk(i, size, dim, seed).T
        merged = torch.cat([best, s], 1)
        merged_ids = torch.cat([best_ids, torch.arange(i * chunk, i * chunk + size).expand(len(q), -1)], 1)
        best, top = torch.topk(merged, k, dim=1)
        best_ids = merged_ids.gather(1, top)
    return best_ids


def recall(ids: np.ndarray | torch.Tensor, truth: torch.Tensor) -> float:
    ids = np.asarray(ids)
    return round(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.numel(), 4)


def time_engine(search, queries: np.ndarray, *, repeats: int, single: int) -> dict[str, float]:
    """Batch queries / s (median of ``repeats`` calls with every query, after one warm-up) and one-query
    milliseconds (median over the first ``single`` queries, each a (1, D) call, after one warm-up)."""
    search(queries)
    batch = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries)
        batch.append(time.perf_counter() - t0)
    search(queries[:1])
    one = []
    for i in range(min(single, len(queries))):
        t0 = time.perf_counter()
        search(queries[i : i + 1])
        one.append(time.perf_counter() - t0)
    return {"batch_qps": round(len(queries) / statistics.median(batch), 1),
            "one_query_ms": round(1e3 * statistics.median(one), 3)}


SPEED_FORMATS = ("int8", "int4", "fp8_e4m3", "binary")


def speed(n: int, dim: int, chunk: int, queries: int, k: int, seed: int, workdir: Path, *, formats: list[str],
          repeats: int, single: int) -> list[dict]:
    """One row per format at size ``n``: ours beside FAISS and usearch (module docstring)."""
    import faiss
    import usearch.index as usearch_index
    from usearch.index import MetricKind

    chunks = [(i, min(chunk, n - i * chunk)) for i in range((n + chunk - 1) // chunk)]
    calibration = unit_chunk(0, min(chunk, 10_000), dim, seed)
    q, _ = queries_near(n, chunk, dim, seed, queries)
    qn = q.numpy()
    truth = exact_top_k(q, chunks, chunk, dim, seed, k)
    rows = []
    for fmt in formats:
        config: EmbeddingConfig = METHODS[fmt](rescore=1)
        store = EmbeddingStore.fit(calibration, config=config, workdir=workdir)
        store.reserve(n)
        t0 = time.perf_counter()
        for i, size in chunks:
            store.add(unit_chunk(i, size, dim, seed))
        row: dict = {"n": n, "format": fmt, "bytes_per_vector": store.codec.code_bytes(),
                     "build_s": round(time.perf_counter() - t0, 2)}
        ours = time_engine(lambda x: store.search(torch.from_numpy(x), k, rescore=1)[1], qn, repeats=repeats,
                           single=single)
        row["ours"] = {**ours, "recall@10": recall(store.search(q, k, rescore=1)[1], truth)}
        if fmt == "binary":  # what a user runs by default: 4x rescoring
            rescored = time_engine(lambda x: store.search(torch.from_numpy(x), k, rescore=4)[1], qn,
                                   repeats=repeats, single=single)
            row["ours_rescore4"] = {**rescored, "recall@10": recall(store.search(q, k, rescore=4)[1], truth)}
        prep = prepare_queries(q, store.reducer, store.codec, query_codes=True)[1]
        if fmt in ("int8", "int4"):
            qtype = {"int8": faiss.ScalarQuantizer.QT_8bit, "int4": faiss.ScalarQuantizer.QT_4bit}[fmt]
            index = faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT)
            index.train(calibration.numpy())
            for i, size in chunks:
                index.add(unit_chunk(i, size, dim, seed).numpy())
            row["faiss"] = {**time_engine(lambda x: index.search(x, k)[1], qn, repeats=repeats, single=single),
                            "recall@10": recall(index.search(qn, k)[1], truth), "index": f"SQ {fmt}"}
            del index
        codes = store.tensors()["codes"].numpy() if fmt in ("int8", "binary") else None  # memory-mapped
        if fmt == "binary":
            index = faiss.IndexBinaryFlat(dim)
            index.add(codes)  # our sign bits (x >= 0, little-endian bit order) are IndexBinaryFlat's codes
            bits = prep.bits.numpy()
            row["faiss"] = {**time_engine(lambda b: index.search(b, k)[1], bits, repeats=repeats, single=single),
                            "recall@10": recall(index.search(bits, k)[1], truth), "index": "IndexBinaryFlat"}
            del index
        if fmt in ("int8", "binary"):
            native, metric, kind = ((prep.qcodes.numpy(), MetricKind.IP, None) if fmt == "int8" else
                                    (prep.bits.numpy(), MetricKind.Hamming, "b1"))

            def brute_force(x: np.ndarray) -> np.ndarray:
                matches = usearch_index.search(codes, x, k, metric, exact=True, threads=1, dtype=kind)
                return np.asarray(matches.keys).reshape(len(x), -1)

            row["usearch"] = {**time_engine(brute_force, native, repeats=repeats, single=single),
                              "recall@10": recall(brute_force(native), truth),
                              "index": "exact search, " + ("i8 ip" if fmt == "int8" else "b1 Hamming")}
        rows.append(row)
        store.close()
        print(json.dumps(row), flush=True)
    return rows


def lifecycle(n: int, dim: int, chunk: int, queries: int, k: int, seed: int, workdir: Path) -> dict:
    """An int8 store of ``n`` vectors built into memory-mapped files, saved, closed, loaded memory-mapped and
    searched (cold, then warm)."""
    chunks = [(i, min(chunk, n - i * chunk)) for i in range((n + chunk - 1) // chunk)]
    report: dict = {"n": n, "dim": dim, "chunk": chunk, "queries": queries, "k": k, "format": "int8"}
    memory: dict[str, dict[str, float]] = {"start": _rss()}

    t0 = time.perf_counter()
    store = EmbeddingStore.fit(unit_chunk(0, min(chunk, 10_000), dim, seed), config=Int8Config(), workdir=workdir)
    store.reserve(n)
    for i, size in chunks:
        store.add(unit_chunk(i, size, dim, seed))
    report["build_s"] = round(time.perf_counter() - t0, 2)
    memory["built"] = _rss()

    path = workdir / "store.pqs"
    t0 = time.perf_counter()
    store.save(path)
    report["save_s"] = round(time.perf_counter() - t0, 2)
    report["file_bytes"] = path.stat().st_size
    report["bytes_per_vector"] = round(store.bytes_per_vector(), 3)
    report["file_bytes_per_vector"] = round(path.stat().st_size / n, 3)
    store.close()  # drop the working files: from here on only the saved file is used
    del store
    memory["saved"] = _rss()

    t0 = time.perf_counter()
    loaded = EmbeddingStore.load(path, mmap=True, verify=False)  # the bare mapping (store_verify.py: verified)
    report["load_mmap_s"] = round(time.perf_counter() - t0, 3)
    memory["loaded"] = _rss()

    q, sources = queries_near(n, chunk, dim, seed, queries)
    times = []
    for _ in range(2):  # cold (pages read from disk or the page cache), then warm
        t0 = time.perf_counter()
        _, ids = loaded.search(q, k)
        times.append(time.perf_counter() - t0)
    report["search_cold_s"], report["search_s"] = round(times[0], 3), round(times[1], 3)
    report["qps"] = round(queries / times[1], 1)
    memory["searched"] = _rss()
    report["recall_at_k"] = recall(ids, exact_top_k(q, chunks, chunk, dim, seed, k))
    report["source_at_rank_1"] = round(float((ids[:, 0] == sources).float().mean()), 4)
    report["rss_GiB"] = memory
    loaded.close()
    path.unlink()
    return report


def markdown(rows: list[dict]) -> str:
    """The speed rows as one table: ours beside FAISS and usearch, with our ratio to the best of them."""
    lines = ["| n | format | B/vec | ours batch q/s | FAISS batch q/s | usearch batch q/s | ours 1 query ms | "
             "FAISS 1 query ms | usearch 1 query ms | recall@10 ours / FAISS / usearch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, key in (("", "ours"), (" + rescore x4", "ours_rescore4")):
            if key not in r:
                continue
            o, f, u = r[key], r.get("faiss", {}) if not label else {}, r.get("usearch", {}) if not label else {}

            def cell(d: dict, name: str, fmt: str) -> str:
                return format(d[name], fmt) if name in d else "-"

            lines.append(f"| {r['n']:,} | {r['format']}{label} | {r['bytes_per_vector']:g} | "
                         f"{cell(o, 'batch_qps', ',.0f')} | {cell(f, 'batch_qps', ',.0f')} | "
                         f"{cell(u, 'batch_qps', ',.0f')} | {cell(o, 'one_query_ms', '.2f')} | "
                         f"{cell(f, 'one_query_ms', '.2f')} | {cell(u, 'one_query_ms', '.2f')} | "
                         f"{cell(o, 'recall@10', '.3f')} / {cell(f, 'recall@10', '.3f')} / "
                         f"{cell(u, 'recall@10', '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100_000, 1_000_000],
                   help="store sizes of the speed table (comma-separated)")
    p.add_argument("--formats", type=lambda v: v.split(","), default=list(SPEED_FORMATS))
    p.add_argument("--lifecycle-n", type=int, default=1_000_000, help="size of the int8 life-cycle run (0: skip)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=100, help="queries of the batch calls")
    p.add_argument("--single", type=int, default=20, help="one-query calls timed (median)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="folder for the working files and the saved store "
                                                              "(default: a temporary folder, removed at the end)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results_cpu/embeddings_store.json"))
    p.add_argument("--table", type=Path, default=None, help="also write the speed table (markdown) here")
    args = p.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="pq-bench-", dir=args.workdir))
    started = time.perf_counter()
    try:
        rows = []
        for n in args.sizes:
            rows += speed(n, args.dim, args.chunk, args.queries, args.k, args.seed, folder, formats=args.formats,
                          repeats=args.repeats, single=args.single)
        life = (lifecycle(args.lifecycle_n, args.dim, args.chunk, args.queries, args.k, args.seed, folder)
                if args.lifecycle_n else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {"environment": environment("cpu"), "threads": args.threads,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "speed": rows, "lifecycle": life, "peak_rss_GiB": peak_rss_gib(),
              "seconds": round(time.perf_counter() - started, 1)}
    report["environment"]["faiss"] = package_version("faiss-cpu")
    report["environment"]["usearch"] = package_version("usearch")
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.table:
        args.table.write_text(table + "\n")


if __name__ == "__main__":
    main()
