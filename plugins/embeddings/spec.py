"""Entry point of the embeddings plugin (light: no torch): ``polyquant.plugins.embeddings.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import PluginSpec

SPEC = PluginSpec(
    name="embeddings",
    api_version=2,
    summary="Quantized, dimension-reduced embedding stores (fp16 / bf16 / fp8 / int8 / uint8 / int4 / binary, "
    "PCA / random projection / truncation) with top-k search on the codes and rescoring.",
    methods={
        "float16": "float16 codes (2 bytes per dim), scored by upcasting one chunk at a time.",
        "bfloat16": "bfloat16 codes (2 bytes per dim), scored by upcasting one chunk at a time.",
        "fp8_e4m3": "fp8 E4M3 codes (1 byte per dim) with a per-vector or per-dimension scale.",
        "fp8_e5m2": "fp8 E5M2 codes (1 byte per dim) with a per-vector or per-dimension scale.",
        "int8": "Symmetric int8 codes, per-dimension calibrated absmax, scored on the codes.",
        "uint8": "uint8 codes over per-dimension calibrated [min, max], dequantized at cell midpoints.",
        "int4": "4-bit codes over per-dimension calibrated [min, max], two per byte.",
        "binary": "Sign bits (1 bit per dim), Hamming top-k, float rescoring (4x by default).",
    },
    requires=(),
    impl="polyquant.plugins.embeddings.methods",
    demo="polyquant.plugins.embeddings.demo:run_demo",
    cli="polyquant.plugins.embeddings.commands",  # light: `polyquant search` checks its options without torch
)
