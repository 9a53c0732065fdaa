"""FSQ bottleneck baseline (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"), fitted
post-training on a codec's latent frames: no codebook to learn, so no dead codes, but a fixed grid.

A codec trained for VQ has no FSQ projection, so the frames (D channels) are projected onto their top P = groups x
len(levels) principal directions, each scaled by c x its standard deviation (c searched on the calibration frames,
minimum latent MSE), quantized by ``groups`` core ``FSQ(levels)`` (a core ``GroupedVQ``), and mapped back. Codes
(..., groups) in [0, prod(levels)); groups = floor(bandwidth / (frame_rate log2 prod(levels))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyquant.config import ConfigError, QuantConfig, float_field
from polyquant.fsq import FSQ
from polyquant.vq import GroupedVQ

__all__ = ["FSQConfig", "ProjectedFSQ", "parse_levels", "SCALE_GRID"]

SCALE_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # c: the FSQ input is (projection / (c std))


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"FSQConfig.levels must be comma-separated integers, got {text!r}") from None
    if not levels or len(levels) > 16 or any(not 2 <= v <= 256 for v in levels):
        raise ConfigError(f"FSQConfig.levels: 1 to 16 levels in [2, 256], got {text!r}")
    return levels


@dataclass
class FSQConfig(QuantConfig):
    """FSQ bottleneck baseline on the principal directions of the codec's latent frames.

    Args:
        bandwidth: target kbps; groups = floor(bandwidth * 1000 / (frame_rate * log2 prod(levels))).
        levels: FSQ levels per channel of a group, comma-separated ("8,5,5,5": 1000 codes, about 2^10).
    """

    bandwidth: float = float_field(2.0, 0.01, 1000.0)
    levels: str = "8,5,5,5"

    def validate(self) -> None:
        parse_levels(self.levels)


class ProjectedFSQ(nn.Module):
    """z (..., dim) -> PCA projection (P = groups x len(levels)) / scale -> grouped FSQ -> back. codes (..., groups)."""

    code_dims = 1
    mean: Tensor
    proj: Tensor
    scale: Tensor

    def __init__(self, dim: int, levels: list[int], groups: int) -> None:
        super().__init__()
        p = groups * len(levels)
        if not 1 <= p <= dim:
            raise ValueError(f"{groups} groups x {len(levels)} levels = {p} channels; the latent has {dim}")
        self.dim, self.groups, self.levels = dim, groups, list(levels)
        self.fsq = GroupedVQ([FSQ(levels) for _ in range(groups)], dim=p)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.eye(dim)[:, :p].clone())  # (D, P) orthonormal columns
        self.register_buffer("scale", torch.ones(p))

    def _to_grid(self, z: Tensor) -> Tensor:
        return ((z - self.mean) @ self.proj) / self.scale  # (..., P)

    def _from_grid(self, u: Tensor) -> Tensor:
        return (u * self.scale) @ self.proj.T + self.mean  # (..., D)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        return self.fsq.encode(self._to_grid(z))

    def decode(self, codes: Tensor) -> Tensor:
        return self._from_grid(self.fsq.decode(codes))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u_hat, codes, _ = self.fsq(self._to_grid(z))
        return self._from_grid(u_hat), codes, z.new_zeros(())

    @torch.no_grad()
    def fit(self, z: Tensor) -> "ProjectedFSQ":
        """PCA of the frames z (N, dim), then the scale multiple c of SCALE_GRID with the least latent MSE."""
        z = z.reshape(-1, self.dim).double()
        mean = z.mean(0)
        cov = (z - mean).T @ (z - mean) / max(len(z) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = evals.argsort(descending=True)[: self.proj.shape[1]]
        self.mean.copy_(mean.float())
        self.proj.copy_(evecs[:, order].float())
        std = evals[order].clamp_min(1e-12).sqrt().float()
        zf = z.float()
        best = None
        for c in SCALE_GRID:
            self.scale.copy_(c * std)
            err = float((self.decode(self.encode(zf)) - zf).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, c)
        self.scale.copy_(best[1] * std)
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, levels={self.levels}"
