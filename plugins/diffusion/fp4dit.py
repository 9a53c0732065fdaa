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

Layers kept in float follow the code's skip list (``quant_model.py::quant_module_refactor``: patch embedding,
timestep and text / label embedders, final norm and projection), mapped to each diffusers class in ``archs.py``
(DiT, PixArt, SD3, Flux); every other Linear (attention q / k / v / out, the FFN, the blocks' adaLN modulation)
is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from polyquant.config import QuantConfig, float_field, int_field

__all__ = ["FP4DiTConfig", "ACT_FORMATS", "fp_rules", "fp_act_spec"]

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


def fp_rules(weight_format: str, ff1_format: str, group_size: int, abits: int, ff1: list[str]) -> list:
    """The quant rules of every quantized Linear (first match wins): ``ff1_format`` (E3M0) on the first FFN
    linears (``ff1``: their fnmatch patterns, ``archs.ff1_patterns``), ``weight_format`` elsewhere; symmetric
    absmax per group along in_features; token-wise FP inputs."""
    from polyquant.nn import QuantRule, QuantSpec
    from polyquant.primitives import PerGroup

    act = fp_act_spec(abits)
    group = PerGroup(group_size, axis=-1)
    return [*(QuantRule(p, weight=QuantSpec(ff1_format, group), input=act) for p in ff1),
            QuantRule(nn.Linear, weight=QuantSpec(weight_format, group), input=act)]
