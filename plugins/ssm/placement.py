"""The W8A8 quantization points every ssm method shares (Quamba's), and how a method's config fills them.

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

quamba (``quamba.py``): the percentile observer on u (``alpha``) and the Hadamard rotation of out_proj (online
``fwht`` of y, H folded offline into the weight: ``polyquant.nn.RotatedLinear``). naive (``naive.py``) and
smoothquant (``smoothquant.py``, after its fold): the same points, min-max everywhere, no rotation. quarot
(``quarot.py``): naive's ranges with both in_proj and out_proj rotated. Embedding, norms, lm_head, the residual
stream and the scan state stay float. Mamba-2's table: ``mixer2.py``.
"""

from __future__ import annotations

from torch import nn

from polyquant.config import QuantConfig, UsageError
from polyquant.nn import ActQuantizer, QuantConv1d, QuantLinear, QuantSpec, RotatedLinear, set_submodule

from .mixer import QuantMambaMixer, mixers, replace_mixers
from .mixer2 import mamba2_mixers, mamba2_placements, quantize_mamba2_mixer, replace_mamba2_mixers
from .quamba import QuambaConfig
from .quarot import QuaRotConfig
from .sizes import check_hadamard_size

__all__ = ["specs", "placements", "rotations", "quantize_mixers"]


def specs(config: QuantConfig) -> tuple[QuantSpec, QuantSpec, QuantSpec]:
    """(activations, weights, the SSM input u) of a method: static symmetric per-tensor int8, min-max / abs-max;
    quamba's u by the running percentile of |u|."""
    a, w = QuantSpec("int8"), QuantSpec("int8")
    u = a
    if isinstance(config, QuambaConfig):
        u = QuantSpec("int8", observer="abs_percentile", percentile=config.alpha * 100.0)
    return a, w, u


def placements(config: QuantConfig) -> dict[str, QuantSpec]:
    """The quantizer of each point of a Mamba-1 mixer (relative name -> spec; the module docstring's table; the
    Mamba-2 table is ``mixer2.mamba2_placements(*specs(config))``)."""
    a, w, u = specs(config)
    return {
        "in_proj.input_quantizer": a, "in_proj.weight_quantizer": w, "in_proj.output_quantizer": a,
        "conv1d.weight_quantizer": w,
        "u_quantizer": u,
        "x_proj.weight_quantizer": w, "x_proj.output_quantizer": a,
        "dt_proj.weight_quantizer": w, "dt_proj.output_quantizer": a,
        "A_log_quantizer": w, "D_quantizer": w, "dt_bias_quantizer": w,
        "out_proj.input_quantizer": a, "out_proj.weight_quantizer": w,
    }


def rotations(config: QuantConfig) -> tuple[bool, bool]:
    """Whether the method rotates (in_proj's input, out_proj's input)."""
    if isinstance(config, QuaRotConfig):
        return True, True
    return False, isinstance(config, QuambaConfig) and config.hadamard


def quantize_mixers(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every Mamba-1 / Mamba-2 mixer of ``model`` (in place) by a ``QuantMambaMixer`` /
    ``QuantMamba2Mixer`` with the method's quantizers (not calibrated). ``UsageError`` for a model without
    transformers Mamba mixers or a rotated size with no Hadamard matrix."""
    has1, has2 = bool(mixers(model)), bool(mamba2_mixers(model))
    if not has1 and not has2:
        raise UsageError(f"ssm: {type(model).__name__} has no transformers MambaMixer or Mamba2Mixer: not a Mamba "
                         "model")
    rotate_in, rotate_out = rotations(config)
    mamba1 = replace_mixers(model) if has1 else {}
    mamba2 = replace_mamba2_mixers(model) if has2 else {}
    spec = placements(config)
    for name, m in mamba1.items():
        _quantize_mixer(name, m, spec, rotate_in=rotate_in, rotate_out=rotate_out)
    spec2 = mamba2_placements(*specs(config))
    for name, m2 in mamba2.items():
        quantize_mamba2_mixer(name, m2, spec2, rotate_in=rotate_in, rotate_out=rotate_out)
    return model


def _quantize_mixer(name: str, m: QuantMambaMixer, spec: dict[str, QuantSpec], *, rotate_in: bool,
                    rotate_out: bool) -> None:
    if rotate_out:
        check_hadamard_size(m.intermediate_size, f"d_inner of {name}")
    if rotate_in:
        check_hadamard_size(m.in_proj.in_features, f"the hidden size of {name}")
    set_submodule(m, "in_proj", (RotatedLinear if rotate_in else QuantLinear)(
        m.in_proj, weight=spec["in_proj.weight_quantizer"], input=spec["in_proj.input_quantizer"],
        output=spec["in_proj.output_quantizer"], name=f"{name}.in_proj"))
    set_submodule(m, "conv1d", QuantConv1d(m.conv1d, weight=spec["conv1d.weight_quantizer"], name=f"{name}.conv1d"))
    set_submodule(m, "x_proj", QuantLinear(m.x_proj, weight=spec["x_proj.weight_quantizer"],
                                           output=spec["x_proj.output_quantizer"], name=f"{name}.x_proj"))
    set_submodule(m, "dt_proj", QuantLinear(m.dt_proj, weight=spec["dt_proj.weight_quantizer"],
                                            output=spec["dt_proj.output_quantizer"], name=f"{name}.dt_proj"))
    out = RotatedLinear if rotate_out else QuantLinear
    set_submodule(m, "out_proj", out(m.out_proj, weight=spec["out_proj.weight_quantizer"],
                                     input=spec["out_proj.input_quantizer"], name=f"{name}.out_proj"))
    for point in ("u", "A_log", "D", "dt_bias"):
        setattr(m, f"{point}_quantizer", ActQuantizer(spec[f"{point}_quantizer"], name=f"{name}.{point}_quantizer"))
