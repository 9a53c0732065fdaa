"""Quamba (Chiang et al., "Quamba: A Post-Training Quantization Recipe for Selective State Space Models", ICLR 2025,
arXiv 2410.13229; code enyac-group/Quamba) on ``transformers``' Mamba-1 and Mamba-2, as fake quantization on core
quant layers: the method's own choices over the shared W8A8 points of ``placement.py`` (naive's min-max ranges
everywhere else).

- the SSM input u (conv1d + SiLU out = x_proj in) takes its range from a running percentile of |u|: per
  calibration batch cur = quantile(|u|, alpha), w <- w + 0.01 (cur - w), scale = w / 127 (the core's
  ``abs_percentile`` observer); alpha = 0.99999 for Mamba in the paper;
- out_proj's input y is rotated by an online Hadamard transform (``fwht``) with H folded offline into the weight
  (``polyquant.nn.RotatedLinear``), so its outliers spread before the int8 quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from polyquant.config import QuantConfig, float_field

__all__ = ["QuambaConfig"]


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
