"""The ``uniform8`` baseline: every non-position attribute channel on its own uniform 8-bit grid (asymmetric
min-max per channel: the core's ``choose_qparams`` with one block per column), positions at fp16 as for SVQ.
What a user without a VQ method would do; SVQ must beat it on bytes at a small PSNR cost."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyquant.config import QuantConfig, int_field
from polyquant.primitives import choose_qparams, quantize_tensor

from .model import UniformAttribute, attribute_matrix
from .scene import GaussianScene

__all__ = ["Uniform8Config", "uniform_attributes"]


@dataclass
class Uniform8Config(QuantConfig):
    """Per-channel uniform integer quantization of scale, rotation, opacity and SH (positions fp16, lossless).

    Args:
        bits: bits per channel (8: the usual baseline).
    """

    bits: int = int_field(8, 2, 8)


@torch.no_grad()
def uniform_attributes(scene: GaussianScene, names: list[str], bits: int) -> dict[str, UniformAttribute]:
    """Each named attribute matrix (N, D) on a per-column asymmetric ``uint{bits}`` grid."""
    fmt = f"uint{bits}"
    out = {}
    for name in names:
        x = attribute_matrix(scene, name).float()
        block = (x.shape[0], 1)
        scale, zero = choose_qparams(x, fmt, block, symmetric=False)
        out[name] = UniformAttribute(quantize_tensor(x, fmt, scale, zero, block), scale, zero, bits)
    return out
