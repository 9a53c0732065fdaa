"""What the embeddings methods quantize: ``EmbeddingTable``, float vectors whose forward gives cosine scores.

    table = EmbeddingTable(vectors=embeddings)           # (N, D) float; ids 0..N-1 unless given
    table = EmbeddingTable(vectors=embeddings, texts=docs)   # the texts are kept in the store (``set_texts``)
    table(queries)                                       # (Q, N) cosine similarities
    qm = polyquant.quantize(table, Int8Config(), calib=[embeddings[:10_000]])
    qm.model                                             # an EmbeddingStore: forward scores on the codes

The artifact of a store records ``model_config()`` = {"dim", "embedder"}; ``build_model`` rebuilds an empty table
of that shape (the skeleton ``polyquant.load`` hands to the restore).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .corpus import MODEL_NAME
from .store import normalize_rows  # norms that cannot overflow (3e38 entries)

__all__ = ["EmbeddingTable", "build_model", "EMBEDDERS"]

EMBEDDERS = (MODEL_NAME,)  # text models a store can record (``corpus.embed_texts``)
_MODEL_KEYS = {"dim", "embedder"}


class EmbeddingTable(nn.Module):
    """Float embedding vectors with ids; ``forward(queries)`` returns cosine scores (Q, N).

    Args:
        vectors: (N, D) float vectors (any norm: normalised when scored and when stored; a memory-mapped array
            stays mapped).
        ids: int64 (N,) ids, unique; default 0..N-1.
        embedder: the text model the vectors come from (one of ``EMBEDDERS``), or None.
        texts: the text of each vector (N strings), or None; the quantized store keeps them (``set_texts``), so
            that a search can show them.
    """

    def __init__(self, *, vectors: Tensor, ids: Tensor | None = None, embedder: str | None = None,
                 texts: Sequence[str] | None = None) -> None:
        super().__init__()
        if vectors.dim() != 2 or not vectors.dtype.is_floating_point:
            raise ValueError(f"vectors must be float (N, D), got {vectors.dtype} {tuple(vectors.shape)}")
        if ids is None:
            ids = torch.arange(len(vectors), dtype=torch.int64)
        if tuple(ids.shape) != (len(vectors),):
            raise ValueError(f"ids must be ({len(vectors)},), got {tuple(ids.shape)}")
        if embedder is not None and embedder not in EMBEDDERS:
            raise ValueError(f"unknown embedder {embedder!r} (known: {', '.join(EMBEDDERS)})")
        if texts is not None and len(texts) != len(vectors):
            raise ValueError(f"texts must hold one text per vector ({len(vectors)}), got {len(texts)}")
        self.register_buffer("vectors", vectors)
        self.register_buffer("ids", ids.long())
        self.embedder = embedder
        self.texts = texts

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def forward(self, queries: Tensor) -> Tensor:
        q = normalize_rows(queries.reshape(-1, queries.shape[-1])).reshape(queries.shape)
        return q @ normalize_rows(self.vectors).T  # (Q, N)

    def model_config(self) -> dict[str, Any]:
        """How ``build_model`` rebuilds this table's shape."""
        return {"dim": self.dim, "embedder": self.embedder}


def build_model(model_config: dict[str, Any]) -> EmbeddingTable:
    """An empty ``EmbeddingTable`` of the recorded dimension (the skeleton of ``polyquant.load``)."""
    if not isinstance(model_config, dict) or set(model_config) != _MODEL_KEYS:
        raise ValueError(f"an embeddings model config has exactly the keys {sorted(_MODEL_KEYS)}, got {model_config!r}")
    dim = model_config["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 1 << 20:
        raise ValueError(f"model config dim must be an integer in [1, 2^20], got {dim!r}")
    return EmbeddingTable(vectors=torch.zeros(0, dim), embedder=model_config["embedder"])
