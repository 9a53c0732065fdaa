"""A 3D Gaussian Splatting scene as tensors, in the standard 3DGS parameterisation (what its ``.ply`` stores).

Per Gaussian (N of them):
- ``xyz`` (N, 3): centre.
- ``scale`` (N, 3): log of the standard deviations along the Gaussian's axes (``exp`` activates it).
- ``rotation`` (N, 4): raw quaternion (w, x, y, z), normalised when used.
- ``opacity`` (N, 1): logit of the opacity (``sigmoid`` activates it).
- ``sh_dc`` (N, 3): degree-0 spherical-harmonic coefficient per colour channel.
- ``sh_rest`` (N, B, 3): the higher bands, B = (degree + 1)^2 - 1 in 0, 3, 8, 15 (degree 0..3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["GaussianScene", "ATTRIBUTES", "rest_bands", "sh_degree_of"]

ATTRIBUTES = ("xyz", "scale", "rotation", "opacity", "sh_dc", "sh_rest")
MAX_SH_DEGREE = 3


def rest_bands(degree: int) -> int:
    """B = (degree + 1)^2 - 1 higher-band coefficients per channel."""
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be in [0, {MAX_SH_DEGREE}], got {degree}")
    return (degree + 1) ** 2 - 1


def sh_degree_of(bands: int) -> int:
    """The degree whose higher bands number ``bands`` (0, 3, 8 or 15)."""
    degree = math.isqrt(bands + 1) - 1
    if degree > MAX_SH_DEGREE or (degree + 1) ** 2 - 1 != bands:
        raise ValueError(f"{bands} higher-band SH coefficients per channel is not a degree 0..{MAX_SH_DEGREE} layout "
                         "(0, 3, 8 or 15)")
    return degree


@dataclass
class GaussianScene:
    """The tensors of one scene (float32, one device); see the module docstring for the layout."""

    xyz: Tensor
    scale: Tensor
    rotation: Tensor
    opacity: Tensor
    sh_dc: Tensor
    sh_rest: Tensor

    def __post_init__(self) -> None:
        n = self.xyz.shape[0] if self.xyz.dim() == 2 else -1
        expect = {"xyz": (n, 3), "scale": (n, 3), "rotation": (n, 4), "opacity": (n, 1), "sh_dc": (n, 3)}
        for name, shape in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape (N, {shape[1]}), got {tuple(t.shape)}")
        if self.sh_rest.dim() != 3 or self.sh_rest.shape[0] != n or self.sh_rest.shape[2] != 3:
            raise ValueError(f"sh_rest must have shape (N, B, 3), got {tuple(self.sh_rest.shape)}")
        sh_degree_of(self.sh_rest.shape[1])

    @property
    def num_gaussians(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def sh_degree(self) -> int:
        return sh_degree_of(self.sh_rest.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn: Callable[[Tensor], Tensor]) -> "GaussianScene":
        """A scene of ``fn`` applied to every tensor."""
        return GaussianScene(**{k: fn(v) for k, v in self.tensors().items()})

    def select(self, index: Tensor) -> "GaussianScene":
        """The Gaussians ``index`` picks (an index or boolean mask over N), in that order."""
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GaussianScene":
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> "GaussianScene":
        return self.map(lambda t: t.detach().clone())

    def check_finite(self) -> None:
        """``ValueError`` naming the first attribute with a NaN or infinite value."""
        for name, t in self.tensors().items():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
                raise ValueError(f"{name} has a non-finite value (Gaussian {row} of {self.num_gaussians})")

    def float_bytes(self) -> int:
        """Bytes of the attributes as float32 (what a standard .ply's vertex data takes, without normals)."""
        return 4 * sum(t.numel() for t in self.tensors().values())

    @staticmethod
    def empty(num_gaussians: int, sh_degree: int) -> "GaussianScene":
        """Zeros of the layout (identity rotations): a skeleton that a restore fills."""
        n, b = int(num_gaussians), rest_bands(sh_degree)
        rot = torch.zeros(n, 4)
        rot[:, 0] = 1.0
        return GaussianScene(torch.zeros(n, 3), torch.zeros(n, 3), rot, torch.zeros(n, 1), torch.zeros(n, 3),
                             torch.zeros(n, b, 3))
