"""Equivalence-preserving transforms: Hadamard rotations and per-channel scale folding.

A rotation by an orthonormal ``H`` leaves a linear layer's function unchanged when it is folded into the weight
(``(x H)(W H)^T = x W^T``) but spreads outliers over all channels, which makes activations and weights easier to
quantize (QuaRot, QuIP#). Rotations are folded offline where possible and applied online (``HadamardRotation``)
where not.

Convention: every transform acts on the last dimension as a right multiplication, ``y = x @ H``.

Supported sizes ``n = 2**a * m`` (``is_hadamard_size``): ``H_n = kron(Sylvester(2**a), B)`` with ``B`` a base
matrix of order 1 (``m = 1``) or ``4m`` built by Paley's construction: Paley I when ``4m - 1`` is prime (12, 20,
44, 60, ...), Paley II when ``2m - 1`` is prime (28, 36, 76, ...). So 12 * 2**k, 20 * 2**k, 40 * 2**k (= 20 * 2**(k+1))
and 36 * 2**k (e.g. DiT's 1152) are all covered.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "is_hadamard_size",
    "hadamard_matrix",
    "fwht",
    "hadamard_transform",
    "random_hadamard",
    "random_signs",
    "fold_hadamard_into_linear",
    "fold_scale_into_linear",
    "fold_layernorm_into_linears",
    "HadamardRotation",
]

# Largest Paley base order we build (the dense part of the fast transform is base x base).
_MAX_BASE = 256


# ---------------------------------------------------------------------------------------------------------------------
# Hadamard matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _split(n: int) -> tuple[int, int] | None:
    """``n = 2**a * b`` with ``b`` the order of a supported base matrix, or None."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    a = (n & -n).bit_length() - 1  # power of two in n
    m = n >> a  # odd part
    if m == 1:
        return 1 << a, 1
    if a < 2 or 4 * m > _MAX_BASE or not (_is_prime(4 * m - 1) or _is_prime(2 * m - 1)):
        return None
    return 1 << (a - 2), 4 * m


