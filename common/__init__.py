"""polyquant: quantization for non-LLM models.

One contract for every method of every plugin (``polyquant.api``):

    import polyquant as pq
    from polyquant.plugins.vit.adalog import AdaLogConfig

    qm = pq.quantize(model, AdaLogConfig(wbits=4, abits=4), calib=batches)   # -> pq.QuantizedModel
    pq.save(qm, "model.safetensors")          # packed codes + qparams + JSON manifest, never pickle
    qm = pq.load("model.safetensors")         # the plugin rebuilds the model; outputs identical

The building blocks are public too: formats and pure primitives (``quantize_tensor``, ``dequantize``,
``fake_quantize``), fake-quant modules (``prepare`` / ``calibrate``), capture, searches, reconstruction,
rotations, vector quantization, bit packing and the artifact file format (``polyquant.artifact``).
"""

from __future__ import annotations

__version__ = "0.1.0"

import pkgutil as _pkgutil  # noqa: E402

from .lazy import lazy_exports  # noqa: E402  (stdlib only)

# Every public name is imported from its module on first access (PEP 562), so ``import polyquant`` (and with it
# ``from polyquant.plugins import PluginSpec``, which a plugin's light spec module runs) does not import torch.
_EXPORTS: dict[str, str] = {
    # api
    "Calibration": "api",
    "QuantizedModel": "api",
    "RunOptions": "api",
    "load": "api",
    "quantize": "api",
    "register_handler": "api",
    "save": "api",
    # artifact
    "Artifact": "artifact",
    "ArtifactError": "artifact",
    # config
    "ConfigError": "config",
    "QuantConfig": "config",
    # formats
    "BinaryFormat": "formats",
    "FloatFormat": "formats",
    "IntFormat": "formats",
    "LogFormat": "formats",
    "get_format": "formats",
    "list_formats": "formats",
    # nn
    "ActQuantizer": "nn",
    "QuantConv1d": "nn",
    "QuantConv2d": "nn",
    "QuantConv3d": "nn",
    "QuantLinear": "nn",
    "QuantMatMul": "nn",
    "QuantRule": "nn",
    "QuantSpec": "nn",
    "Quantizer": "nn",
    "calibrate": "nn",
    "prepare": "nn",
    "set_state": "nn",
    # pack
    "pack_bits": "pack",
    "pack_signed": "pack",
    "unpack_bits": "pack",
    "unpack_signed": "pack",
    # transforms
    "HadamardRotation": "transforms",
    "fold_hadamard_into_linear": "transforms",
    "fold_layernorm_into_linears": "transforms",
    "fold_scale_into_linear": "transforms",
    "fwht": "transforms",
    "hadamard_matrix": "transforms",
    "hadamard_transform": "transforms",
    "random_hadamard": "transforms",
    # vq
    "GroupedVQ": "vq",
    "FSQ": "fsq",
    "CodebookOptions": "vq",
    "GroupedResidualVQ": "vq",
    "ProductVQ": "vq",
    "ResidualVQ": "vq",
    "VectorQuantizer": "vq",
    "batched_kmeans": "vq",
    "kmeans": "vq",
    # primitives
    "PerChannel": "primitives",
    "PerGroup": "primitives",
    "PerTensor": "primitives",
    "PerToken": "primitives",
    "choose_qparams": "primitives",
    "dequantize": "primitives",
    "fake_quantize": "primitives",
    "quantize_tensor": "primitives",
}

# Submodules reachable as attributes without an explicit import (``pq.api.MethodExample``, ``pq.artifact``), as
# when this file imported them eagerly: every public module of this folder (listed, not imported), and the two
# subpackages (in a source checkout they live in their own folders, see [tool.setuptools.package-dir]).
_SUBMODULES: tuple[str, ...] = tuple(
    sorted({m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_")} | {"kernels", "plugins"})
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, submodules=_SUBMODULES)
del lazy_exports, _pkgutil

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
    "quantize_tensor",
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
    "quantize",
    "save",
    "load",
    "QuantizedModel",
    "Calibration",
    "RunOptions",
    "register_handler",
    "QuantConfig",
    "ConfigError",
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
    "GroupedVQ",
    "FSQ",
    "CodebookOptions",
    "GroupedResidualVQ",
    "ProductVQ",
    "kmeans",
    "batched_kmeans",
]
