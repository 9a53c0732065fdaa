"""What the harness runs: the settings AdaLog and the baselines share, and the ``Recipe`` each of them becomes.

``HarnessConfig`` holds the fields common to AdaLog (``adalog.AdaLogConfig``) and every baseline
(``baselines``); each method's config turns itself into a ``Recipe`` (``config.recipe()``), the harness's full
description of which quantizer each role gets and how its parameters are found. The recipe is also what an
artifact records to rebuild the quantized skeleton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from polyquant.config import ConfigError, QuantConfig, bits_field, int_field

__all__ = ["HarnessConfig", "Recipe"]


@dataclass
class HarnessConfig(QuantConfig):
    """Settings shared by AdaLog and the baselines.

    Args:
        wbits: weight bits (Linear and Conv, per output channel, asymmetric uniform).
        abits: activation bits (every quantized Linear / matmul input, and the head input).
        softmax_bits: bits of the post-softmax quantizer; None: abits (the reference s_bit).
        conv_abits: input bits of the first Conv (the patch embedding / stem): 8 (the reference's qconv_a_bit) or
            None keep the image in float, as the reference's ``quant_input`` does at >= 8 bits (the conv's weights
            get one output-MSE search); below 8, a searched uniform quantizer.
        calib_size: number of calibration images used (the first calib_size of the given set).
        calib_batch_size: batch size of the float forward passes that capture layer inputs / outputs.
        eq_n: candidates per search round (at least 64: FPCS keeps 32 survivors and refines each with
            eq_n // 32 new candidates whose spacing shrinks by (eq_n // 32 - 0.5); below 64 it grows).
        steps: FPCS rounds.
        search_round: alternations of weight and activation searches.
    """

    VERSION: ClassVar[int] = 1
    wbits: int = bits_field(4)
    abits: int = bits_field(4)
    softmax_bits: int | None = bits_field(None)
    conv_abits: int | None = bits_field(8)
    calib_size: int = int_field(32, 1, 1 << 20, cli=("--calib",))
    calib_batch_size: int = int_field(32, 1, 1 << 20)
    eq_n: int = int_field(128, 64, 4096)
    steps: int = int_field(6, 1, 32)
    search_round: int = int_field(3, 1, 16, cli=("--search-rounds",))

    def recipe(self) -> Recipe:
        raise NotImplementedError(f"{type(self).__name__} does not define its recipe")

    def images_needed(self) -> int:
        """How many calibration images the method uses."""
        return self.calib_size


@dataclass
class Recipe(QuantConfig):
    """Which quantizer each role gets and how parameters are found (see ``harness``).

    Args:
        name: method name recorded in artifacts.
        wbits, abits: weight / activation bits; softmax_bits: post-softmax bits; conv_abits: first Conv input
            bits (None or 8: float input).
        calib: "search" (FPCS / grid search on the layer output), "minmax" or "percentile" (statistics).
        percentile: upper percentile for calib="percentile" (the lower one is 100 - percentile).
        softmax: post-softmax quantizer: "adalog", "log2", "logsqrt2", "uniform" or "twin".
        gelu: post-GELU quantizer: "adalog" (shifted, bias-folded), "uniform", "twin", "log2" or "logsqrt2".
        ln_reparam: per-channel post-LayerNorm search folded into the LayerNorm (calib="search" only; the configs
            set it only when abits == wbits, as the reference's ``wrap_net.py``).
        head_wise: per-head quantizers for the q, k, v operands.
        eq_n, steps, search_round, fpcs: search settings (FPCS when fpcs, else a flat grid of eq_n).
        lut: AdaLog hardware dequantization at inference.
        calib_size, calib_batch_size: images used and the capture batch size.
    """

    VERSION: ClassVar[int] = 1
    name: str
    wbits: int = bits_field(4)
    abits: int = bits_field(4)
    softmax_bits: int = bits_field(4)
    conv_abits: int | None = bits_field(8)
    calib: Literal["search", "minmax", "percentile"] = "search"
    percentile: float = 99.99
    softmax: Literal["adalog", "log2", "logsqrt2", "uniform", "twin"] = "adalog"
    gelu: Literal["adalog", "uniform", "twin", "log2", "logsqrt2"] = "adalog"
    ln_reparam: bool = True
    head_wise: bool = True
    eq_n: int = int_field(128, 64, 4096)
    steps: int = int_field(6, 1, 32)
    search_round: int = int_field(3, 1, 16)
    fpcs: bool = True
    lut: bool = True
    calib_size: int = int_field(32, 1, 1 << 20)
    calib_batch_size: int = int_field(32, 1, 1 << 20)

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calib != "search" and (self.softmax != "uniform" or self.gelu != "uniform" or self.ln_reparam):
            raise ConfigError("statistics calibration (minmax / percentile) supports uniform quantizers only, "
                              "without LayerNorm reparameterization")
