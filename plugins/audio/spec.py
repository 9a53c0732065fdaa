"""Entry point of the audio plugin (light: no torch): ``polyquant.plugins.audio.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="audio",
    api_version=API_VERSION,
    summary="Neural audio codecs: RVQ (EnCodec-style) and GRVQ (HiFi-Codec-style) bottlenecks fitted on a codec's "
    "latent frames, an FSQ baseline, and INT8 / INT4 post-training quantization of the codec's convolutions.",
    methods={
        "rvq": "EnCodec-style residual VQ at a target bandwidth: stage-wise k-means, EMA passes, dead-code restart.",
        "grvq": "HiFi-Codec-style group-residual VQ: an RVQ per channel group, tokens in HiFi-Codec's order.",
        "fsq": "FSQ baseline: finite scalar quantization of the frames' principal directions at a target bandwidth.",
        "ptq": "INT8 / INT4 weights (optionally UINT8 inputs) of the codec's encoder and decoder convolutions.",
    },
    requires=("torch>=2.4", "torchaudio>=2.4"),
    impl="polyquant.plugins.audio.methods",
    demo="polyquant.plugins.audio.demo:run_demo",
)
