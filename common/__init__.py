"""polyquant: quantization for non-LLM models.

    import polyquant as pq
    qmodel = pq.prepare(model, [pq.QuantRule("*", weight=pq.QuantSpec("int4", pq.PerChannel(0)))])
    pq.calibrate(qmodel, batches)
    pq.save(qmodel, "model.safetensors")          # packed codes + scales + JSON manifest, never pickle
    pq.restore(pq.prepare(model, rules), pq.load("model.safetensors"))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

from .artifact import Artifact, ArtifactError  # noqa: E402
from .formats import BinaryFormat, FloatFormat, IntFormat, LogFormat, get_format, list_formats  # noqa: E402
from .nn import (  # noqa: E402
    ActQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    QuantMatMul,
    QuantRule,
    QuantSpec,
    Quantizer,
    calibrate,
    prepare,
    set_state,
)
from .pack import pack_bits, pack_signed, unpack_bits, unpack_signed  # noqa: E402
from .transforms import (  # noqa: E402
    HadamardRotation,
    fold_hadamard_into_linear,
    fold_layernorm_into_linears,
    fold_scale_into_linear,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard,
)
from .vq import GroupedResidualVQ, ProductVQ, ResidualVQ, VectorQuantizer, batched_kmeans, kmeans  # noqa: E402
from .primitives import (  # noqa: E402
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)


def save(obj: Any, path: str | os.PathLike[str], **manifest: Any) -> Path:
    """Save an ``Artifact`` or a calibrated model (packed with ``export``) to one safetensors file, atomically.

    For a model, keyword arguments ``plugin``, ``method``, ``config`` and ``meta`` go into the manifest.
    """
    import torch

    from . import artifact
    from .export import export

    if isinstance(obj, Artifact):
        if manifest:
            raise TypeError("manifest fields are taken from the Artifact itself")
        return artifact.save(obj, path)
    if isinstance(obj, torch.nn.Module):
        unknown = set(manifest) - {"plugin", "method", "config", "meta"}
        if unknown:
            raise TypeError(f"unknown manifest fields {sorted(unknown)}")
        return artifact.save(export(obj, **manifest), path)
    raise TypeError(f"polyquant.save takes an Artifact or a torch.nn.Module, got {type(obj).__name__}")


def load(path: str | os.PathLike[str]) -> Artifact:
    """Load and verify an artifact (raises ``ArtifactError`` for anything truncated, tampered or foreign)."""
    from . import artifact

    return artifact.load(path)


def restore(model: Any, art: Artifact) -> Any:
    """Load an artifact into a model prepared with the same rules; see ``polyquant.export.restore``."""
    from .export import restore as _restore

    return _restore(model, art)


__all__ = [
    "__version__",
    "Artifact",
    "ArtifactError",
    "IntFormat",
    "FloatFormat",
    "LogFormat",
    "BinaryFormat",
    "get_format",
    "list_formats",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "QuantSpec",
    "QuantRule",
    "Quantizer",
    "ActQuantizer",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantMatMul",
    "prepare",
    "calibrate",
    "set_state",
    "save",
    "load",
    "restore",
    "pack_bits",
    "unpack_bits",
    "pack_signed",
    "unpack_signed",
    "HadamardRotation",
    "hadamard_matrix",
    "hadamard_transform",
    "fwht",
    "random_hadamard",
    "fold_hadamard_into_linear",
    "fold_layernorm_into_linears",
    "fold_scale_into_linear",
    "VectorQuantizer",
    "ResidualVQ",
    "GroupedResidualVQ",
    "ProductVQ",
    "kmeans",
    "batched_kmeans",
]
