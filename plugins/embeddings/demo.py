"""``polyquant demo embeddings``: every format on seeded clustered vectors, recall of the float neighbours, bytes per
vector and search speed (offline, a few seconds; the real-text benchmark is ``benchmarks/embeddings.py``)."""

from __future__ import annotations

import statistics
import time

__all__ = ["run_demo"]


def run_demo(n: int = 20_000, dim: int = 128, queries: int = 100, k: int = 10) -> str:
    """Build one store per format (and PCA 50% + fp8, binary with and without rescoring) from ``n`` seeded
    clustered unit vectors of ``dim`` dims; report recall@k against exact float search."""
    import torch

    from polyquant.demo import demo_threads, text_table

    from .configs import BinaryConfig, EmbeddingConfig, FP8E4M3Config, Float16Config, Int4Config, Int8Config
    from .configs import UInt8Config
    from .data import example_vectors
    from .metrics import overlap_at_k
    from .store import EmbeddingStore

    with demo_threads():
        x = example_vectors(n, dim, clusters=256, noise=0.5, seed=0)
        g = torch.Generator().manual_seed(1)
        q = x[torch.randint(0, n, (queries,), generator=g)] + 0.1 * torch.randn(queries, dim, generator=g)
        q = q / q.norm(dim=1, keepdim=True)
        truth = torch.topk(q @ x.T, k).indices
        cases: list[tuple[str, EmbeddingConfig]] = [
            ("float16", Float16Config()),
            ("fp8_e4m3 (vector scale)", FP8E4M3Config()),
            ("int8", Int8Config()),
            ("uint8", UInt8Config()),
            ("int4", Int4Config()),
            ("pca 50% + fp8_e4m3", FP8E4M3Config(reduce="pca", keep=0.5)),
            ("binary, no rescoring", BinaryConfig(rescore=1)),
            ("binary, 4x rescoring", BinaryConfig(rescore=4)),
        ]
        rows = []
        for label, config in cases:
            store = EmbeddingStore.fit(x[:5000], config=config)
            store.add(x)
            _, ids = store.search(q, k)  # warm-up (first-call allocations, lazy imports), then the median of 5
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                store.search(q, k)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            recall = float(overlap_at_k(ids, truth, k).mean())  # one relevant set: the float top k
            bpv = store.bytes_per_vector()
            rows.append((label, f"{recall:.3f}", f"{bpv:.1f}", f"{4 * dim / bpv:.1f}x", f"{queries / seconds:.0f}"))
    header = ("format", f"recall@{k}", "bytes/vec", "compression", "queries/s")
    title = (f"embedding stores: {n} seeded clustered unit vectors of {dim} dims, {queries} queries, exact float "
             f"top-{k} as truth (CPU)")
    note = ("Scores are computed on the stored codes (float32 tiles x the float query, Hamming top-k); sizes are the "
            "codes plus amortised codec tensors; queries/s: the median of 5 searches after a warm-up.")
    return text_table(title, header, rows, note)


if __name__ == "__main__":
    print(run_demo())
