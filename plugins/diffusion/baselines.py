"""Baselines of the diffusion plugin, on the same quantization points and float-kept layers as FP4DiT
(``fp4dit.KEEP_FLOAT``):

| method       | weights                                        | activations                                      |
|--------------|------------------------------------------------|--------------------------------------------------|
| int_minmax   | INT, asymmetric min-max per group of in_features | INT8 online token-wise dynamic (symmetric)     |

``int_minmax`` is Q-Diffusion's round-to-nearest starting point (Li et al., ICCV 2023, arXiv 2302.04304) with
FP4DiT's group size and token-wise activations, so the comparison isolates the weight grid (INT vs minifloat).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from polyquant.config import QuantConfig, bits_field, int_field

__all__ = ["IntMinMaxConfig", "int_minmax_rules", "BASELINES"]


@dataclass
class IntMinMaxConfig(QuantConfig):
    """Q-Diffusion-like RTN baseline: INT weights with per-group min-max (asymmetric) ranges, INT8 token-wise
    dynamic activations.

    Args:
        wbits: weight bits (INT, asymmetric, per group).
        abits: activation bits (INT, symmetric, one absmax scale per token, every forward).
        group_size: consecutive input weights sharing one range; must divide every quantized linear's in_features.
        quantize_qkv: also quantize attention's q, k and v (token-wise); softmax stays float.
    """

    wbits: int = bits_field(4, 2, 8)
    abits: int = bits_field(8, 4, 8)
    group_size: int = int_field(32, 1, 4096)
    quantize_qkv: bool = True


def int_act_spec(abits: int):  # -> QuantSpec
    from polyquant.nn import QuantSpec
    from polyquant.primitives import PerToken

    return QuantSpec(f"int{abits}", PerToken(), dynamic=True)


def int_minmax_rules(config: IntMinMaxConfig) -> list:  # -> list[QuantRule]
    """Every quantized Linear: asymmetric INT min-max per group along in_features, token-wise INT inputs."""
    from polyquant.nn import QuantRule, QuantSpec
    from polyquant.primitives import PerGroup

    weight = QuantSpec(f"int{config.wbits}", PerGroup(config.group_size, axis=-1), symmetric=False)
    return [QuantRule(nn.Linear, weight=weight, input=int_act_spec(config.abits))]


BASELINES: dict[str, type[QuantConfig]] = {"int_minmax": IntMinMaxConfig}
