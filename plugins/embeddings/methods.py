"""The embeddings plugin's implementation module: handlers and artifacts (the command-line hooks are in
``commands``, the plugin's light ``spec.cli``).

    METHODS: dict[str, type[QuantConfig]]     format name -> config class (``configs``); a handler each, below

Python (the core contract, ``polyquant.api``): the model is an ``EmbeddingTable`` of float vectors, the quantized
model an ``EmbeddingStore`` (``store``) whose forward scores on the codes:

    import polyquant as pq
    from polyquant.plugins.embeddings import EmbeddingTable, FP8E4M3Config

    qm = pq.quantize(EmbeddingTable(vectors=x), FP8E4M3Config(reduce="pca", keep=0.5), calib=[x[:10_000]])
    scores, ids = qm.model.search(queries, k=10)
    pq.save(qm, "docs.pqs"); store = pq.load("docs.pqs").model

For stores larger than RAM use ``EmbeddingStore.fit(..., workdir=...)``, ``add`` in chunks and
``EmbeddingStore.load(path, mmap=True)``. To serve a store from FAISS, usearch or Qdrant: ``export.to_faiss`` /
``to_usearch`` / ``to_qdrant``.

Command line (options generated from the config fields, plus ``--input``; ``commands``):

    polyquant quantize embeddings/int8 --input vectors.npy --out store.pqs        # (N, D) float .npy
    polyquant quantize embeddings/fp8_e4m3 --reduce pca --keep 0.5 --input texts.txt --out store.pqs
    polyquant search store.pqs "how do I parse a date" -k 10                      # prints the texts of the hits

Artifact tensors: ``codes`` (N, W) in the format's dtype, ``ids`` int64 (N,), ``live`` bool (N,) (tombstones),
``row_scale`` float32 (N,) (fp8 with a vector scale), ``originals`` float32 (N, D) (``keep_originals``),
``codec.step`` / ``codec.offset`` (D',), ``reduce.matrix`` (D', D) / ``reduce.mean`` (D,), and the texts of the
vectors if the table had them: ``texts.data`` uint8 (B,), ``texts.offsets`` int64 (n + 1,), ``texts.ids`` int64
(n,) (``texts.TextTable``); the manifest's model config is {"dim", "embedder"} and its state {"slots", "live",
"reduced_dim", "format", "scale"}.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polyquant.api import Calibration, MethodExample, QuantizedModel, RunOptions, describe_model, register_handler
from polyquant.artifact import Artifact, ArtifactError
from polyquant.config import UsageError

from .configs import METHODS, EmbeddingConfig
from .models import EmbeddingTable
from .models import build_model as _build_model
from .store import PLUGIN, EmbeddingStore

__all__ = ["METHODS", "build_model", "example"]


# --- handlers ----------------------------------------------------------------------------------------------------


def _quantize(model: Any, config: EmbeddingConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
    if not isinstance(model, EmbeddingTable):
        raise UsageError(f"embeddings methods quantize an EmbeddingTable (polyquant.plugins.embeddings), got "
                        f"{type(model).__name__}")
    store = EmbeddingStore.fit(calib.inputs(config.calib_size), config=config, embedder=model.embedder)
    store.add(model.vectors, ids=model.ids, progress=run.progress)
    if model.texts is not None:
        store.set_texts(model.ids, model.texts)
    return store.quantized_model()


def _export(qm: QuantizedModel) -> dict[str, Tensor]:
    assert isinstance(qm.model, EmbeddingStore)
    return qm.model.tensors()


def _restore(model: Any, config: EmbeddingConfig, artifact: Artifact) -> QuantizedModel:
    if not isinstance(model, EmbeddingTable):
        raise ArtifactError(f"an embedding store is restored on an EmbeddingTable, got {type(model).__name__}")
    try:
        store = EmbeddingStore.from_tensors(artifact.tensors, config=config, dim=model.dim, embedder=model.embedder,
                                            state=artifact.config.get("state"))
    except ValueError as e:
        raise ArtifactError(f"not a valid {artifact.method} embedding store: {e}") from None
    return store.quantized_model()


for _name, _cls in METHODS.items():
    register_handler(_cls, plugin=PLUGIN, method=_name, export=_export, restore=_restore, copy_model=False)(_quantize)


def build_model(model_config: dict[str, Any]) -> EmbeddingTable:
    """The empty float table an artifact's model config describes (``polyquant.load`` calls this)."""
    return _build_model(model_config)


def example(method: str) -> MethodExample:
    """A fast case of ``method`` on seeded clustered vectors (the core's contract test runs it); the methods
    exercise different reductions between them."""
    from .data import example_vectors

    extra: dict[str, dict[str, Any]] = {
        "bfloat16": {"keep_originals": True, "rescore": 2},
        "fp8_e4m3": {"reduce": "pca", "keep": 0.5},
        "fp8_e5m2": {"reduce": "truncate", "dims": 24, "scale": "dimension"},
        "int4": {"reduce": "pca", "keep": 0.75},
        "binary": {"reduce": "random", "keep": 0.75},
    }
    vectors = example_vectors(512, 32)
    config = METHODS[method](calib_size=256, **extra.get(method, {}))
    table = describe_model(EmbeddingTable(vectors=vectors), {"dim": 32, "embedder": None})
    return MethodExample(table, config, [vectors[:256]], example_vectors(8, 32, seed=1), graph_breaks=(
        "a search reads its top-k back and scans the codes with FAISS / numpy on the CPU (the query encoder is the "
        "float model; the store is not a network)"))
