"""The plugin's light spec: the entry point ``mamba_demo = "polyquant_mamba_demo.spec:SPEC"`` names it.

Imports nothing but ``polyquant.plugins`` (which imports no torch); the methods are imported on first use.
"""

from polyquant.plugins import API_VERSION, PluginSpec

SPEC = PluginSpec(
    name="mamba_demo",
    api_version=API_VERSION,
    summary="Example third-party plugin: a small Mamba-like model, W8A8 with an online Hadamard, and residual VQ.",
    methods={
        "w8a8": "Static W8A8 (int8 per-channel weights, min-max int8 activations), online Hadamard before out_proj.",
        "rvq": "Residual-VQ weights of every Linear (2 levels x 16 codes), float activations.",
    },
    requires=("torch>=2.4",),
    impl="polyquant_mamba_demo.methods",
    demo=None,
)
