"""Dimensionality reductions: PCA against scikit-learn, exactness at full rank, random projection and truncation."""

from __future__ import annotations

import pytest
import torch

from polyquant.plugins.embeddings.configs import Int8Config
from polyquant.plugins.embeddings.reduce import Reducer, fit_reducer


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _data(n: int = 200, d: int = 16, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(2.0, 0.1, d) + 0.3
    if rank is not None:  # a linear subspace of dimension ``rank`` (normalising keeps rows in it)
        x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return _unit(x)


def test_pca_matches_scikit_learn() -> None:
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    x = _data()
    r = fit_reducer(x, "pca", 5)
    ref = sklearn_decomposition.PCA(n_components=5).fit(x.double().numpy())
    torch.testing.assert_close(r.mean, torch.from_numpy(ref.mean_).float(), rtol=0, atol=1e-6)
    comps = torch.from_numpy(ref.components_).float()
    signs = torch.sign((comps * r.matrix).sum(dim=1, keepdim=True))  # eigenvectors are defined up to sign
    torch.testing.assert_close(r.matrix, comps * signs, rtol=0, atol=1e-5)
    # our sign rule: each component's largest-magnitude entry is positive (deterministic fits)
    assert bool((r.matrix.gather(1, r.matrix.abs().argmax(dim=1, keepdim=True)) > 0).all())


def test_pca_scores_estimate_the_cosine_exactly_when_nothing_is_dropped() -> None:
    x, q = _data(), _unit(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)))
    for r in (fit_reducer(x, "pca", 16), fit_reducer(_data(rank=4), "pca", 4)):
        xx = x if r.out_dim == 16 else _data(rank=4)
        reduced, offset = r.queries(q)
        # documents centred, queries not: q . x = q . mu + (W q) . (W (x - mu)) when W spans x - mu
        torch.testing.assert_close(offset[:, None] + reduced @ r.documents(xx).T, q @ xx.T, rtol=0, atol=1e-5)


def test_random_projection_is_seeded_and_preserves_inner_products_on_average() -> None:
    x = _data(n=300, d=256, seed=1)
    a, b, c = (fit_reducer(x, "random", 128, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)
    assert a.mean is None
    reduced, offset = a.queries(x[:50])
    est = offset[:, None] + reduced @ a.documents(x[50:]).T
    err = est - x[:50] @ x[50:].T
    # Gaussian entries N(0, 1/D'): unbiased, standard deviation ~ sqrt(2 / D') = 0.125 for unit vectors
    assert abs(float(err.mean())) < 0.01 and 0.08 < float(err.std()) < 0.17


def test_truncation_keeps_the_prefix_renormalised() -> None:
    x = _data()
    r = fit_reducer(x, "truncate", 6)
    torch.testing.assert_close(r.documents(x), _unit(x[:, :6]))
    reduced, offset = r.queries(x[:3])
    torch.testing.assert_close(reduced, _unit(x[:3, :6]))
    assert torch.equal(offset, torch.zeros(3)) and r.tensors() == {} and r.nbytes() == 0


def test_config_keep_and_dims() -> None:
    assert Int8Config().reduced_dim(384) == 384
    assert Int8Config(reduce="pca", keep=0.5).reduced_dim(384) == 192
    assert Int8Config(reduce="pca", keep=0.01).reduced_dim(50) == 1  # at least one dimension
    assert Int8Config(reduce="truncate", keep=0.5, dims=64).reduced_dim(384) == 64  # dims wins
    with pytest.raises(ValueError, match="dims=500 exceeds the 384"):
        Int8Config(reduce="random", dims=500).reduced_dim(384)
    with pytest.raises(ValueError, match="need a reduction"):
        Int8Config(keep=0.5)
    with pytest.raises(ValueError, match="keep must be in"):
        Int8Config(reduce="pca", keep=0.0)


def test_bad_reductions_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 calibration vectors"):
        fit_reducer(_data(n=1), "pca", 2)
    with pytest.raises(ValueError, match="unknown reduction 'umap'"):
        fit_reducer(_data(), "umap", 2)
    with pytest.raises(ValueError, match="matrix must be float32"):
        Reducer(kind="random", in_dim=4, out_dim=2, matrix=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="keeps 1..4 dims"):
        Reducer(kind="truncate", in_dim=4, out_dim=5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_reducer_refuses_non_finite_or_huge_tensors(value: float) -> None:
    matrix, mean = torch.eye(3)[:2].contiguous(), torch.zeros(3)
    Reducer(kind="pca", in_dim=3, out_dim=2, matrix=matrix, mean=mean)
    for name in ("matrix", "mean"):
        bad_matrix, bad_mean = matrix.clone(), mean.clone()
        (bad_matrix if name == "matrix" else bad_mean).view(-1)[1] = value
        with pytest.raises(ValueError, match=f"^reduce.{name} must be finite and in \\[-1e\\+06, 1e\\+06\\]"):
            Reducer(kind="pca", in_dim=3, out_dim=2, matrix=bad_matrix, mean=bad_mean)
