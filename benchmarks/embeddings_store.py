"""A large int8 embedding store on the CPU: built chunk by chunk into memory-mapped files, saved, loaded
memory-mapped, searched. Reports build / save / load / search times, queries per second, file size and memory.

    python benchmarks/embeddings_store.py                       # 1M x 384, 100 queries, k = 10
    python benchmarks/embeddings_store.py --n 100000 --out /tmp/small.json

Vectors are seeded random unit vectors, generated chunk by chunk (the whole set never exists in memory); queries
are stored vectors plus noise (cosine ~0.9 to their source), so the exact float top-10 of each query is known by
regenerating the chunks. Memory: ``peak_rss_GiB`` is ``resource.getrusage`` ru_maxrss (anonymous memory plus the
pages of mapped files that were resident, which the kernel can drop); ``rss_*`` are snapshots of /proc/self/status
(RssAnon / RssFile) after each phase.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _env import environment, peak_rss_gib

from polyquant.plugins.embeddings.configs import Int8Config
from polyquant.plugins.embeddings.store import EmbeddingStore

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


def run(n: int, dim: int, chunk: int, queries: int, k: int, seed: int, workdir: Path) -> dict:
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

    g = torch.Generator().manual_seed(seed + 1)
    sources = torch.randint(0, n, (queries,), generator=g)
    q = torch.stack([unit_chunk(int(s) // chunk, min(chunk, n - int(s) // chunk * chunk), dim, seed)[int(s) % chunk]
                     .clone() for s in sources])  # clone: a row view would keep its whole chunk alive
    q = q + 0.5 / dim**0.5 * torch.randn(queries, dim, generator=g)
    q = q / q.norm(dim=1, keepdim=True)

    times = []
    for _ in range(2):  # cold (pages read from disk or the page cache), then warm
        t0 = time.perf_counter()
        _, ids = loaded.search(q, k)
        times.append(time.perf_counter() - t0)
    report["search_cold_s"], report["search_s"] = round(times[0], 3), round(times[1], 3)
    report["qps"] = round(queries / times[1], 1)
    memory["searched"] = _rss()

    best = torch.empty(queries, 0)
    best_ids = torch.empty(queries, 0, dtype=torch.int64)
    for i, size in chunks:  # the exact float top-k, regenerating the vectors
        s = q @ unit_chunk(i, size, dim, seed).T
        merged, merged_ids = torch.cat([best, s], 1), torch.cat([best_ids, torch.arange(i * chunk, i * chunk + size)
                                                                 .expand(queries, -1)], 1)
        best, top = torch.topk(merged, k, dim=1)
        best_ids = merged_ids.gather(1, top)
    report["recall_at_k"] = round(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, best_ids))
                                  / best_ids.numel(), 4)
    report["source_at_rank_1"] = round(float((ids[:, 0] == sources).float().mean()), 4)
    report["peak_rss_GiB"] = peak_rss_gib()
    report["rss_GiB"] = memory
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="folder for the working files and the saved store "
                                                              "(default: a temporary folder, removed at the end)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results_cpu/embeddings_store.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="pq-bench-", dir=args.workdir))
    try:
        report = run(args.n, args.dim, args.chunk, args.queries, args.k, args.seed, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["threads"] = args.threads
    report["environment"] = environment("cpu")
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
