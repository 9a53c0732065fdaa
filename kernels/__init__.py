"""Shared Triton kernels with pure-torch references.

Each op has a ``*_reference`` torch function (the specification and the CPU path), a Triton kernel with its
launcher, and a dispatching function that runs Triton on CUDA tensors and the reference elsewhere.
``POLYQUANT_KERNELS=torch|triton`` forces a path (see ``_dispatch``). Triton is optional: this package imports
without it, and names are loaded lazily from their modules on first use.

| module     | ops                                                                                    |
|------------|----------------------------------------------------------------------------------------|
| quant      | quantize, dequantize (INT-k, FP ExMy; per-tensor/channel/group), quantize_dynamic (per-token) |
| gemm       | w4_gemm (int4 / fp4 weight-only, packed), int8_gemm and w8a8_linear (W8A8)              |
| hadamard   | fwht, fwht_quantize (n = 2^k, 12 * 2^k, 40 * 2^k, ...)                                  |
| vq         | vq_assign (fused distance + argmin), vq_decode, rvq_decode, rvq_assign                  |
| hamming    | pack_binary, hamming_topk (packed-bit Hamming top-k; CPU: popcount by FAISS or numpy)    |

The kernels speak the core's vocabulary and compute the core's definitions: formats are ``polyquant.formats``
objects or names, granularity is the core's ``block_size`` (``polyquant.primitives``), packed weights use the
core's row layout (``polyquant.pack.pack_rows``, the layout of artifacts), and the Hadamard matrix is the core's
(``polyquant.transforms.hadamard_matrix``). ``tests/kernels/test_core_agreement.py`` checks each pair.
"""

from __future__ import annotations

from polyquant.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # dispatch
    "use_triton": "_dispatch",
    "HAS_TRITON": "_dispatch",
    # quant
    "quantize": "quant",
    "dequantize": "quant",
    "quantize_dynamic": "quant",
    "quantize_reference": "quant",
    "dequantize_reference": "quant",
    "quantize_dynamic_reference": "quant",
    # gemm
    "pack_4bit": "gemm",
    "unpack_4bit": "gemm",
    "quantize_weight_4bit": "gemm",
    "dequantize_weight_4bit": "gemm",
    "w4_gemm": "gemm",
    "w4_gemm_reference": "gemm",
    "int8_gemm": "gemm",
    "int8_gemm_reference": "gemm",
    "w8a8_linear": "gemm",
    # hadamard
    "fwht": "hadamard",
    "fwht_reference": "hadamard",
    "fwht_quantize": "hadamard",
    "fwht_quantize_reference": "hadamard",
    # vq
    "vq_assign": "vq",
    "vq_assign_reference": "vq",
    "vq_decode": "vq",
    "vq_decode_reference": "vq",
    "rvq_decode": "vq",
    "rvq_decode_reference": "vq",
    "rvq_assign": "vq",
    # hamming
    "pack_binary": "hamming",
    "unpack_binary": "hamming",
    "hamming_distance_reference": "hamming",
    "hamming_topk": "hamming",
    "hamming_topk_reference": "hamming",
    "hamming_topk_cpu": "hamming",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
