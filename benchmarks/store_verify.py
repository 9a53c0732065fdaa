"""What verifying a memory-mapped embedding store costs: time to open it and run the first search, with the
checksums verified (the default of ``EmbeddingStore.load`` and ``polyquant search``) and without
(``verify=False`` / ``--no-verify``).

    python benchmarks/store_verify.py                                  # 1M x 384, int8 and float16, 3 repetitions
    python benchmarks/store_verify.py --n 100000 --out /tmp/small.json

Each store is built chunk by chunk into memory-mapped files (seeded random unit vectors, as
``benchmarks/embeddings_store.py``), saved, and closed; then it is opened memory-mapped and searched (100 queries,
k = 10, the format's default rescoring) with and without verification, alternating the order in each repetition.
Two page-cache states: ``warm`` (the file's pages are in memory: verification costs the sha256 of the whole file)
and ``cold`` (the file's pages are dropped first with ``posix_fadvise(DONTNEED)``, so both runs read from disk:
verification reads the whole file, an unverified search reads what its scan touches, which is also the whole
codes tensor; on a virtual disk cached by its host the two states differ little). The ratio verified / unverified
of each repetition is reported with the median; the machine may be shared, so compare the ratios rather than the
seconds. ``sha256_GBps`` is hashlib's speed on this machine: verification costs about file_bytes / that.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _env import environment, peak_rss_gib
from embeddings_store import unit_chunk

from polyquant.plugins.embeddings.configs import BinaryConfig, EmbeddingConfig, Float16Config, Int8Config
from polyquant.plugins.embeddings.store import EmbeddingStore

CONFIGS: dict[str, EmbeddingConfig] = {"int8": Int8Config(), "float16": Float16Config(), "binary": BinaryConfig()}


def build(config: EmbeddingConfig, n: int, dim: int, chunk: int, seed: int, folder: Path) -> Path:
    """Build and save a store of ``n`` vectors in ``folder``; only the saved file is kept."""
    store = EmbeddingStore.fit(unit_chunk(0, min(chunk, 10_000), dim, seed), config=config, workdir=folder)
    store.reserve(n)
    for i, start in enumerate(range(0, n, chunk)):
        store.add(unit_chunk(i, min(chunk, n - start), dim, seed))
    path = store.save(folder / f"{config.FORMAT}.pqs")
    store.close()
    return path


def drop_cache(path: Path) -> None:
    """Ask the kernel to drop the file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_and_search(path: Path, queries: torch.Tensor, k: int, *, verify: bool, cold: bool) -> dict[str, float]:
    """Seconds to open the store memory-mapped and to run its first search."""
    if cold:
        gc.collect()  # the previous run's mapping must be gone: mapped pages are not dropped
        drop_cache(path)
    t0 = time.perf_counter()
    store = EmbeddingStore.load(path, mmap=True, verify=verify)
    t1 = time.perf_counter()
    store.search(queries, k)
    t2 = time.perf_counter()
    del store
    return {"open_s": t1 - t0, "search_s": t2 - t1, "total_s": t2 - t0}


def sha256_gbps(path: Path) -> float:
    """hashlib sha256 throughput over the (cached) file, GB/s."""
    data = path.read_bytes()
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t0) / 1e9


def run(formats: list[str], n: int, dim: int, chunk: int, queries: int, k: int, reps: int, seed: int,
        folder: Path) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(queries, dim, generator=g)
    report: dict = {"n": n, "dim": dim, "queries": queries, "k": k, "repetitions": reps, "formats": {}}
    for fmt in formats:
        config = CONFIGS[fmt]
        t0 = time.perf_counter()
        path = build(config, n, dim, chunk, seed, folder)
        entry: dict = {"build_and_save_s": round(time.perf_counter() - t0, 2), "file_bytes": path.stat().st_size,
                       "rescore": config.rescore, "sha256_GBps": round(sha256_gbps(path), 3)}
        open_and_search(path, q, k, verify=False, cold=False)  # warm-up: imports, kernels, page cache
        for cache in ("warm", "cold"):
            runs: dict[str, list[dict[str, float]]] = {"verified": [], "unverified": []}
            for rep in range(reps):
                order = (False, True) if rep % 2 == 0 else (True, False)
                for verify in order:
                    runs["verified" if verify else "unverified"].append(
                        open_and_search(path, q, k, verify=verify, cold=cache == "cold"))
            ratios = [v["total_s"] / u["total_s"] for v, u in zip(runs["verified"], runs["unverified"])]
            entry[cache] = {
                **{f"{name}_{key}": round(statistics.median(r[key] for r in rs), 3)
                   for name, rs in runs.items() for key in ("open_s", "search_s", "total_s")},
                "ratio_total_per_rep": [round(r, 2) for r in ratios],
                "ratio_total_median": round(statistics.median(ratios), 2),
            }
        report["formats"][fmt] = entry
        path.unlink()
    report["peak_rss_GiB"] = peak_rss_gib()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--formats", nargs="+", choices=sorted(CONFIGS), default=["int8", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="folder for the stores (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results_cpu/store_verify.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="pq-verify-", dir=args.workdir))
    try:
        report = run(args.formats, args.n, args.dim, args.chunk, args.queries, args.k, args.reps, args.seed, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["threads"] = args.threads
    report["cpus"] = os.cpu_count()
    report["environment"] = environment("cpu")
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
