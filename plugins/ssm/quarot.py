"""QuaRot-style W8A8 baseline for Mamba (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
NeurIPS 2024, arXiv 2404.00456), as Quamba compares against it: Hadamard rotations of the inputs of both
projections of every mixer, then naive W8A8 (static per-tensor int8, min-max) at Quamba's points.

    in_proj(x)  = Q(x H) @ Q(W_in H).T        out_proj(y) = Q(y H) @ Q(W_out H).T

Both rotations are online FWHTs of the activation with H folded offline into the weight (core ``RotatedLinear``),
so the float model is unchanged. Departures from QuaRot proper: the in_proj rotation is online and rotates the
RMSNorm's output with its weight applied (QuaRot folds the norm weight into in_proj and a random orthogonal
rotation of the residual stream into the embedding and every block's weights, so no rotation runs at inference and
the rotated tensor is the un-weighted normalized state); plain Hadamard, no random signs; no percentile clipping
(the min-max ranges of the naive recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

from polyquant.config import QuantConfig

__all__ = ["QuaRotConfig"]


@dataclass
class QuaRotConfig(QuantConfig):
    """QuaRot-style W8A8 baseline: online Hadamard rotations of in_proj's and out_proj's inputs (H folded into
    their weights), min-max static per-tensor int8 everywhere else at Quamba's points.

    Args:
        (none): the baseline has no options.
    """