def is_hadamard_size(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` exists here (powers of two and Paley-based sizes, see the module docstring)."""
    return _split(n) is not None


def _jacobsthal(q: int) -> list[list[int]]:
    """Q[i][j] = chi(j - i) with chi the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    return [[chi[(j - i) % q] for j in range(q)] for i in range(q)]


@lru_cache(maxsize=None)
def _base_matrix(order: int) -> Tensor:
    """Unnormalized +-1 Hadamard matrix of order 1, 2 or 4m (Paley I or II), float64."""
    if order == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(order - 1) and (order - 1) % 4 == 3:  # Paley I: q = order - 1 = 3 (mod 4)
        q = order - 1
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = torch.tensor(_jacobsthal(q), dtype=torch.float64)  # antisymmetric for q = 3 (mod 4)
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1  # Paley II: q = 1 (mod 4), conference matrix of order q + 1 blown up by 2
    assert _is_prime(q) and q % 4 == 1, order
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = torch.tensor(_jacobsthal(q), dtype=torch.float64)  # symmetric for q = 1 (mod 4)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check_size(n: int) -> tuple[int, int]:
    split = _split(n)
    if split is None:
        raise ValueError(
            f"no Hadamard matrix of size {n!r} here: supported sizes are 2**k and 2**k * b for a Paley base order b "
            f"<= {_MAX_BASE} (12, 20, 28, 36, 44, 60, ...; e.g. 768 = 64 * 12, 1152 = 32 * 36)"
        )
    return split


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *, normalize: bool = True
) -> Tensor:
    """Orthonormal Hadamard matrix (``H @ H.T = I``, entries ``+-1/sqrt(n)``) of a supported size ``n``.

    ``H_n = kron(Sylvester(2**k), B) / sqrt(n)`` (module docstring): index ``i = s * b + t`` with ``s`` the Sylvester
    index and ``t`` the base index. With ``normalize=False`` the entries are exactly +-1 (``H @ H.T = n I``).
    """
    p, b = _check_size(n)
    h = torch.kron(_sylvester(p), _base_matrix(b))
    return (h / math.sqrt(n) if normalize else h).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Fast transforms


def fwht(x: Tensor, normalize: bool = True) -> Tensor:
    """Fast Walsh-Hadamard transform along the last dim (a power of two): ``x @ H`` with H Sylvester, O(n log n).

    With ``normalize`` (default) H is orthonormal (``hadamard_matrix(n)``); without, H has entries +-1.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs the last dim to be a power of two, got {n}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"fwht needs a floating-point tensor, got {x.dtype}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)  # (R, blocks, pair, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y


def hadamard_transform(x: Tensor) -> Tensor:
    """``x @ hadamard_matrix(n)`` along the last dim for any supported ``n``: FWHT over the 2**k factor, dense base."""
    n = x.shape[-1]
    p, b = _check_size(n)
    if b == 1:
        return fwht(x)
    if not x.dtype.is_floating_point:
        raise ValueError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    base = (_base_matrix(b) / math.sqrt(b)).to(dtype=x.dtype, device=x.device)
    y = x.reshape(*x.shape[:-1], p, b) @ base  # (..., p, b): kron(A, B) acts as B on the fast index
    y = fwht(y.transpose(-1, -2)).transpose(-1, -2)  # A on the slow index
    return y.reshape(x.shape)


def random_signs(n: int, seed: int = 0) -> Tensor:
    """``n`` seeded random +-1 values (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def random_hadamard(n: int, seed: int = 0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Randomized orthonormal Hadamard ``H @ diag(s)`` with seeded random signs ``s`` (QuaRot)."""
    return (hadamard_matrix(n, dtype=torch.float64) * random_signs(n, seed).double()).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Folding into linear layers


@torch.no_grad()
def fold_hadamard_into_linear(linear: nn.Linear, h: Tensor, side: Literal["input", "output"] = "input") -> nn.Linear:
    """Fold an orthonormal ``h`` into ``linear`` in place so that it works in the rotated basis; returns ``linear``.

    side="input":  the layer now expects rotated inputs ``x @ h``:  ``W' = W @ h`` (bias unchanged),
                   so ``linear'(x @ h) == linear(x)``.
    side="output": the layer now produces rotated outputs ``y @ h``: ``W' = h.T @ W``, ``b' = b @ h``,
                   so ``linear'(x) == linear(x) @ h``.
    Computed in float64, stored in the weight's dtype.
    """
    w = linear.weight
    if side == "input":
        size = w.shape[1]
    elif side == "output":
        size = w.shape[0]
    else:
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    if h.shape != (size, size):
        raise ValueError(
            f"{side} rotation must have shape ({size}, {size}) for weight {tuple(w.shape)}, got {tuple(h.shape)}"
        )
    h64 = h.to(device=w.device, dtype=torch.float64)
    if side == "input":
        w.copy_(w.double() @ h64)
    else:
        w.copy_(h64.T @ w.double())
        if linear.bias is not None:
            linear.bias.copy_(linear.bias.double() @ h64)
    return linear


@torch.no_grad()
def fold_scale_into_linear(scale: Tensor, linear: nn.Linear) -> nn.Linear:
    """Reparameterize ``linear`` in place for inputs divided per channel by ``scale``; returns ``linear``.

    If ``x = x' * scale`` (per input channel), then ``linear(x) == linear'(x')`` with ``W' = W @ diag(scale)``.
    Use it to move a channel scale out of an activation (SmoothQuant) or out of a norm's weight.
    """
    w = linear.weight
    if scale.shape != (w.shape[1],):
        raise ValueError(f"scale must have shape ({w.shape[1]},) for weight {tuple(w.shape)}, got {tuple(scale.shape)}")
    w.copy_(w.double() * scale.to(device=w.device, dtype=torch.float64))
    return linear


@torch.no_grad()
def fold_layernorm_into_linears(norm: nn.LayerNorm, linears: list[nn.Linear]) -> None:
    """Fold a LayerNorm's affine ``(gamma, beta)`` into the linears that read its output, in place.

    ``linear(n(x) * gamma + beta) == linear'(n(x))`` with ``W' = W @ diag(gamma)`` and ``b' = b + W @ beta``;
    the norm is left with ``gamma = 1``, ``beta = 0``, so the model's function is unchanged. A linear without a bias
    gets one if ``beta`` is non-zero.
    """
    if not norm.elementwise_affine or norm.weight is None:
        return
    gamma = norm.weight.double()
    beta = norm.bias.double() if norm.bias is not None else None
    for linear in linears:
        w = linear.weight.double()
        if beta is not None and bool(beta.ne(0).any()):
            shift = w @ beta.to(w.device)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=linear.weight.dtype, device=w.device))
            linear.bias.copy_(linear.bias.double() + shift)
        fold_scale_into_linear(gamma, linear)
    norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


# ---------------------------------------------------------------------------------------------------------------------
# Online rotation


class HadamardRotation(nn.Module):
    """Online Hadamard rotation of the last dim, ``x @ H`` (or ``x @ H @ diag(s)`` with random signs; QuaRot)."""

    signs: Tensor | None

    def __init__(self, size: int, *, seed: int | None = None) -> None:
        super().__init__()
        _check_size(size)
        self.size = size
        self.register_buffer("signs", random_signs(size, seed) if seed is not None else None)

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense orthonormal matrix this module multiplies by, for folding the inverse into weights."""
        h = hadamard_matrix(self.size, dtype=torch.float64)
        if self.signs is not None:
            h = h * self.signs.double().cpu()
        return h.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"HadamardRotation({self.size}) got an input with last dim {x.shape[-1]}")
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # low precision: rotate in fp32
        y = hadamard_transform(work)
        if self.signs is not None:
            y = y * self.signs.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, random_signs={self.signs is not None}"
