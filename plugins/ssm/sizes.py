"""Quamba's Hadamard sizes: the in_features its online rotation supports (2^k, 12 * 2^k, 40 * 2^k; e.g. Mamba's
d_inner 128, 1536 = 12 * 128, 5120 = 40 * 128), shared by the Mamba-1 and Mamba-2 placements."""

from __future__ import annotations

from polyquant.config import UsageError
from polyquant.transforms import is_hadamard_size

__all__ = ["HADAMARD_SIZES", "quamba_hadamard_size", "check_hadamard_size"]

HADAMARD_SIZES = "2^k, 12 * 2^k or 40 * 2^k"


def quamba_hadamard_size(n: int) -> bool:
    """Whether ``n`` is one of Quamba's Hadamard sizes: 2^k, 12 * 2^k, 40 * 2^k (and the core builds it)."""
    a = (n & -n).bit_length() - 1
    m = n >> a
    return n >= 1 and (m == 1 or (m == 3 and a >= 2) or (m == 5 and a >= 3)) and is_hadamard_size(n)


def check_hadamard_size(n: int, what: str) -> None:
    """``UsageError`` naming Quamba's supported sizes when ``n`` (a rotated layer's in_features) has none."""
    if not quamba_hadamard_size(n):
        raise UsageError(f"ssm: {what} is {n}, which has no Hadamard rotation here; supported sizes are "
                         f"{HADAMARD_SIZES} (quamba: or --no-hadamard)")
