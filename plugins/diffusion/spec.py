"""Entry point of the diffusion plugin (light: no torch, no diffusers): ``polyquant.plugins.diffusion.spec:SPEC``."""

from __future__ import annotations

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="diffusion",
    api_version=API_VERSION,
    summary="Post-training quantization of diffusion models (diffusers DiT, PixArt, SD3, Flux transformers, "
    "pipelines quantized in place; UNets): FP4DiT minifloat W4A8 / W4A6 beside INT and FP baselines, calibrated "
    "across the sampler's timesteps; CacheQuant's feature cache with quantization and ZOODiP's backprop-free "
    "personalization on UNets.",
    methods={
        "fp4dit": "FP4DiT (TMLR'25): E2M1 / E1M2 weights with per-group absmax scales (E3M0 on the first FFN "
        "linear), online token-wise FP activations (E3M4 / E2M3, q/k/v included), optional scale-aware AdaRound "
        "block reconstruction over timesteps.",
        "int_minmax": "Q-Diffusion-like RTN baseline: INT4 per-group min-max weights, INT8 token-wise dynamic "
        "activations.",
        "int8": "W8A8 INT baseline: INT8 per-channel weights, INT8 token-wise activations.",
        "adaround": "plain AdaRound block reconstruction (BRECQ / Q-Diffusion) on the INT4 or FP4DiT's FP grid.",
        "fp_fixed_bias": "FP4DiT's formats with an integer exponent bias (power-of-two group scales): the "
        "real-valued-bias ablation.",
        "cachequant": "CacheQuant (CVPR'25) on diffusers UNets: DeepCache with the DPS refresh schedule, W8A8 / W4A8 "
        "with per-timestep activation ranges fitted along the cached path, DEC corrections of the cache and "
        "quantization errors.",
        "zoodip": "ZOODiP (CVPR'25): a new class embedding learned against an INT8 weight-only UNet with "
        "zeroth-order gradients only (forward passes, no autograd graph), Subspace Gradient and partial uniform "
        "timestep sampling.",
    },
    requires=("torch>=2.4", "diffusers>=0.30"),
    impl="polyquant.plugins.diffusion.methods",
    demo="polyquant.plugins.diffusion.demo:run_demo",
)
