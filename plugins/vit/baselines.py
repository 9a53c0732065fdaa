"""Baseline ViT PTQ methods in the same harness as AdaLog (same data, same model, same placement).

Stable API:

    BaselineConfig(wbits=4, abits=4, ...)                       shared dataclass config (validated)
    quantize_baseline(model, calib, method, config) -> nn.Module  method in BASELINES
    quantize_minmax / quantize_percentile / quantize_log2 / quantize_logsqrt2 / quantize_twin_uniform
        (model, calib, config=None) -> nn.Module
    BASELINES: dict[str, Callable]                               name -> function above
    baseline_recipe(method, config) -> harness.Recipe            what each baseline quantizes and how

``model`` is a float timm ViT / DeiT / Swin (or a digits model); ``calib`` a (N, C, H, W) image tensor (the first
``config.calib_size`` are used). The returned model is a quantized copy in eval mode (fake-quant).

| method        | weights (per channel) | post-LN / other inputs | post-GELU       | post-softmax         | search |
|---------------|-----------------------|------------------------|-----------------|----------------------|--------|
| minmax        | min-max               | min-max, per tensor    | uniform min-max | uniform min-max      | no     |
| percentile    | percentiles           | percentiles, per tensor| uniform         | uniform              | no     |
| log2          | FPCS                  | as AdaLog (LN reparam, | uniform FPCS    | log2, scale 1        | yes    |
|               |                       | per-head q/k/v)        |                 | (FQ-ViT / RepQ-ViT)  |        |
| logsqrt2      | FPCS                  | as AdaLog              | uniform FPCS    | log-sqrt2, scale 1   | yes    |
|               |                       |                        |                 | (RepQ-ViT)           |        |
| twin_uniform  | FPCS                  | as AdaLog              | twin uniform    | twin uniform         | yes    |
|               |                       |                        | (PTQ4ViT)       | (PTQ4ViT)            |        |

log2, logsqrt2 and twin_uniform share everything with AdaLog except the post-softmax and post-GELU quantizers,
so their gap to AdaLog measures the quantizers alone (the "quantizer ablation" of the paper). With
``log_gelu=True`` log2 / logsqrt2 also use their log quantizer (shifted by -min GELU) after GELU, the reference's
ablation setting, where the post-GELU scale comes from AdaLog's search. minmax and
percentile are plain statistics-based PTQ with per-tensor activation quantizers and no reparameterization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import Tensor, nn

from .quantizers import check_harness_fields

__all__ = [
    "BaselineConfig",
    "BASELINES",
    "baseline_recipe",
    "quantize_baseline",
    "quantize_minmax",
    "quantize_percentile",
    "quantize_log2",
    "quantize_logsqrt2",
    "quantize_twin_uniform",
]


@dataclass
class BaselineConfig:
    """Settings shared by every baseline.

    Args:
        wbits: weight bits, 2..8.
        abits: activation bits, 2..8.
        softmax_bits: post-softmax bits; None: ``abits``.
        conv_abits: Conv input bits (the patch embedding; 8 as in AdaLog's setting).
        calib_size: calibration images used (the first ``calib_size`` of the given set).
        calib_batch_size: batch size of the float capture passes.
        percentile: upper percentile of the ``percentile`` baseline (the lower one is 100 - percentile).
        eq_n, steps, search_round: search settings of the searched baselines (as AdaLog: 128, 6, 3; eq_n >= 64).
        log_gelu: log2 / logsqrt2 only: quantize post-GELU activations with the shifted log quantizer of the same
            base instead of a uniform one (AdaLog's quantizer ablation; the scale comes from AdaLog's search,
            as in the reference).
        progress: show progress bars.
    """

    wbits: int = 4
    abits: int = 4
    softmax_bits: int | None = None
    conv_abits: int = 8
    calib_size: int = 32
    calib_batch_size: int = 32
    percentile: float = 99.99
    eq_n: int = 128
    steps: int = 6
    search_round: int = 3
    log_gelu: bool = False
    progress: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        check_harness_fields(self)
        if not isinstance(self.log_gelu, bool):
            raise ValueError(f"log_gelu must be True or False, got {self.log_gelu!r}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.version != 1:
            raise ValueError(f"unsupported BaselineConfig version {self.version} (this build reads version 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SEARCHED = {  # method -> (softmax quantizer, gelu quantizer)
    "log2": ("log2", "uniform"),
    "logsqrt2": ("logsqrt2", "uniform"),
    "twin_uniform": ("twin", "twin"),
}


def baseline_recipe(method: str, config: BaselineConfig):  # -> harness.Recipe
    """The harness recipe of a baseline (see the module table)."""
    from .harness import Recipe

    if not isinstance(config, BaselineConfig):
        raise TypeError(f"config must be a BaselineConfig, got {type(config).__name__}")
    common = dict(
        wbits=config.wbits, abits=config.abits, softmax_bits=config.softmax_bits or config.abits,
        conv_abits=config.conv_abits, calib_size=config.calib_size, calib_batch_size=config.calib_batch_size,
        eq_n=config.eq_n, steps=config.steps, search_round=config.search_round, progress=config.progress,
    )
    if config.log_gelu and method not in ("log2", "logsqrt2"):
        raise ValueError(f"log_gelu applies to the log2 / logsqrt2 baselines, not {method!r}")
    if method in ("minmax", "percentile"):
        return Recipe(name=method, calib=method, percentile=float(config.percentile), softmax="uniform",
                      gelu="uniform", ln_reparam=False, head_wise=False, **common)
    if method in _SEARCHED:
        softmax, gelu = _SEARCHED[method]
        gelu = softmax if config.log_gelu else gelu
        return Recipe(name=method, calib="search", softmax=softmax, gelu=gelu, ln_reparam=True, head_wise=True,
                      **common)
    raise ValueError(f"unknown baseline {method!r}; choose one of {sorted(BASELINES)}")


def quantize_baseline(model: nn.Module, calib: Tensor, method: str, config: BaselineConfig | None = None
                      ) -> nn.Module:
    """Quantize a copy of ``model`` with baseline ``method`` (see ``BASELINES``)."""
    from .harness import quantize_with_recipe

    config = BaselineConfig() if config is None else config
    return quantize_with_recipe(model, calib, baseline_recipe(method, config))


def quantize_minmax(model: nn.Module, calib: Tensor, config: BaselineConfig | None = None) -> nn.Module:
    """Min-max uniform PTQ: per-channel weights, per-tensor activations, uniform softmax / GELU."""
    return quantize_baseline(model, calib, "minmax", config)


def quantize_percentile(model: nn.Module, calib: Tensor, config: BaselineConfig | None = None) -> nn.Module:
    """Percentile-clipped uniform PTQ (``config.percentile``)."""
    return quantize_baseline(model, calib, "percentile", config)


def quantize_log2(model: nn.Module, calib: Tensor, config: BaselineConfig | None = None) -> nn.Module:
    """AdaLog's pipeline with a log2 post-softmax quantizer and a uniform post-GELU one."""
    return quantize_baseline(model, calib, "log2", config)


def quantize_logsqrt2(model: nn.Module, calib: Tensor, config: BaselineConfig | None = None) -> nn.Module:
    """RepQ-ViT style: LayerNorm reparameterization and a log-sqrt2 post-softmax quantizer."""
    return quantize_baseline(model, calib, "logsqrt2", config)


def quantize_twin_uniform(model: nn.Module, calib: Tensor, config: BaselineConfig | None = None) -> nn.Module:
    """PTQ4ViT style twin-uniform post-softmax and post-GELU quantizers."""
    return quantize_baseline(model, calib, "twin_uniform", config)


BASELINES: dict[str, Callable[..., nn.Module]] = {
    "minmax": quantize_minmax,
    "percentile": quantize_percentile,
    "log2": quantize_log2,
    "logsqrt2": quantize_logsqrt2,
    "twin_uniform": quantize_twin_uniform,
}
