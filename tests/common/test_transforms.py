"""Hadamard matrices, fast transforms and folding: orthogonality, agreement with dense matrices, equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polyquant.transforms import (
    HadamardRotation,
    fold_hadamard_into_linear,
    fold_layernorm_into_linears,
    fold_scale_into_linear,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    random_hadamard,
)

SIZES = [1, 2, 4, 8, 16, 64, 128, 12, 24, 48, 20, 40, 80, 160, 28, 36, 44, 60, 96, 768, 1152, 1280]


def test_hand_computed_2x2_and_4x4() -> None:
    s = 1 / math.sqrt(2)
    assert torch.allclose(hadamard_matrix(2), torch.tensor([[s, s], [s, -s]]))
    h4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float32) / 2
    assert torch.allclose(hadamard_matrix(4), h4)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(fwht(x), torch.tensor([10.0, -2.0, -4.0, 0.0]) / 2)
    assert torch.allclose(fwht(x, normalize=False), torch.tensor([10.0, -2.0, -4.0, 0.0]))
    assert torch.allclose(fwht(torch.tensor([3.0, 1.0]), normalize=False), torch.tensor([4.0, 2.0]))


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal_and_plus_minus_one(n: int) -> None:
    assert is_hadamard_size(n)
    h = hadamard_matrix(n, dtype=torch.float64)
    assert h.shape == (n, n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs() * math.sqrt(n), torch.ones(n, n, dtype=torch.float64))


@pytest.mark.parametrize("n", [4, 12, 24, 40])
def test_unnormalized_matrix(n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float64, normalize=False)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.allclose(h / math.sqrt(n), hadamard_matrix(n, dtype=torch.float64), atol=0, rtol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_fwht_matches_dense(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n, dtype=torch.float64), atol=1e-10)
    # Involution: the normalized Sylvester matrix is symmetric and orthogonal.
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-10)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_transform_matches_dense(n: int) -> None:
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n, dtype=torch.float64), atol=1e-10)


def test_transform_keeps_dtype_and_norm() -> None:
    x = torch.randn(2, 3, 96)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("n", [0, 3, 6, 10, 52, 100, 2 * 11, -4])
def test_invalid_sizes(n: int) -> None:
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match="no Hadamard matrix of size"):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match="no Hadamard matrix of size"):
            hadamard_transform(torch.randn(2, n))


def test_fwht_errors() -> None:
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(2, 12))
    with pytest.raises(ValueError, match="floating-point"):
        fwht(torch.ones(4, dtype=torch.int64))


def test_random_hadamard_seeded_orthonormal() -> None:
    a, b, c = random_hadamard(48, 1), random_hadamard(48, 1), random_hadamard(48, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(48), atol=1e-5)
    signs = (a / hadamard_matrix(48)).round()
    assert torch.allclose(signs, signs[0].expand(48, -1))  # H @ diag(s): one sign per column


@pytest.mark.parametrize("n", [16, 24])
def test_fold_input_side(n: int) -> None:
    lin = nn.Linear(n, 7)
    ref = nn.Linear(n, 7)
    ref.load_state_dict(lin.state_dict())
    h = random_hadamard(n, 3)
    fold_hadamard_into_linear(lin, h, side="input")
    x = torch.randn(10, n)
    assert torch.allclose(lin(x @ h), ref(x), atol=1e-5)


def test_fold_output_side() -> None:
    lin, ref = nn.Linear(5, 12), nn.Linear(5, 12)
    ref.load_state_dict(lin.state_dict())
    h = hadamard_matrix(12)
    fold_hadamard_into_linear(lin, h, side="output")
    x = torch.randn(10, 5)
    assert torch.allclose(lin(x), ref(x) @ h, atol=1e-5)


def test_fold_pair_cancels() -> None:
    """Rotate the output of one layer and the input of the next: the composition is unchanged."""
    a, b = nn.Linear(6, 20), nn.Linear(20, 3)
    ref = nn.Sequential(nn.Linear(6, 20), nn.Linear(20, 3))
    ref[0].load_state_dict(a.state_dict())
    ref[1].load_state_dict(b.state_dict())
    h = random_hadamard(20, 0)
    fold_hadamard_into_linear(a, h, side="output")
    fold_hadamard_into_linear(b, h, side="input")
    x = torch.randn(8, 6)
    assert torch.allclose(b(a(x)), ref(x), atol=1e-5)


def test_fold_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        fold_hadamard_into_linear(nn.Linear(8, 4), hadamard_matrix(4), side="input")
    with pytest.raises(ValueError, match="side"):
        fold_hadamard_into_linear(nn.Linear(4, 4), hadamard_matrix(4), side="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must have shape"):
        fold_scale_into_linear(torch.ones(3), nn.Linear(4, 4))


def test_fold_scale() -> None:
    lin, ref = nn.Linear(4, 3), nn.Linear(4, 3)
    ref.load_state_dict(lin.state_dict())
    s = torch.tensor([0.5, 2.0, 3.0, 0.25])
    fold_scale_into_linear(s, lin)
    x_prime = torch.randn(6, 4)
    assert torch.allclose(lin(x_prime), ref(x_prime * s), atol=1e-5)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    hand = nn.Linear(2, 2, bias=False)
    hand.weight.data = w.clone()
    fold_scale_into_linear(torch.tensor([10.0, -1.0]), hand)
    assert torch.equal(hand.weight.data, torch.tensor([[10.0, -2.0], [30.0, -4.0]]))


def test_fold_layernorm() -> None:
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    q, k = nn.Linear(8, 5), nn.Linear(8, 5, bias=False)
    ref = [nn.LayerNorm(8), nn.Linear(8, 5), nn.Linear(8, 5, bias=False)]
    for r, m in zip(ref, [norm, q, k]):
        r.load_state_dict(m.state_dict())
    fold_layernorm_into_linears(norm, [q, k])
    x = torch.randn(7, 8)
    assert torch.allclose(q(norm(x)), ref[1](ref[0](x)), atol=1e-5)
    assert torch.allclose(k(norm(x)), ref[2](ref[0](x)), atol=1e-5)
    assert torch.equal(norm.weight.data, torch.ones(8)) and torch.equal(norm.bias.data, torch.zeros(8))


@pytest.mark.parametrize("seed", [None, 7])
def test_hadamard_rotation_module(seed: int | None) -> None:
    rot = HadamardRotation(40, seed=seed)
    x = torch.randn(2, 3, 40)
    assert torch.allclose(rot(x), x @ rot.matrix(), atol=1e-5)
    assert torch.allclose(rot.matrix() @ rot.matrix().T, torch.eye(40), atol=1e-5)
    y16 = rot(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    # Online rotation + folded weight == original layer.
    lin, ref = nn.Linear(40, 4), nn.Linear(40, 4)
    ref.load_state_dict(lin.state_dict())
    fold_hadamard_into_linear(lin, rot.matrix(), side="input")
    assert torch.allclose(lin(rot(x)), ref(x), atol=1e-5)
    with pytest.raises(ValueError, match="last dim"):
        rot(torch.randn(2, 8))
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        HadamardRotation(10)
    state = rot.state_dict()
    assert ("signs" in state) == (seed is not None)
