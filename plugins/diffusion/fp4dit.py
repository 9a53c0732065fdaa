"""FP4DiT (Chen, Mills, Niu, "FP4DiT: Towards Effective Floating Point Quantization for Diffusion Transformers",
TMLR 2025, arXiv 2503.15465; code cccrrrccc/FP4DiT) on diffusers DiTs, as core fake quantization:

- weights: 4-bit minifloat with a real-valued exponent bias, i.e. the core's ``FloatFormat`` ExMy grid times one
  absmax scale per group of ``group_size`` consecutive input weights (the top code is the group's max; paper and
  code: group 128, E2M1; E1M2 an option); the first FFN linear, the one before GELU (diffusers
  ``ff.net.0.proj``), gets E3M0, a power-of-two grid;
- activations: online token-wise dynamic FP (E3M4 for A8, E2M3 for A6): every token's absmax over its channels,
  recomputed on every forward, no calibrated range; on every quantized linear's input and, with
  ``quantize_qkv``, on attention's q, k and v (the core's product patches, ``methods.py``); the softmax output
  stays float (the code's ``sm_abit`` = 16);
- optional block reconstruction over the calibration timesteps with scale-aware AdaRound (V' = step * V, core
  ``reconstruct`` with ``ReconstructConfig(scale_aware=True)``); ``recon_iters`` = 0 is round-to-nearest.

Layers kept in float, the code's skip list (``quant_model.py::quant_module_refactor``) mapped to diffusers'
``DiTTransformer2DModel`` names (the plugin's models are ``DiTDenoiser``s: every name under ``transformer.``):

| FP4DiT (PixArt / Hunyuan)           | diffusers DiT                                                         |
|-------------------------------------|-----------------------------------------------------------------------|
| ``pos_embed`` (patch embedding)     | ``pos_embed.proj`` (Conv2d)                                           |
| ``t_embedder`` / ``time_extra_emb`` | ``transformer_blocks.*.norm1.emb.timestep_embedder.linear_1/2``       |
| ``text_embedder`` (the condition)   | ``transformer_blocks.*.norm1.emb.class_embedder`` (an Embedding)      |
| ``norm_out``, ``proj_out`` (final)  | ``proj_out_1``, ``proj_out_2`` (and the affine-free ``norm_out``)     |

Everything else (attention ``to_q / to_k / to_v / to_out.0``, ``ff.net.0.proj``, ``ff.net.2`` and the adaLN
modulation ``norm1.linear`` of every block) is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from polyquant.config import QuantConfig, float_field, int_field

__all__ = ["FP4DiTConfig", "KEEP_FLOAT", "FF1_PATTERN", "ACT_FORMATS", "fp4dit_rules", "fp_act_spec"]

# fnmatch patterns of the module names kept float (see the table above); "*" prefixes let them match a bare DiT too
KEEP_FLOAT = ("*pos_embed*", "*.norm1.emb.*", "*proj_out*", "*norm_out*")
FF1_PATTERN = "*.ff.net.0.proj"  # the first FFN linear (before GELU) of diffusers' FeedForward
ACT_FORMATS = {8: "e3m4", 6: "e2m3"}  # activation bits -> the code's format (act_mantissa_bits 4 / 3)


@dataclass
class FP4DiTConfig(QuantConfig):
    """FP4DiT W4A8 / W4A6: 4-bit minifloat weights with per-group absmax scales, online token-wise FP activations.

    Args:
        weight_format: 4-bit format of every quantized weight but the first FFN linear: "e2m1" (the paper's
            default) or "e1m2" (PixArt-Sigma's; a uniform grid).
        ff1_format: format of the first FFN linear (before GELU, ``ff.net.0.proj``): "e3m0" (the paper's), or
            "e2m1" / "e1m2" to turn the exception off.
        group_size: consecutive input weights sharing one absmax scale (the paper's 128; 32 for a width-64 DiT);
            must divide every quantized linear's in_features.
        abits: activation bits, online token-wise: 8 (E3M4) or 6 (E2M3).
        quantize_qkv: also quantize attention's q, k and v (token-wise, the activation format); softmax stays float.
        recon_iters: scale-aware (or plain) AdaRound iterations per transformer block over the calibration
            timesteps; 0: round-to-nearest weights (no reconstruction). The paper: 2500.
        scale_aware: learn V' = step * V (FP4DiT's scale-aware AdaRound) instead of plain AdaRound's V.
        recon_lr: Adam learning rate of the rounding variables; 0 uses the core's default (1e-4 on V' for
            scale-aware, as the paper; plain AdaRound's min(1e-2, 20 / iters)).
        recon_batch: calibration samples per reconstruction step (the paper's 16).
        seed: seed of the reconstruction's mini-batches.
    """

    weight_format: Literal["e2m1", "e1m2"] = "e2m1"
    ff1_format: Literal["e3m0", "e2m1", "e1m2"] = "e3m0"
    group_size: int = int_field(32, 1, 4096)
    abits: Literal[6, 8] = 8
    quantize_qkv: bool = True
    recon_iters: int = int_field(0, 0, 100_000)
    scale_aware: bool = True
    recon_lr: float = float_field(0.0, 0.0, 1.0)
    recon_batch: int = int_field(16, 1, 4096)
    seed: int = int_field(0, 0, 2**31 - 1)


def fp_act_spec(abits: int):  # -> QuantSpec
    """Online token-wise FP activations: one absmax scale per token (all but the last dim), every forward."""
    from polyquant.nn import QuantSpec
    from polyquant.primitives import PerToken

    return QuantSpec(ACT_FORMATS[abits], PerToken(), dynamic=True)


def fp4dit_rules(config: FP4DiTConfig) -> list:  # -> list[QuantRule]
    """The quant rules of every quantized Linear (first match wins): E3M0 (``ff1_format``) on the first FFN
    linear, ``weight_format`` elsewhere; symmetric absmax per group along in_features; token-wise FP inputs."""
    from polyquant.nn import QuantRule, QuantSpec
    from polyquant.primitives import PerGroup

    act = fp_act_spec(config.abits)
    group = PerGroup(config.group_size, axis=-1)
    return [QuantRule(FF1_PATTERN, weight=QuantSpec(config.ff1_format, group), input=act),
            QuantRule(nn.Linear, weight=QuantSpec(config.weight_format, group), input=act)]
