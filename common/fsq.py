"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple",
arXiv 2309.15505): each of ``len(levels)`` channels is bounded and rounded to one of ``levels[i]`` values, so the
implicit codebook is the grid of ``prod(levels)`` points; no codebook to learn, no dead codes.

    fsq = FSQ([8, 5, 5, 5])                  # 1000 codes, ~2^10 (the paper's and vector-quantize-pytorch's example)
    x_hat, codes, loss = fsq(z)              # z (..., 4) -> x_hat (..., 4) in [-1, 1] (straight-through), codes (...,)
    fsq.decode(codes) == x_hat               # codes in [0, 1000)

Per channel with L levels (``h = (L - 1)(1 + 1e-3) / 2``, offset 1/2 for even L, else 0, shift ``atanh(offset / h)``):
``bound(z) = tanh(z + shift) h - offset``, ``q = round(bound(z))`` (straight-through) in ``{-floor(L/2), ...}``, and
the output ``q / floor(L/2)``. The code is the mixed-radix number of ``q + floor(L/2)`` (first channel least
significant), as the paper's reference code.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .vq import check_codes

__all__ = ["FSQ"]


class FSQ(nn.Module):
    """Finite scalar quantizer over ``len(levels)`` channels (see the module docstring); ``code_dims`` 0."""

    code_dims = 0
    levels_t: Tensor
    basis: Tensor

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"levels must be integers >= 2, got {levels}")
        if math.prod(levels) > 2**62:
            raise ValueError(f"prod(levels) = {math.prod(levels)} codes do not fit int64")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = eps
        self.register_buffer("levels_t", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = [1]
        for v in levels[:-1]:
            basis.append(basis[-1] * v)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    @property
    def bits(self) -> float:
        """log2 of the implicit codebook size."""
        return math.log2(self.codebook_size)

    def _half_width(self) -> Tensor:
        return torch.div(self.levels_t, 2, rounding_mode="floor")

    def bound(self, z: Tensor) -> Tensor:
        """tanh-bounded channels, (..., dim), in (-floor(L/2) - 1/2, ceil(L/2) - 1/2) per channel."""
        half = (self.levels_t - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels_t % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _check(self, z: Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected (..., {self.dim}) for levels {self.levels}, got shape {tuple(z.shape)}")

    def quantize(self, z: Tensor) -> Tensor:
        """Rounded, normalized values (..., dim) in [-1, 1], with a straight-through gradient."""
        self._check(z)
        b = self.bound(z.float())
        q = b + (torch.round(b) - b).detach()
        return (q / self._half_width()).to(z.dtype)

    def codes_from_values(self, x_hat: Tensor) -> Tensor:
        """Mixed-radix code (...,) int64 of quantized values (..., dim)."""
        half = self._half_width()
        digits = torch.round(x_hat.float() * half + half).long()
        return (digits * self.basis).sum(-1)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """(..., dim) -> codes (...,) int64 in [0, prod(levels))."""
        return self.codes_from_values(self.quantize(z))

    def decode(self, codes: Tensor) -> Tensor:
        """codes (...,) -> values (..., dim) in [-1, 1]; ValueError for non-integer codes or codes out of range."""
        check_codes(codes, 0, self.codebook_size, "FSQ.decode")
        digits = torch.div(codes.long()[..., None], self.basis, rounding_mode="floor") % self.levels_t.long()
        half = self._half_width()
        return (digits.float() - half) / half

    def fit(self, x: Tensor, *, iters: int | None = None) -> "FSQ":
        """Nothing to fit (the grid is fixed); checks the shape. Returns self."""
        self._check(x)
        return self

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_hat (..., dim) with a straight-through gradient, codes (...,), zero loss)."""
        x_hat = self.quantize(z)
        return x_hat, self.codes_from_values(x_hat.detach()), z.new_zeros(())

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"
