"""Entry point of the SSM plugin (light: no torch): ``polyquant.plugins.ssm.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="ssm",
    api_version=API_VERSION,
    summary="State-space models (transformers Mamba): Quamba W8A8 with a running percentile on the SSM input and "
    "an online Hadamard on its output, beside naive, SmoothQuant and QuaRot W8A8.",
    methods={
        "quamba": "Quamba W8A8: static per-tensor int8, percentile of |u| on the SSM input, Hadamard before out_proj.",
        "naive": "Naive W8A8: Quamba's quantization points, min-max ranges, no percentile, no Hadamard.",
        "smoothquant": "SmoothQuant W8A8: per-channel migration of in_proj's input range into its weight (folded "
        "into the RMSNorm), then naive W8A8.",
        "quarot": "QuaRot-style W8A8: online Hadamard rotations of in_proj's and out_proj's inputs (folded into "
        "their weights), then naive W8A8.",
    },
    requires=("torch>=2.4", "transformers>=4.45"),
    impl="polyquant.plugins.ssm.methods",
    demo="polyquant.plugins.ssm.demo:run_demo",
)
