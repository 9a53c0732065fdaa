"""SmoothQuant-style W8A8 baseline for Mamba-1 and Mamba-2 (Xiao et al., "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023, arXiv 2211.10438), as Quamba compares against it.

Per mixer, the per-channel difficulty of the in_proj input (the block's RMSNorm output) is migrated into in_proj's
weight before the naive W8A8 recipe (``quamba.NaiveConfig``'s points and min-max ranges):

    s_j   = max|X_j|^a / max_i |W_ij|^(1 - a)          X: norm output over the calibration set, W: in_proj weight
    norm.weight <- norm.weight / s,   W[:, j] <- W[:, j] * s_j      (in_proj(norm(h)) unchanged in float)

The norm is the only op before in_proj, so the fold is exact; out_proj's input (y * silu(z)) has no preceding
linear op to absorb a scale, so it is not smoothed (Quamba's Hadamard is what treats that point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyquant.capture import capture
from polyquant.config import QuantConfig, float_field
from polyquant.nn import Calibration
from polyquant.transforms import fold_scale_into_linear

from .mixer import mixers
from .mixer2 import mamba2_mixers

__all__ = ["SmoothQuantConfig", "smoothing_factors", "fold_smoothing", "smooth_mixers"]

_EPS = 1e-5  # floor of the channel maxima and the factors (SmoothQuant's clamp): a dead channel keeps s finite


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant W8A8 baseline: per-channel migration of the in_proj input's range into its weight, folded into
    the preceding RMSNorm, then naive W8A8 (static per-tensor int8, min-max) at Quamba's points.

    Args:
        alpha: migration strength a in s_j = max|X_j|^a / max|W_j|^(1-a) (0.5 in the SmoothQuant paper).
    """

    alpha: float = float_field(0.5, 0.0, 1.0)


def smoothing_factors(act_max: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha) per input channel j.

    act_max: (K,) per-channel max |x|; weight: (N, K) -> s: (K,) float32, every entry >= 1e-5."""
    w_max = weight.detach().abs().amax(dim=0).double().clamp(min=_EPS)  # (K,)
    a_max = act_max.double().clamp(min=_EPS)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=_EPS).float()


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linear: nn.Linear, s: Tensor) -> None:
    """Divide ``norm.weight`` by ``s`` and multiply ``linear``'s input columns by ``s`` (in place): for a norm whose
    output is ``normalized(h) * weight``, ``linear(norm(h))`` is unchanged."""
    weight = norm.weight
    if weight.shape != s.shape:
        raise ValueError(f"norm weight {tuple(weight.shape)} does not match the factors {tuple(s.shape)}")
    weight.copy_(weight.double() / s.to(device=weight.device, dtype=torch.float64))
    fold_scale_into_linear(s, linear)


def smooth_mixers(model: nn.Module, calib: Calibration, alpha: float) -> dict[str, Tensor]:
    """Smooth every Mamba-1 / Mamba-2 mixer of ``model`` (in place): per-channel max |x| of each mixer's input (its
    block's norm output) over ``calib`` in one float pass, then ``fold_smoothing`` into the block's norm and the mixer's
    in_proj. Returns the factors by mixer name."""
    found = {**mixers(model), **mamba2_mixers(model)}
    caps = capture(model, list(found), calib, inputs=True, outputs=False)
    out = {}
    for name, m in found.items():
        block = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        norm = getattr(block, "norm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            raise ValueError(f"{name}: no RMSNorm with a weight before the mixer to fold the smoothing into")
        x = caps[name].input(0)  # (N, L, hidden)
        act_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)  # (hidden,)
        linear = m.in_proj
        out[name] = s = smoothing_factors(act_max, linear.weight, alpha)
        fold_smoothing(norm, linear, s)
    return out
