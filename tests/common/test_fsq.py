"""Finite scalar quantization (``polyquant.fsq``): hand-computed grids, codes, round trips, errors, and the
reference implementation (vector-quantize-pytorch's FSQ) as an oracle."""

from __future__ import annotations

import pytest
import torch

from polyquant.fsq import FSQ


def test_grids_by_hand() -> None:
    odd, even = FSQ([3]), FSQ([4])
    z = torch.tensor([[-10.0], [-0.6], [0.0], [0.3], [10.0]])
    # L = 3: tanh(z) * 1.001 rounded -> {-1, 0, 1}; L = 4: shifted so that 0 -> 0, values {-1, -.5, 0, .5}
    assert odd.quantize(z).flatten().tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0]
    assert even.quantize(z).flatten().tolist() == [-1.0, -0.5, 0.0, 0.0, 0.5]
    assert even.encode(z).tolist() == [0, 1, 2, 2, 3]
    # mixed radix, first channel least significant: levels (3, 4), digits (2, 1) -> 2 + 3 * 1 = 5
    f = FSQ([3, 4])
    assert f.codebook_size == 12 and int(f.codes_from_values(torch.tensor([1.0, -0.5]))) == 5
    assert f.decode(torch.tensor(5)).tolist() == [1.0, -0.5]


def test_round_trip_gradient_and_errors() -> None:
    f = FSQ([8, 5, 5, 5])
    z = (torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    x_hat, codes, loss = f(z)
    assert torch.equal(f.decode(codes), x_hat.detach()) and float(loss) == 0.0
    assert int(codes.min()) >= 0 and int(codes.max()) < 1000 and abs(f.bits - 9.966) < 1e-3
    x_hat.sum().backward()  # straight-through: the gradient of the bound passes
    assert z.grad is not None and bool((z.grad > 0).all())
    with pytest.raises(ValueError, match="codes must lie in"):
        f.decode(torch.tensor([1000]))
    with pytest.raises(ValueError, match="integers"):
        f.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected"):
        f(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=">= 2"):
        FSQ([1, 4])


def test_matches_vector_quantize_pytorch() -> None:
    ref_mod = pytest.importorskip("vector_quantize_pytorch")
    for levels in ([8, 5, 5, 5], [7, 5, 5, 5, 5], [4, 4]):
        ours, ref = FSQ(levels), ref_mod.FSQ(levels=levels)
        z = torch.randn(2, 300, len(levels), generator=torch.Generator().manual_seed(len(levels))) * 1.5
        x_ref, idx_ref = ref(z)
        x_hat, codes, _ = ours(z)
        assert torch.allclose(x_hat, x_ref, atol=1e-6) and torch.equal(codes, idx_ref), levels
