"""Baselines of the diffusion plugin, on the same quantization points and float-kept layers as FP4DiT
(``archs.LAYOUTS``):

| method         | weights                                                        | activations (online, token-wise) |
|----------------|----------------------------------------------------------------|----------------------------------|
| int_minmax     | INT, asymmetric min-max per group of in_features               | INT, symmetric absmax            |
| int8           | INT8, symmetric absmax per output channel                      | INT8                             |
| adaround       | ``grid="int"``: int_minmax's INT4 grid; ``"fp"``: FP4DiT's     | INT (int grid) / FP (fp grid)    |
|                | E2M1 / E3M0 grid; plain AdaRound (V, not V' = s V) per block   |                                  |
| fp_fixed_bias  | FP4DiT's formats with an integer exponent bias: each group's   | FP (FP4DiT's)                    |
|                | scale rounded up to a power of two (``primitives.pow2_scale``) |                                  |

``int_minmax`` is Q-Diffusion's round-to-nearest starting point (Li et al., ICCV 2023, arXiv 2302.04304) with
FP4DiT's group size and token-wise activations, so the comparison isolates the weight grid (INT vs minifloat);
``adaround`` is Q-Diffusion's BRECQ / AdaRound reconstruction (plain rounding variables, the core's default lr);
``fp_fixed_bias`` is the paper's ablation of the real-valued exponent bias (a standard minifloat's bias is an
integer, so its range only moves in powers of two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from polyquant.config import QuantConfig, bits_field, float_field, int_field

__all__ = ["IntMinMaxConfig", "Int8Config", "AdaRoundConfig", "FixedBiasConfig", "int_act_spec", "int_rules",
           "BASELINES"]


@dataclass
class IntMinMaxConfig(QuantConfig):
    """Q-Diffusion-like RTN baseline: INT weights with per-group min-max (asymmetric) ranges, INT token-wise
    dynamic activations.

    Args:
        wbits: weight bits (INT, asymmetric, per group).
        abits: activation bits (INT, symmetric, one absmax scale per token, every forward).
        group_size: consecutive input weights sharing one range; must divide every quantized linear's in_features.
            0: one range per output channel (Q-Diffusion's own granularity, the baseline FP4DiT's paper compares
            with).
        quantize_qkv: also quantize attention's q, k and v (token-wise); softmax stays float.
    """

    wbits: int = bits_field(4, 2, 8)
    abits: int = bits_field(8, 4, 8)
    group_size: int = int_field(32, 0, 4096)
    quantize_qkv: bool = True


@dataclass
class Int8Config(QuantConfig):
    """W8A8 INT: symmetric absmax INT8 weights per output channel, INT8 token-wise dynamic activations (the
    8-bit point every diffusion PTQ paper starts from).

    Args:
        quantize_qkv: also quantize attention's q, k and v (token-wise INT8); softmax stays float.
    """

    quantize_qkv: bool = True


@dataclass
class AdaRoundConfig(QuantConfig):
    """Plain AdaRound block reconstruction over the calibration timesteps (BRECQ / Q-Diffusion), on an INT or
    FP4DiT's FP grid: the baseline scale-aware AdaRound must beat at equal iterations.

    Args:
        grid: "int": asymmetric INT4 min-max per group (int_minmax's) with INT token-wise activations; "fp":
            FP4DiT's E2M1 (E3M0 on the first FFN linear) with FP token-wise activations.
        abits: activation bits: 8 or 6 (INT8 / INT6, or E3M4 / E2M3).
        group_size: consecutive input weights sharing one scale (FP4DiT's 32 on the digits DiT); 0: one per output
            channel (Q-Diffusion's INT granularity; the FP grid needs a group size).
        quantize_qkv: also quantize attention's q, k and v.
        recon_iters: AdaRound iterations per transformer block (Q-Diffusion's 20k; 0: round-to-nearest).
        recon_lr: Adam learning rate of V; 0 uses the core's AdaRound default (min(1e-2, 20 / iters)).
        recon_batch: calibration samples per step.
        seed: seed of the mini-batches.
    """

    grid: Literal["int", "fp"] = "int"
    abits: Literal[6, 8] = 8
    group_size: int = int_field(32, 0, 4096)
    quantize_qkv: bool = True
    recon_iters: int = int_field(300, 0, 100_000)
    recon_lr: float = float_field(0.0, 0.0, 1.0)
    recon_batch: int = int_field(16, 1, 4096)
    seed: int = int_field(0, 0, 2**31 - 1)


@dataclass
class FixedBiasConfig(QuantConfig):
    """FP4DiT's formats and activations with a standard (integer) exponent bias: every weight group's scale is
    the smallest power of two that keeps its absmax on the grid (round-to-nearest; the real-valued-bias ablation).

    Args:
        weight_format: "e2m1" or "e1m2" (all quantized weights but the first FFN linear).
        ff1_format: the first FFN linear's format ("e3m0", the paper's, or "e2m1" / "e1m2").
        group_size: consecutive input weights sharing one scale.
        abits: activation bits, online token-wise FP: 8 (E3M4) or 6 (E2M3).
        quantize_qkv: also quantize attention's q, k and v.
    """

    weight_format: Literal["e2m1", "e1m2"] = "e2m1"
    ff1_format: Literal["e3m0", "e2m1", "e1m2"] = "e3m0"
    group_size: int = int_field(32, 1, 4096)
    abits: Literal[6, 8] = 8
    quantize_qkv: bool = True


def int_act_spec(abits: int):  # -> QuantSpec
    """Online token-wise symmetric INT activations."""
    from polyquant.nn import QuantSpec
    from polyquant.primitives import PerToken

    return QuantSpec(f"int{abits}", PerToken(), dynamic=True)


def int_rules(wbits: int, abits: int, group_size: int, *, symmetric: bool = False) -> list:  # -> list[QuantRule]
    """Every quantized Linear: INT min-max weights per group of ``group_size`` along in_features (0: per output
    channel), asymmetric unless ``symmetric``; token-wise INT inputs."""
    from polyquant.nn import QuantRule, QuantSpec
    from polyquant.primitives import PerChannel, PerGroup

    granularity = PerGroup(group_size, axis=-1) if group_size else PerChannel(0)
    weight = QuantSpec(f"int{wbits}", granularity, symmetric=symmetric)
    return [QuantRule(nn.Linear, weight=weight, input=int_act_spec(abits))]


BASELINES: dict[str, type[QuantConfig]] = {"int_minmax": IntMinMaxConfig, "int8": Int8Config,
                                           "adaround": AdaRoundConfig, "fp_fixed_bias": FixedBiasConfig}
