"""Post-training quantization of a codec's convolutions (encoder and decoder), the bottleneck left as it is.

Every ``Conv1d`` / ``ConvTranspose1d`` of the encoder and decoder gets a core weight quantizer: symmetric INT8 or INT4
per output channel (per input channel for a transposed convolution: its weight rows), min-max; with
``activations`` each also gets a static per-tensor asymmetric UINT8 input quantizer calibrated (min-max) on the
calibration audio. The first and last convolutions (waveform in, waveform out) are quantized too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from polyquant.config import ConfigError, QuantConfig, int_field
from polyquant.nn import QuantRule, QuantSpec
from polyquant.primitives import PerChannel, PerTensor

__all__ = ["PTQConfig", "ptq_rules"]


@dataclass
class PTQConfig(QuantConfig):
    """INT8 / INT4 weights (and optionally UINT8 activations) of a codec's encoder and decoder convolutions.

    Args:
        weight_bits: 8 or 4: symmetric integer weights, one scale per weight row (min-max).
        activations: also quantize each convolution's input: static per-tensor asymmetric UINT8, min-max.
    """

    weight_bits: int = int_field(8, 4, 8)
    activations: bool = False

    def validate(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"PTQConfig.weight_bits must be 4 or 8, got {self.weight_bits}")


def ptq_rules(config: PTQConfig) -> list[QuantRule]:
    """Every 1-d convolution (a codec's bottleneck has none): weights int{bits} per row, inputs uint8 when
    ``activations``."""
    weight = QuantSpec(f"int{config.weight_bits}", PerChannel(0))
    act = QuantSpec("uint8", PerTensor(), symmetric=False) if config.activations else None
    return [QuantRule((nn.Conv1d, nn.ConvTranspose1d), weight=weight, input=act)]
