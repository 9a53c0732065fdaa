"""Entry point of the vit plugin (light: no torch, no timm): ``polyquant.plugins.vit.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import PluginSpec

SPEC = PluginSpec(
    name="vit",
    api_version=2,
    summary="Post-training quantization of vision transformers: AdaLog, Q-HyViT and baselines on timm ViT / DeiT / "
    "Swin / MobileViT models.",
    methods={
        "adalog": "AdaLog (ECCV'24): adaptive-base log quantizer for post-softmax / post-GELU, FPCS search, "
        "LayerNorm reparameterization, optional block reconstruction.",
        "qhyvit": "Q-HyViT (IoT-J'24): hybrid-ViT PTQ with per-layer granularity / scheme choice and bridge-block "
        "calibration.",
        "minmax": "Min-max uniform PTQ (per-channel weights, per-tensor activations).",
        "percentile": "Percentile-clipped uniform PTQ.",
        "log2": "AdaLog's pipeline with a log2 post-softmax quantizer (FQ-ViT / RepQ-ViT style).",
        "logsqrt2": "RepQ-ViT style: LayerNorm reparameterization and a log-sqrt2 post-softmax quantizer.",
        "twin_uniform": "PTQ4ViT style twin-uniform post-softmax and post-GELU quantizers.",
        "hybrid_minmax": "Min-max ranges on Q-HyViT's placement in a hybrid (the fair min-max baseline of Q-HyViT).",
        "hybrid_percentile": "Percentile-clipped ranges on Q-HyViT's placement in a hybrid.",
    },
    requires=("timm>=1.0",),
    impl="polyquant.plugins.vit.methods",
    demo="polyquant.plugins.vit.demo:run_demo",
)
