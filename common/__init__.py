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

from .api import Calibration, QuantizedModel, RunOptions, load, quantize, register_handler, save  # noqa: E402
from .artifact import Artifact, ArtifactError  # noqa: E402
from .config import ConfigError, QuantConfig  # noqa: E402
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
    quantize_tensor,
)


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
    "GroupedResidualVQ",
    "ProductVQ",
    "kmeans",
    "batched_kmeans",
]
