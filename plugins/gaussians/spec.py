"""Entry point of the gaussians plugin (light: no torch): ``polyquant.plugins.gaussians.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="gaussians",
    api_version=API_VERSION,
    summary="3D Gaussian Splatting scene compression: OMG's sub-vector quantization of a 3DGS .ply (fp16 positions "
    "coded losslessly, range-coded indices, fp16 codebooks), OMG's attribute-MLP representation, and the full-vector "
    "VQ and 8-bit baselines.",
    methods={
        "svq": "OMG sub-vector quantization: per-slice k-means codebooks for scale, rotation, opacity and SH.",
        "vq": "Baseline: one full-vector codebook per attribute with as many entries as SVQ's slices together.",
        "uniform8": "Baseline: every attribute channel on a per-channel uniform 8-bit grid.",
        "omg": "OMG: attribute MLPs on static / view features, then SVQ of scale, rotation and features (66 bits).",
    },
    requires=("torch>=2.4", "plyfile>=1.0", "constriction>=0.4"),
    impl="polyquant.plugins.gaussians.methods",
    demo="polyquant.plugins.gaussians.demo:run_demo",
)
