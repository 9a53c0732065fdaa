"""VQ assignment (fused distance + argmin) and codebook decode (gather, residual sum)."""

from __future__ import annotations

import pytest
import torch

from polyquant.kernels import vq


def _check_assignment(x: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, dist: torch.Tensor) -> None:
    """Every chosen codeword is nearest up to fp32 rounding, and the distance is its distance."""
    xd, cd = x.double().cpu().reshape(-1, c.shape[1]), c.double().cpu()
    true = ((xd[:, None, :] - cd[None]) ** 2).sum(-1)  # (N, K)
    chosen = true.gather(1, idx.cpu().reshape(-1, 1)).squeeze(1)
    best = true.min(dim=1).values
    scale = (xd * xd).sum(1) + (cd * cd).sum(1).max()
    assert ((chosen - best) <= 1e-5 * scale).all()
    assert ((dist.double().cpu().reshape(-1) - chosen).abs() <= 1e-5 * scale).all()


def test_assign_hand() -> None:
    c = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [-2.0, 0.0]])
    x = torch.tensor([[0.9, 1.2], [-1.1, 0.0], [0.1, -0.1], [1.0, 1.0]])
    idx, dist = vq.vq_assign_reference(x, c)
    assert idx.tolist() == [1, 3, 0, 1]  # codewords 1 and 2 tie: the smaller index wins
    torch.testing.assert_close(dist, torch.tensor([0.05, 0.81, 0.02, 0.0]))


def test_assign_reference_chunking() -> None:
    x, c = torch.randn(3, 333, 6), torch.randn(50, 6)
    idx, dist = vq.vq_assign_reference(x, c)
    idx2, dist2 = vq.vq_assign_reference(x, c, chunk_rows=7)
    assert idx.shape == (3, 333) and (idx == idx2).float().mean() > 0.99  # matmul blocking moves near-ties
    torch.testing.assert_close(dist, dist2)
    _check_assignment(x, c, idx, dist)


def test_decode_reference() -> None:
    c = torch.arange(12.0).reshape(4, 3)
    assert vq.vq_decode_reference(torch.tensor([[3, 0]]), c).tolist() == [[[9, 10, 11], [0, 1, 2]]]
    cbs = torch.stack([c, 10 * c])  # (Q=2, K=4, D=3)
    assert vq.rvq_decode_reference(torch.tensor([[1, 2]]), cbs).tolist() == [[63.0, 74.0, 85.0]]


def test_rvq_assign_reduces_error(torch_path: None) -> None:
    x = torch.randn(500, 8)
    cbs = torch.stack([torch.randn(64, 8), 0.3 * torch.randn(64, 8), 0.1 * torch.randn(64, 8)])
    idx = vq.rvq_assign(x, cbs)
    assert idx.shape == (500, 3)
    errs = [(x - vq.rvq_decode(idx[:, : q + 1], cbs[: q + 1])).pow(2).mean().item() for q in range(3)]
    assert errs[0] > errs[1] > errs[2]
    first, _ = vq.vq_assign(x, cbs[0])
    assert torch.equal(idx[:, 0], first)


def test_errors() -> None:
    with pytest.raises(ValueError):
        vq.vq_assign_reference(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="empty"):
        vq.vq_assign_reference(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError):
        vq.rvq_decode_reference(torch.zeros(4, 2, dtype=torch.long), torch.randn(3, 5, 2))


# ------------------------------------------------------------------------------------------------ Triton


@pytest.mark.parametrize("n, k, d", [(1000, 300, 8), (513, 1024, 3), (200, 100, 64), (77, 50, 33), (10, 1, 4),
                                     (0, 16, 8)])
def test_assign_triton_matches_reference(triton_path: str, n: int, k: int, d: int) -> None:
    x = torch.randn(n, d, device=triton_path)
    c = torch.randn(k, d, device=triton_path)
    idx, dist = vq.vq_assign(x, c)
    ref_idx, ref_dist = vq.vq_assign_reference(x, c)
    assert idx.dtype == torch.int64 and idx.shape == (n,) and dist.shape == (n,)
    if n:
        assert (idx == ref_idx).float().mean() > 0.99  # near-ties may rank differently
        _check_assignment(x, c, idx, dist)


def test_assign_triton_ties_and_duplicates(triton_path: str) -> None:
    c = torch.randn(300, 4, device=triton_path)
    c[200] = c[5]  # a duplicate in a later chunk never wins
    x = torch.cat([c[5:6], c[:3] + 1e-3, torch.randn(20, 4, device=triton_path)])
    idx, _ = vq.vq_assign(x, c)
    assert idx[0].item() == 5 and idx[1:4].tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_triton_matches_reference(triton_path: str, dtype: torch.dtype) -> None:
    cbs = torch.randn(4, 50, 24, device=triton_path).to(dtype)
    idx = torch.randint(0, 50, (3, 100, 4), device=triton_path)
    out = vq.rvq_decode(idx, cbs)
    ref = vq.rvq_decode_reference(idx, cbs)
    assert out.dtype == dtype and out.shape == (3, 100, 24)
    torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert torch.equal(vq.vq_decode(idx[..., 0], cbs[0]), vq.vq_decode_reference(idx[..., 0], cbs[0]))
    assert vq.vq_decode(idx[:0, :, 0], cbs[0]).shape == (0, 100, 24)


@pytest.mark.gpu
def test_assign_gpu_large() -> None:
    x = torch.randn(1 << 18, 8, device="cuda")
    c = torch.randn(1024, 8, device="cuda")
    idx, dist = vq.vq_assign(x, c)
    ref = torch.cdist(x, c).argmin(dim=1)
    assert (idx == ref).float().mean() > 0.999
    _check_assignment(x[:2000], c, idx[:2000], dist[:2000])


# ------------------------------------------------------------------------------------------------ indices out of range


def test_decode_reference_refuses_indices_out_of_range(torch_path: None) -> None:
    # Issue 21, class 5: -2 wrapped to codeword K - 2 and K raised an IndexError.
    c = torch.arange(12.0).reshape(4, 3)
    for bad in (-2, -1, 4):
        with pytest.raises(ValueError, match=r"VQ indices must lie in \[0, 4\)"):
            vq.vq_decode(torch.tensor([0, bad]), c)
        with pytest.raises(ValueError, match=r"VQ indices must lie in \[0, 4\)"):
            vq.rvq_decode(torch.tensor([[0, bad]]), torch.stack([c, c]))
    with pytest.raises(ValueError, match="integers"):
        vq.vq_decode_reference(torch.tensor([0.0, 1.0]), c)


def test_decode_triton_gives_nan_rows_for_indices_out_of_range(triton_path: str) -> None:
    # The Triton decode checks nothing on the host (no device sync): such rows are NaN, not a clamped codeword.
    c = torch.arange(24.0, device=triton_path).reshape(2, 4, 3)
    out = vq.rvq_decode(torch.tensor([[0, -2], [1, 1], [4, 0]], device=triton_path), c)
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert torch.equal(out[1], c[0, 1] + c[1, 1])
    assert torch.isnan(vq.vq_decode(torch.tensor([-1], device=triton_path), c[0])).all()
