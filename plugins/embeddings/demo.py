"""``polyquant demo embeddings``: every format on seeded clustered vectors: recall of the float neighbours (searched on
the stored codes), bytes per vector, the saved store's file size, search speed, and the figure of recall vs
compression (offline, a few seconds: about 3 s of CPU time plus imports; the real-text benchmark is
``benchmarks/embeddings.py``)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from polyquant.report import Figure, Section, Table, figure_png, pyplot

__all__ = ["run_demo"]


def _recall_figure(points: list[tuple[str, float, float]], k: int) -> Figure:
    """One panel: each format's recall@k against its compression vs float32 (log x), each point labelled."""
    plt = pyplot()

    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    placed: list[tuple[float, float]] = []  # (log2 compression, label y) of the labels so far
    for label, compression, recall in sorted(points, key=lambda p: -p[2]):
        ax.scatter([compression], [recall], s=28, color="gray" if label == "float32" else "tab:blue", zorder=3)
        x, y = math.log2(compression), recall
        for lx, ly in sorted(placed, key=lambda p: -p[1]):  # below any label starting near it and in the way
            if abs(lx - x) < 0.6 and abs(ly - y) < 0.05:
                y = ly - 0.05
        placed.append((x, y))
        ax.annotate(label, (compression, recall), xytext=(compression * 1.1, y), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"} if y < recall - 0.01 else None)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlim(0.8, max(c for _, c, _ in points) * 2.5)
    ax.set_ylim(min(0.0, min(r for _, _, r in points) - 0.05), 1.05)
    ax.set_xlabel("compression vs float32 (x)")
    ax.set_ylabel(f"recall@{k} (fraction of the float top-{k})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, "recall vs compression",
                      f"Recall@{k} of each stored format (scored on its codes) against its bytes per vector as a "
                      "compression of float32 (log scale); float32 exact search is the reference point at 1x.")


def run_demo(n: int = 20_000, dim: int = 128, queries: int = 100, k: int = 10) -> Section:
    """Build one store per format (and PCA 50% + fp8, binary with and without rescoring) from ``n`` seeded
    clustered unit vectors of ``dim`` dims; recall@k against exact float search on the store and on the store
    saved and loaded back, bytes per vector, the file's bytes and queries/s, as a report section."""
    import torch

    from polyquant.demo import demo_progress, demo_threads, median_seconds

    from .configs import BinaryConfig, EmbeddingConfig, FP8E4M3Config, Float16Config, Int4Config, Int8Config
    from .configs import UInt8Config
    from .data import example_vectors
    from .metrics import overlap_at_k
    from .store import EmbeddingStore

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
    steps = demo_progress(total=1 + len(cases) + 1)
    with demo_threads(), tempfile.TemporaryDirectory() as tmp:
        x = example_vectors(n, dim, clusters=256, noise=0.5, seed=0)
        g = torch.Generator().manual_seed(1)
        q = x[torch.randint(0, n, (queries,), generator=g)] + 0.1 * torch.randn(queries, dim, generator=g)
        q = q / q.norm(dim=1, keepdim=True)
        truth = torch.topk(q @ x.T, k).indices
        float_seconds = median_seconds(lambda: torch.topk(q @ x.T, k))
        rows = [["float32 (exact)", "1.000", "-", f"{4 * dim:.1f}", "1.0x", f"{4 * n * dim:,}",
                 f"{queries / float_seconds:.0f}"]]
        points = [("float32", 1.0, 1.0)]
        steps.update(1, step="float32")
        threads = torch.get_num_threads()
        for i, (label, config) in enumerate(cases):
            store = EmbeddingStore.fit(x[:5000], config=config)
            store.add(x)
            _, ids = store.search(q, k)
            seconds = median_seconds(lambda: store.search(q, k))  # a warm-up, then the median of 5
            recall = float(overlap_at_k(ids, truth, k).mean())  # one relevant set: the float top k
            bpv = store.bytes_per_vector()
            path = store.save(Path(tmp) / f"store{i}.pqs")
            store.close()
            loaded = EmbeddingStore.load(path)
            recall_loaded = float(overlap_at_k(loaded.search(q, k)[1], truth, k).mean())
            loaded.close()
            rows.append([label, f"{recall:.3f}", f"{recall_loaded:.3f}", f"{bpv:.1f}", f"{4 * dim / bpv:.1f}x",
                         f"{path.stat().st_size:,}", f"{queries / seconds:.0f}"])
            points.append((label, 4 * dim / bpv, recall))
            steps.update(1, step=label)
        figure = _recall_figure(points, k)
        steps.update(1, step="figure")

    header = ["format", f"recall@{k}", f"recall@{k} saved + loaded", "bytes/vec", "compression", "store file bytes",
              "queries/s"]
    table = Table(
        f"embedding stores: {n:,} seeded clustered unit vectors of {dim} dims, {queries} queries, exact float top-{k} "
        "as truth (CPU)", header, rows,
        note=("No fake-quant simulation in this domain: recall is computed on the stored codes (float32 tiles of "
              "upcast codes x the float query, Hamming top-k on sign bits), which is what a deployed store does; "
              "'saved + loaded': the same search on the store saved as a polyquant artifact and loaded back "
              "(sha256 verified). bytes/vec: the codes plus the codec and reduction tensors amortised over the "
              "vectors (ids and live flags not counted); compression = 4 x dims / bytes/vec; store file bytes: the "
              "saved .pqs file (codes, int64 ids, live flags, codec tensors, manifest). The float32 row: exact "
              "search (q @ x.T, top-k) on the float vectors, its file bytes the raw float32 array (n x dims x 4; no "
              "file written, so no saved + loaded recall). queries/s: the median of 5 searches of all queries "
              f"after a warm-up, {threads} torch thread(s)."))
    point = {label: (f"{recall:.3f}", f"{compression:.1f}x") for label, compression, recall in points}
    headline = (f"int8 recall@{k} {point['int8'][0]} at {point['int8'][1]} smaller than float32, int4 "
                f"{point['int4'][0]} at {point['int4'][1]}, binary {point['binary, no rescoring'][0]} "
                f"({point['binary, 4x rescoring'][0]} with 4x rescoring) at {point['binary, no rescoring'][1]}; "
                f"float16 {point['float16'][0]} at {point['float16'][1]}")
    return Section(
        domain="embeddings",
        title=(f"every storage format of EmbeddingStore on {n:,} seeded clustered unit vectors of {dim} dims "
               f"({queries} queries near stored vectors, k = {k})"),
        headline=headline,
        reduced=(f"synthetic clustered vectors ({n:,} x {dim}) instead of the benchmark's real MiniLM embeddings "
                 "of the Python stdlib docstrings (benchmarks/embeddings.py: nDCG@10, recall@10 / @100, every "
                 "reduction x format and the FAISS / usearch / sentence-transformers references)."),
        tables=[table], figures=[figure],
        notes=["benchmarks/embeddings.py runs the real-text retrieval task (every format and reduction beside FAISS, "
               "usearch and sentence-transformers: benchmarks/results_cpu/embeddings.json); benchmarks/embeddings.md "
               "times 100k and 1M stores against FAISS and usearch and compares binary rescoring."])


if __name__ == "__main__":
    print(run_demo())
