"""Dimensionality reduction of embeddings before quantization: PCA, Gaussian random projection, Matryoshka
truncation.

Reference: Huerga-Pérez et al., "Optimization of embeddings storage for RAG systems using quantization and
dimensionality reduction techniques", arXiv 2505.00105 (PCA fitted on a calibration split is the best reducer;
PCA keeping 50% of the dimensions plus fp8 gives 8x compression).

Every reducer maps documents and queries so that a dot product in the reduced space estimates the cosine of the
original unit vectors (documents D -> D' dims):

| kind     | documents y              | queries (r, b)          | q . x is estimated by           | normalised         |
|----------|--------------------------|-------------------------|---------------------------------|--------------------|
| none     | x                        | q, 0                    | r . y                           | inputs are unit    |
| pca      | W (x - mu)               | W q, q . mu             | b + r . y  (exact at D' = D)    | no (keeps scale)   |
| random   | R x, R_ij ~ N(0, 1/D')   | R q, 0                  | r . y  (unbiased, JL)           | no (keeps scale)   |
| truncate | x[:D'] / norm            | q[:D'] / norm, 0        | r . y  (cosine of the prefixes) | yes (Matryoshka)   |

PCA: mu is the calibration mean, W (D', D) the top-D' eigenvectors of the calibration covariance (rows, each
with its largest-magnitude entry positive, so the fit is deterministic). Documents are centred, queries are not:
q . x = q . mu + q . (x - mu) ~ q . mu + (W q) . (W (x - mu)), the least-squares approximation of x - mu in the
component space; so PCA at D' = D ranks exactly as the original vectors. Scores stay comparable to the original
cosines (and to rescoring against the original vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import MAX_MAGNITUDE, check_values

__all__ = ["REDUCTIONS", "Reducer", "fit_reducer"]

REDUCTIONS = ("none", "pca", "random", "truncate")


@dataclass(frozen=True)
class Reducer:
    """A fitted reduction from ``in_dim`` to ``out_dim`` dimensions (see the module docstring).

    Args:
        kind: one of ``REDUCTIONS``.
        in_dim, out_dim: dimensions before and after.
        matrix: (out_dim, in_dim) float32: the PCA components or the random projection; None otherwise.
        mean: (in_dim,) float32 calibration mean (PCA); None otherwise.
    """

    kind: str
    in_dim: int
    out_dim: int
    matrix: Tensor | None = None
    mean: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.kind!r} (choose one of {', '.join(REDUCTIONS)})")
        if not 1 <= self.out_dim <= self.in_dim:
            raise ValueError(f"a reduction keeps 1..{self.in_dim} dims, got {self.out_dim}")
        if self.kind == "none" and self.out_dim != self.in_dim:
            raise ValueError("reduction 'none' keeps every dimension")
        needs_matrix = self.kind in ("pca", "random")
        if needs_matrix != (self.matrix is not None) or (self.kind == "pca") != (self.mean is not None):
            raise ValueError(f"reduction {self.kind!r}: matrix / mean do not match the kind")
        expected = {"matrix": (self.matrix, (self.out_dim, self.in_dim)), "mean": (self.mean, (self.in_dim,))}
        for name, (t, shape) in expected.items():
            if t is not None and (tuple(t.shape) != shape or t.dtype != torch.float32):
                raise ValueError(f"reduction {name} must be float32 {shape}, got {t.dtype} {tuple(t.shape)}")
            if t is not None:  # a fit gives entries of order 1 (unit vectors): NaN / Inf / 3e38 are damage
                check_values(t, f"reduce.{name}", -MAX_MAGNITUDE, MAX_MAGNITUDE)

    def documents(self, x: Tensor) -> Tensor:
        """Reduce stored vectors: (N, in_dim) -> (N, out_dim) float32."""
        x = x.float()
        if self.kind == "none":
            return x
        if self.kind == "truncate":
            return _unit(x[:, : self.out_dim])
        assert self.matrix is not None
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        return x @ self.matrix.to(x.device).T  # (N, D')

    def queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce queries: (Q, in_dim) -> (reduced (Q, out_dim), score offset (Q,)); scores are offset + r . y."""
        q = q.float()
        offset = torch.zeros(len(q), device=q.device)
        if self.kind == "none":
            return q, offset
        if self.kind == "truncate":
            return _unit(q[:, : self.out_dim]), offset
        assert self.matrix is not None
        if self.mean is not None:
            offset = q @ self.mean.to(q.device)  # (Q,)
        return q @ self.matrix.to(q.device).T, offset

    def tensors(self) -> dict[str, Tensor]:
        """The fitted tensors, by name (``matrix``, ``mean``), for an artifact."""
        out = {}
        if self.matrix is not None:
            out["matrix"] = self.matrix
        if self.mean is not None:
            out["mean"] = self.mean
        return out

    def nbytes(self) -> int:
        """Bytes of the fitted tensors (amortised over the stored vectors in ``bytes_per_vector``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_reducer(calibration: Tensor, kind: str, out_dim: int, *, seed: int = 0) -> Reducer:
    """Fit a reduction on calibration vectors (N, D) (PCA needs N >= 2; random projection uses only D).

    Args:
        calibration: unit vectors (N, D).
        kind: one of ``REDUCTIONS``.
        out_dim: dimensions kept (== D for ``none``).
        seed: seed of the random projection.
    """
    d = calibration.shape[1]
    if kind in ("none", "truncate"):
        return Reducer(kind=kind, in_dim=d, out_dim=out_dim)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        matrix = torch.randn(out_dim, d, generator=g, dtype=torch.float64) / math.sqrt(out_dim)
        return Reducer(kind=kind, in_dim=d, out_dim=out_dim, matrix=matrix.float())
    if kind != "pca":
        raise ValueError(f"unknown reduction {kind!r} (choose one of {', '.join(REDUCTIONS)})")
    n = calibration.shape[0]
    if n < 2:
        raise ValueError(f"PCA needs at least 2 calibration vectors, got {n}")
    x = calibration.double()
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)  # (D, D)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True, stable=True)[:out_dim]
    comps = evecs[:, order].T  # (D', D)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))  # (D', 1)
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    return Reducer(kind=kind, in_dim=d, out_dim=out_dim, matrix=comps.float().contiguous(), mean=mean.float())
