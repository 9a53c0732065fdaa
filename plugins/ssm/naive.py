"""Naive W8A8 baseline for Mamba: Quamba's quantization points (``placement.py``) with min-max ranges everywhere,
no percentile clipping, no rotation (the paper's first ablation row)."""

from __future__ import annotations

from dataclasses import dataclass

from polyquant.config import QuantConfig

__all__ = ["NaiveConfig"]


@dataclass
class NaiveConfig(QuantConfig):
    """Naive W8A8 baseline: Quamba's quantization points with min-max ranges everywhere, no percentile, no rotation.

    Args:
        (none): the baseline has no options.
    """
