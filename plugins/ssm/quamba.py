"""Quamba (Chiang et al., "Quamba: A Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025,
arXiv 2410.13229; code enyac-group/Quamba) on ``transformers``' Mamba-1, as fake quantization on core quant layers.

Every activation inside a Mamba block is static, symmetric, per-tensor int8; every weight per-tensor symmetric
int8 (abs-max). The placement, per mixer ``<m>`` (``QuantMambaMixer``, see ``mixer.py``); ``placements(config)``
returns exactly this table and ``tests/plugins/ssm`` checks the model against it:

| point (Quamba)                         | quantizer                          | observer                        |
|----------------------------------------|------------------------------------|---------------------------------|
| norm output -> in_proj                 | <m>.in_proj.input_quantizer        | min-max                         |
| in_proj weight                         | <m>.in_proj.weight_quantizer       | abs-max                         |
| x and z (one in_proj output scale)     | <m>.in_proj.output_quantizer       | min-max                         |
| conv1d weight (int8 in: x above)       | <m>.conv1d.weight_quantizer        | abs-max                         |
| conv1d + SiLU out = x_proj in = u      | <m>.u_quantizer                    | quamba: running abs percentile  |
| x_proj weight                          | <m>.x_proj.weight_quantizer        | abs-max                         |
| dt, B, C (one x_proj output scale)     | <m>.x_proj.output_quantizer        | min-max                         |
| dt_proj weight (bias moved out)        | <m>.dt_proj.weight_quantizer       | abs-max                         |
| dt_proj output                         | <m>.dt_proj.output_quantizer       | min-max                         |
| A_log, D, dt_bias (delta_bias)         | <m>.{A_log,D,dt_bias}_quantizer    | abs-max                         |
| y (gated scan output) -> out_proj      | <m>.out_proj.input_quantizer       | min-max, of H y for quamba      |
| out_proj weight                        | <m>.out_proj.weight_quantizer      | abs-max, of W H^T for quamba    |

quamba: the percentile observer on u (``alpha``) and the Hadamard rotation of out_proj (online ``fwht`` of y, H
folded offline into the weight: ``polyquant.nn.RotatedLinear``). naive: the same points, min-max everywhere, no
rotation. Embedding, norms, lm_head, the residual stream and the scan state stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from polyquant.config import QuantConfig, UsageError, float_field
from polyquant.nn import ActQuantizer, QuantConv1d, QuantLinear, QuantSpec, RotatedLinear, set_submodule
from polyquant.transforms import is_hadamard_size

from .mixer import QuantMambaMixer, replace_mixers

__all__ = ["QuambaConfig", "NaiveConfig", "placements", "quantize_mixers", "quamba_hadamard_size",
           "HADAMARD_SIZES"]

HADAMARD_SIZES = "2^k, 12 * 2^k or 40 * 2^k"  # Quamba's supported d_inner (e.g. 128, 1536 = 12 * 128, 5120 = 40 * 128)


@dataclass
class QuambaConfig(QuantConfig):
    """Quamba W8A8: static per-tensor int8 activations and weights, a running percentile of |u| on the SSM input,
    an online Hadamard rotation of the SSM output before out_proj.

    Args:
        alpha: quantile of |u| each calibration batch gives the SSM input's range (0.99999 for Mamba in the paper).
        hadamard: rotate out_proj's input (online FWHT) and weight (offline) before quantizing them.
    """

    alpha: float = float_field(0.99999, 0.5, 1.0)
    hadamard: bool = True


@dataclass
class NaiveConfig(QuantConfig):
    """Naive W8A8 baseline: Quamba's quantization points with min-max ranges everywhere, no percentile, no rotation.

    Args:
        (none): the baseline has no options.
    """


def quamba_hadamard_size(n: int) -> bool:
    """Whether ``n`` is one of Quamba's Hadamard sizes: 2^k, 12 * 2^k, 40 * 2^k (and the core builds it)."""
    a = (n & -n).bit_length() - 1
    m = n >> a
    return n >= 1 and (m == 1 or (m == 3 and a >= 2) or (m == 5 and a >= 3)) and is_hadamard_size(n)


def placements(config: QuantConfig) -> dict[str, QuantSpec]:
    """The quantizer of each point of a mixer (relative name -> spec; the module docstring's table)."""
    a, w = QuantSpec("int8"), QuantSpec("int8")  # static symmetric per-tensor, min-max / abs-max
    u = a
    if isinstance(config, QuambaConfig):
        u = QuantSpec("int8", observer="abs_percentile", percentile=config.alpha * 100.0)
    return {
        "in_proj.input_quantizer": a, "in_proj.weight_quantizer": w, "in_proj.output_quantizer": a,
        "conv1d.weight_quantizer": w,
        "u_quantizer": u,
        "x_proj.weight_quantizer": w, "x_proj.output_quantizer": a,
        "dt_proj.weight_quantizer": w, "dt_proj.output_quantizer": a,
        "A_log_quantizer": w, "D_quantizer": w, "dt_bias_quantizer": w,
        "out_proj.input_quantizer": a, "out_proj.weight_quantizer": w,
    }


def _rotated(config: QuantConfig) -> bool:
    return isinstance(config, QuambaConfig) and config.hadamard


def quantize_mixers(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every Mamba-1 mixer of ``model`` (in place) by a ``QuantMambaMixer`` with the method's quantizers
    (not calibrated). ``UsageError`` for a model without Mamba-1 mixers or a d_inner with no Hadamard size."""
    try:
        mixers = replace_mixers(model)
    except ValueError as e:
        raise UsageError(f"ssm: {e}") from None
    spec = placements(config)
    for name, m in mixers.items():
        _quantize_mixer(name, m, spec, rotate=_rotated(config))
    return model


def _quantize_mixer(name: str, m: QuantMambaMixer, spec: dict[str, QuantSpec], *, rotate: bool) -> None:
    d = m.intermediate_size
    if rotate and not quamba_hadamard_size(d):
        raise UsageError(f"ssm/quamba: d_inner {d} of {name} has no Hadamard rotation here; supported sizes are "
                         f"{HADAMARD_SIZES} (or --no-hadamard)")
    set_submodule(m, "in_proj", QuantLinear(m.in_proj, weight=spec["in_proj.weight_quantizer"],
                                            input=spec["in_proj.input_quantizer"],
                                            output=spec["in_proj.output_quantizer"], name=f"{name}.in_proj"))
    set_submodule(m, "conv1d", QuantConv1d(m.conv1d, weight=spec["conv1d.weight_quantizer"], name=f"{name}.conv1d"))
    set_submodule(m, "x_proj", QuantLinear(m.x_proj, weight=spec["x_proj.weight_quantizer"],
                                           output=spec["x_proj.output_quantizer"], name=f"{name}.x_proj"))
    set_submodule(m, "dt_proj", QuantLinear(m.dt_proj, weight=spec["dt_proj.weight_quantizer"],
                                            output=spec["dt_proj.output_quantizer"], name=f"{name}.dt_proj"))
    out = RotatedLinear if rotate else QuantLinear
    set_submodule(m, "out_proj", out(m.out_proj, weight=spec["out_proj.weight_quantizer"],
                                     input=spec["out_proj.input_quantizer"], name=f"{name}.out_proj"))
    for point in ("u", "A_log", "D", "dt_bias"):
        setattr(m, f"{point}_quantizer", ActQuantizer(spec[f"{point}_quantizer"], name=f"{name}.{point}_quantizer"))
