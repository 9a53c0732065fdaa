"""Hadamard matrices and the fast Walsh-Hadamard transform (optionally fused with int8 quantization)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import assert_kernel_close

from polyquant.kernels import hadamard
from polyquant.transforms import hadamard_matrix

SIZES = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 40, 48, 64, 80, 128, 160, 256, 384, 640, 1024, 1152, 1536, 2560, 5120]


def test_unsupported_sizes() -> None:
    for n in (3, 24 + 1, 52, 100):
        with pytest.raises(ValueError, match="no Hadamard matrix"):
            hadamard.fwht_reference(torch.zeros(2, n))
        with pytest.raises(ValueError, match="no Hadamard matrix"):
            hadamard.fwht_triton(torch.zeros(2, n))


@pytest.mark.parametrize("n", [256, 640, 1152, 1536])
def test_plan_is_the_core_factorization(n: int) -> None:
    f, l = hadamard._plan(n)
    assert f * l == n and f > 1
    h = hadamard_matrix(n, dtype=torch.float64, normalize=False)
    hf = hadamard_matrix(f, dtype=torch.float64, normalize=False)
    hl = hadamard_matrix(l, dtype=torch.float64, normalize=False)
    assert torch.equal(h, torch.kron(hf, hl))


def test_plan_tiles() -> None:
    # (F, L): F rows of L contiguous columns, L padded to at most 128 (256 above n = 16384)
    plans = {n: hadamard._plan(n) for n in (12, 40, 1536, 4096, 5120, 12288, 32768)}
    assert plans == {12: (1, 12), 40: (1, 40), 1536: (16, 96), 4096: (32, 128), 5120: (64, 80),
                     12288: (128, 96), 32768: (128, 256)}
    with pytest.raises(ValueError, match="too large"):
        hadamard._plan(65536)


def test_fwht_basis_vectors() -> None:
    # e_0 -> all entries 1/sqrt(n); e_j -> row j of H / sqrt(n)
    n = 8
    y = hadamard.fwht_reference(torch.eye(n))
    assert torch.allclose(y[0], torch.full((n,), 1 / math.sqrt(n)))
    torch.testing.assert_close(y[3], torch.tensor([1, -1, -1, 1, 1, -1, -1, 1]) / math.sqrt(8))
    torch.testing.assert_close(hadamard.fwht_reference(torch.tensor([1.0, 1.0, 1.0, 1.0])),
                               torch.tensor([2.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("n", SIZES)
def test_fwht_reference_is_dense_transform(n: int) -> None:
    x = torch.randn(3, 2, n, dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64)  # the core's orthonormal matrix
    torch.testing.assert_close(hadamard.fwht_reference(x), x @ h)
    torch.testing.assert_close(hadamard.fwht_reference(x, scale=1.0), x @ h * math.sqrt(n))
    # orthonormal: the norm is preserved, and H^T undoes it
    torch.testing.assert_close(hadamard.fwht_reference(x).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(hadamard.fwht_reference(x) @ h.T, x)


def test_fwht_quantize_reference() -> None:
    x = torch.randn(4, 96)
    codes, scale = hadamard.fwht_quantize_reference(x)
    y = hadamard.fwht_reference(x)
    assert codes.dtype == torch.int8 and scale.shape == (4, 1)
    torch.testing.assert_close(scale, y.abs().amax(dim=-1, keepdim=True) / 127)
    assert ((codes * scale - y).abs() <= scale / 2 + 1e-6).all()
    codes, scale = hadamard.fwht_quantize_reference(x, out_scale=0.01)
    assert torch.equal(scale, torch.full((4, 1), 0.01))
    assert torch.equal(codes, torch.round(y / 0.01).clamp(-128, 127).to(torch.int8))


# ------------------------------------------------------------------------------------------------ Triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fwht_triton_matches_reference(triton_path: str, dtype: torch.dtype) -> None:
    for n in SIZES:
        x = torch.randn(5, n, device=triton_path).to(dtype)
        out = hadamard.fwht(x)
        assert out.dtype == dtype and out.shape == x.shape
        assert_kernel_close(out, hadamard.fwht_reference(x), context=n)


def test_fwht_triton_many_rows_and_empty(triton_path: str) -> None:
    x = torch.randn(3, 67, 256, device=triton_path)  # rows not a multiple of the tile
    assert_kernel_close(hadamard.fwht(x, scale=0.5), hadamard.fwht_reference(x, scale=0.5))
    empty = torch.randn(0, 40, device=triton_path)
    assert hadamard.fwht(empty).shape == (0, 40)
    codes, scale = hadamard.fwht_quantize(empty)
    assert codes.shape == (0, 40) and scale.shape == (0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_fwht_quantize_triton_matches_reference(triton_path: str, dtype: torch.dtype, static: bool) -> None:
    for n in (16, 40, 384, 1024, 2560):
        x = torch.randn(7, n, device=triton_path).to(dtype)
        out_scale = 0.02 if static else None
        codes, scale = hadamard.fwht_quantize(x, out_scale=out_scale)
        ref_codes, ref_scale = hadamard.fwht_quantize_reference(x, out_scale=out_scale)
        torch.testing.assert_close(scale, ref_scale, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=0)
        diff = (codes.int() - ref_codes.int()).abs()
        assert diff.max() <= 1  # fp16 tensor-core operands can move a value across a rounding boundary
        assert diff.float().mean() < (0.02 if dtype == torch.float16 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 5120, 1536, 12288, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fwht_gpu_large(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(1000, n, device="cuda", dtype=dtype)
    assert_kernel_close(hadamard.fwht(x), hadamard.fwht_reference(x), context=n)
