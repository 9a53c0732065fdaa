"""The baselines LiDAR-PTQ is compared with, on the same quantization points (``placement.py``):

| method       | weights (per channel)        | activations (per tensor)                     | then                        |
|--------------|------------------------------|----------------------------------------------|-----------------------------|
| ``minmax``   | max-min                      | max-min                                      |                             |
| ``entropy``  | max-min                      | TensorRT's KL histogram (``entropy`` observer)|                             |
| ``percentile``| max-min                     | percentile of the values (99.99)             |                             |
| ``brecq``    | MSE grid (``mse`` observer)  | MSE grid on the tensor itself                | AdaRound block reconstruction,|
|              |                              |                                              | block-output MSE, act scales |
| ``qdrop``    | as brecq                     | as brecq                                     | as brecq + QDrop (p = 0.5)  |

TensorRT calibrates weights by their max and activations by entropy (its default INT8 calibrator); the
percentile and entropy observers are the core's. BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022)
are the core's block reconstruction on the same blocks as LiDAR-PTQ, without the task loss and without the
sparsity-aware search.
"""

from __future__ import annotations

from dataclasses import dataclass

from polyquant.config import QuantConfig, bits_field, float_field, int_field

__all__ = ["MinMaxConfig", "EntropyConfig", "PercentileConfig", "BRECQConfig", "QDropConfig"]


@dataclass
class MinMaxConfig(QuantConfig):
    """Max-min ranges for every weight and activation.

    Args:
        w_bits: weight bits (symmetric, one scale per weight row: a conv's output channels).
        a_bits: activation bits (symmetric, per tensor).
        float_pfn: keep the first PFN layer float.
    """

    w_bits: int = bits_field(8, 2, 8)
    a_bits: int = bits_field(8, 2, 8)
    float_pfn: bool = False


@dataclass
class EntropyConfig(MinMaxConfig):
    """TensorRT-style entropy calibration: each activation's range minimises the KL divergence between its
    2048-bin histogram and the quantized one; weights by their max.

    Args:
        w_bits: weight bits (symmetric, one scale per weight row: a conv's output channels).
        a_bits: activation bits (symmetric, per tensor).
        float_pfn: keep the first PFN layer float.
    """


@dataclass
class PercentileConfig(MinMaxConfig):
    """Percentile ranges for the activations (the range covers that percentile of the values); weights max-min.

    Args:
        w_bits: weight bits (symmetric, one scale per weight row: a conv's output channels).
        a_bits: activation bits (symmetric, per tensor).
        float_pfn: keep the first PFN layer float.
        percentile: upper percentile of each activation's values.
    """

    percentile: float = float_field(99.99, 90.0, 100.0)


@dataclass
class BRECQConfig(MinMaxConfig):
    """BRECQ: MSE-searched ranges, then AdaRound block reconstruction on the block-output MSE, with the activation
    scales learned alongside.

    Args:
        w_bits: weight bits (symmetric, one scale per weight row: a conv's output channels).
        a_bits: activation bits (symmetric, per tensor).
        float_pfn: keep the first PFN layer float.
        iters: reconstruction steps per block.
        batch_size: scenes per reconstruction step.
        seed: seed of the reconstruction's mini-batches.
    """

    iters: int = int_field(300, 1, 100_000)
    batch_size: int = int_field(4, 1, 256)
    seed: int = int_field(0, 0, 2**31 - 1)


@dataclass
class QDropConfig(BRECQConfig):
    """QDrop: BRECQ with each activation quantizer (and the block input) passing its float value with
    probability ``drop_prob`` during the reconstruction.

    Args:
        w_bits: weight bits (symmetric, one scale per weight row: a conv's output channels).
        a_bits: activation bits (symmetric, per tensor).
        float_pfn: keep the first PFN layer float.
        iters: reconstruction steps per block.
        batch_size: scenes per reconstruction step.
        seed: seed of the reconstruction's mini-batches.
        drop_prob: probability of the float value (QDrop's 0.5).
    """

    drop_prob: float = float_field(0.5, 0.0, 1.0)
