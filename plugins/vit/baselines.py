"""Baseline ViT PTQ methods in the same harness as AdaLog (same data, same model, same placement).

Each baseline has its own config class (a ``recipe.HarnessConfig``), run by ``polyquant.quantize``:

    MinMaxConfig, PercentileConfig, Log2Config, LogSqrt2Config, TwinUniformConfig
    BASELINES: dict[str, type[BaselineConfig]]                  method name -> config class
    config.recipe() -> recipe.Recipe                            what each baseline quantizes and how

``model`` is a float timm ViT / DeiT / Swin (or a digits model); calibration batches are images (the first
``config.calib_size`` are used). The quantized model is a copy in eval mode (fake-quant).

| method        | weights (per channel) | post-LN / other inputs | post-GELU       | post-softmax         | search |
|---------------|-----------------------|------------------------|-----------------|----------------------|--------|
| minmax        | min-max               | min-max, per tensor    | uniform min-max | uniform min-max      | no     |
| percentile    | percentiles           | percentiles, per tensor| uniform         | uniform              | no     |
| log2          | FPCS                  | as AdaLog (LN reparam, | AdaLog (gelu=   | log2, scale 1        | yes    |
|               |                       | per-head q/k/v)        | uniform / log)  | (FQ-ViT / RepQ-ViT)  |        |
| logsqrt2      | FPCS                  | as AdaLog              | AdaLog (gelu=   | log-sqrt2, scale 1   | yes    |
|               |                       |                        | uniform / log)  | (RepQ-ViT)           |        |
| twin_uniform  | FPCS                  | as AdaLog              | twin uniform    | twin uniform         | yes    |
|               |                       |                        | (PTQ4ViT)       | (PTQ4ViT)            |        |

log2, logsqrt2 and twin_uniform share everything with AdaLog except the post-softmax and (twin_uniform, or
log2 / logsqrt2 with ``gelu`` other than "adalog") post-GELU quantizers, so their gap to AdaLog measures the
quantizers alone (the "quantizer ablation" of the paper). The reference sets the two separately
(``post_softmax_quantizer``, ``post_gelu_quantizer``); by default log2 / logsqrt2 keep AdaLog's post-GELU
quantizer, so "AdaLog vs log2" is one change. ``gelu="log"`` uses their log quantizer (shifted by -min GELU) after
GELU, its scale from AdaLog's search as in the reference; ``gelu="uniform"`` the uniform one. LayerNorm
reparameterization applies only when abits == wbits (reference ``wrap_net.py``). minmax and percentile are plain
statistics-based PTQ with per-tensor activation quantizers and no reparameterization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from polyquant.config import ConfigError, float_field

from .recipe import HarnessConfig, Recipe

__all__ = [
    "BaselineConfig",
    "MinMaxConfig",
    "PercentileConfig",
    "Log2Config",
    "LogSqrt2Config",
    "TwinUniformConfig",
    "BASELINES",
]


@dataclass
class BaselineConfig(HarnessConfig):
    """Settings shared by every baseline: those of ``recipe.HarnessConfig`` (bits, calibration, search)."""

    VERSION: ClassVar[int] = 1

    def _recipe(self, name: str, calib: str, softmax: str, gelu: str, *, percentile: float = 99.99) -> Recipe:
        searched = calib == "search"
        return Recipe(
            name=name, wbits=self.wbits, abits=self.abits, softmax_bits=self.softmax_bits or self.abits,
            conv_abits=self.conv_abits, calib=calib, percentile=percentile, softmax=softmax, gelu=gelu,
            ln_reparam=searched and self.abits == self.wbits, head_wise=searched, eq_n=self.eq_n, steps=self.steps,
            search_round=self.search_round, calib_size=self.calib_size, calib_batch_size=self.calib_batch_size,
        )


@dataclass
class MinMaxConfig(BaselineConfig):
    """Min-max uniform PTQ: per-channel weights, per-tensor activations, uniform softmax / GELU."""

    def recipe(self) -> Recipe:
        return self._recipe("minmax", "minmax", "uniform", "uniform")


@dataclass
class PercentileConfig(BaselineConfig):
    """Percentile-clipped uniform PTQ.

    Args:
        percentile: upper percentile of the activation ranges (the lower one is 100 - percentile).
    """

    percentile: float = float_field(99.99, 50.0, 100.0)

    def validate(self) -> None:
        if self.percentile == 50.0:
            raise ConfigError("percentile must be in (50, 100], got 50.0")

    def recipe(self) -> Recipe:
        return self._recipe("percentile", "percentile", "uniform", "uniform", percentile=self.percentile)


@dataclass
class Log2Config(BaselineConfig):
    """AdaLog's pipeline with a log2 post-softmax quantizer (FQ-ViT / RepQ-ViT), the reference's
    ``post_softmax_quantizer='log2'``.

    Args:
        gelu: the post-GELU quantizer (the reference's separate ``post_gelu_quantizer``): "adalog" (default:
            only the post-softmax quantizer differs from AdaLog, one change), "uniform", or "log" (the shifted
            log2 quantizer, its scale from AdaLog's search as the reference's ``tmp_quantizer``).
    """

    VERSION: ClassVar[int] = 2
    gelu: Literal["adalog", "uniform", "log"] = "adalog"

    def recipe(self) -> Recipe:
        return self._recipe("log2", "search", "log2", "log2" if self.gelu == "log" else self.gelu)


@dataclass
class LogSqrt2Config(BaselineConfig):
    """RepQ-ViT style log-sqrt2 post-softmax quantizer in AdaLog's pipeline (``post_softmax_quantizer='logsqrt2'``).

    Args:
        gelu: the post-GELU quantizer: "adalog" (default, one change from AdaLog), "uniform" or "log" (the
            shifted log-sqrt2 quantizer).
    """

    VERSION: ClassVar[int] = 2
    gelu: Literal["adalog", "uniform", "log"] = "adalog"

    def recipe(self) -> Recipe:
        return self._recipe("logsqrt2", "search", "logsqrt2", "logsqrt2" if self.gelu == "log" else self.gelu)


@dataclass
class TwinUniformConfig(BaselineConfig):
    """PTQ4ViT style twin-uniform post-softmax and post-GELU quantizers."""

    def recipe(self) -> Recipe:
        return self._recipe("twin_uniform", "search", "twin", "twin")


BASELINES: dict[str, type[BaselineConfig]] = {
    "minmax": MinMaxConfig,
    "percentile": PercentileConfig,
    "log2": Log2Config,
    "logsqrt2": LogSqrt2Config,
    "twin_uniform": TwinUniformConfig,
}
