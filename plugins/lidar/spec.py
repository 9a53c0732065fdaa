"""Entry point of the LiDAR plugin (light: no torch): ``polyquant.plugins.lidar.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="lidar",
    api_version=API_VERSION,
    summary="LiDAR 3D detection (a pure-torch CenterPoint-Pillar on seeded synthetic scenes): LiDAR-PTQ beside "
    "TensorRT-style entropy, percentile, max-min, BRECQ and QDrop.",
    methods={
        "lidarptq": "LiDAR-PTQ: max-min + sparsity-aware grid search, TGPL (pseudo-label task loss) and adaptive "
        "rounding in block reconstruction.",
        "minmax": "Max-min ranges for weights (per channel) and activations (per tensor).",
        "entropy": "TensorRT-style entropy (KL histogram) activation ranges, max weights.",
        "percentile": "99.99th-percentile activation ranges, max-min weights.",
        "brecq": "BRECQ: MSE ranges, AdaRound block reconstruction on the block-output MSE.",
        "qdrop": "QDrop: BRECQ with activations randomly kept float (p = 0.5) during reconstruction.",
    },
    requires=("torch>=2.4",),
    impl="polyquant.plugins.lidar.methods",
    demo="polyquant.plugins.lidar.demo:run_demo",
)
