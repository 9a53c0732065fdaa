"""Every core function against its kernel counterpart, element by element.

The core (``polyquant``), run on the CPU, is the specification; each kernel op must compute the same thing, on
its reference path and on its Triton path (the interpreter here, compiled kernels on a GPU with
POLYQUANT_TRITON_NATIVE=1):

| core                                             | kernel                                          | equal       |
|--------------------------------------------------|-------------------------------------------------|-------------|
| primitives.quantize_tensor / dequantize          | quant.quantize / dequantize                     | exactly     |
| primitives.choose_qparams (symmetric)            | quant.quantize_dynamic                          | exactly     |
| primitives.fake_quantize                         | quant.dequantize(quant.quantize(...))           | exactly     |
| pack.pack_rows / pack_bits                       | gemm.pack_4bit, quantize_weight_4bit            | exactly     |
| export's weight_packed / weight_scale + QuantLinear | gemm.w4_gemm on the artifact's tensors       | to rounding |
| transforms.hadamard_matrix / fwht / transform    | hadamard.fwht (reference, Triton)               | to rounding |
| vq.VectorQuantizer / ResidualVQ encode, decode   | vq.vq_assign / rvq_assign, vq_decode / rvq_decode | exactly*  |
| formats.BinaryFormat + pack_rows(codes, 1)       | hamming.pack_binary, hamming distances          | exactly     |

* assignment: exactly on the reference path; tensor-core distances may rank near-ties differently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from polyquant.artifact import load, save
from polyquant.export import export
from polyquant.formats import BinaryFormat, FloatFormat, IntFormat, get_format
from polyquant.kernels import gemm, hadamard, hamming, quant, vq
from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare
from polyquant.pack import pack_bits, pack_rows, pad_rows
from polyquant.primitives import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    block_size_for,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize_tensor,
)
from polyquant.transforms import fwht, hadamard_matrix, hadamard_transform
from polyquant.vq import ResidualVQ, VectorQuantizer

FORMATS = ["int4", "int8", "uint8", "e2m1", "e4m3"]
GRANULARITIES: list[Granularity] = [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(16)]


@pytest.fixture(params=["reference", "triton"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel path under test, forced through the public dispatch; returns the device for the tensors."""
    if request.param == "reference":
        monkeypatch.setenv("POLYQUANT_KERNELS", "torch")
        return "cpu"
    return request.getfixturevalue("triton_path")


def _on_reference_path() -> bool:
    return os.environ.get("POLYQUANT_KERNELS") == "torch"


def _core_qparams(x: torch.Tensor, fmt: str, block: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    f = get_format(fmt)
    symmetric = not (isinstance(f, IntFormat) and not f.signed)
    scale, zp = choose_qparams(x, f, block, symmetric=symmetric)
    return scale, (zp if f.supports_zero_point else None)


def _kernel_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Kernel codes -> the core's grid values on the CPU (INT codes are the values; FP codes are bit patterns)."""
    f = get_format(fmt)
    return f.decode(codes.cpu()) if isinstance(f, FloatFormat) else codes.cpu().float()


# ------------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: repr(g))
def test_quantize_dequantize(path: str, fmt: str, granularity: Granularity) -> None:
    x = torch.randn(24, 64) * 3
    block = block_size_for(granularity, x.shape)
    scale, zp = _core_qparams(x, fmt, block)
    q = quantize_tensor(x, fmt, scale, zp, block)  # the core's grid values (on the CPU: the specification)
    zp_dev = None if zp is None else zp.to(path)
    codes = quant.quantize(x.to(path), scale.to(path), zp_dev, fmt=fmt, block_size=block)
    f = get_format(fmt)
    if isinstance(f, FloatFormat):
        assert torch.equal(codes.cpu(), f.encode(q))
    assert torch.equal(_kernel_values(codes, fmt), q)
    back = quant.dequantize(codes, scale.to(path), zp_dev, fmt=fmt, block_size=block).cpu()
    assert torch.equal(back, dequantize(q, scale, zp, block))
    assert torch.equal(back, fake_quantize(x, fmt, scale, zp, block))


@pytest.mark.parametrize("fmt", ["int4", "int8", "e2m1", "e4m3"])
@pytest.mark.parametrize("granularity", [PerToken(), PerGroup(32)], ids=lambda g: repr(g))
def test_quantize_dynamic(path: str, fmt: str, granularity: Granularity) -> None:
    x = torch.randn(3, 7, 96)
    block = block_size_for(granularity, x.shape)
    codes, scale = quant.quantize_dynamic(x.to(path), fmt=fmt, block_size=block)
    core_scale, _ = choose_qparams(x, fmt, block, symmetric=True)
    assert torch.equal(scale.cpu(), core_scale)  # no all-zero block here (the core gives those eps, the kernel 1)
    assert torch.equal(_kernel_values(codes, fmt), quantize_tensor(x, fmt, core_scale, None, block))


# ------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("k", [64, 45])
def test_pack_4bit_is_the_core_row_layout(k: int) -> None:
    codes = torch.randint(0, 16, (9, k), dtype=torch.uint8)
    packed = gemm.pack_4bit(codes)
    assert torch.equal(packed, pack_rows(codes, 4))
    assert torch.equal(packed.flatten(), pack_bits(pad_rows(codes, 4), 4))  # what export writes
    if k % 2 == 0:
        assert torch.equal(packed.flatten(), pack_bits(codes.flatten(), 4))  # the plain dense stream
    assert torch.equal(gemm.unpack_4bit(packed, k), codes)


@pytest.mark.parametrize("fmt", ["int4", "e2m1"])
def test_quantize_weight_4bit_is_core_quantization(path: str, fmt: str) -> None:
    w = torch.randn(32, 128)
    block = block_size_for(PerGroup(32), w.shape)
    packed, scale = gemm.quantize_weight_4bit(w.to(path), fmt=fmt, block_size=block)
    core_scale, _ = choose_qparams(w, fmt, block, symmetric=True)
    f = get_format(fmt)
    core_codes = f.encode(quantize_tensor(w, f, core_scale, None, block))
    assert torch.equal(scale.cpu(), core_scale)
    assert torch.equal(packed.cpu(), pack_rows(core_codes, 4))
    w_hat = gemm.dequantize_weight_4bit(packed, scale, k=128, fmt=fmt, block_size=block)
    assert torch.equal(w_hat.cpu(), fake_quantize(w, f, core_scale, None, block))


def _exported_linear(spec: QuantSpec, n: int, k: int) -> tuple[nn.Module, nn.Module]:
    """A Linear (k -> n) with a weight quantizer, calibrated; and the same model prepared but not calibrated."""
    torch.manual_seed(0)
    rules = [QuantRule("*", weight=spec)]
    model = prepare(nn.Sequential(nn.Linear(k, n)).eval(), rules)
    calibrate(model, [torch.randn(4, k)], progress=False)
    return model, prepare(nn.Sequential(nn.Linear(k, n)).eval(), rules)


@pytest.mark.parametrize(
    "fmt, granularity, k",
    [("int4", PerGroup(32), 96), ("e2m1", PerGroup(16), 64), ("int4", PerChannel(0), 45)],
    ids=["int4-group32", "e2m1-group16", "int4-channel-odd-k"],
)
def test_artifact_weights_feed_w4_gemm(path: str, tmp_path: Path, fmt: str, granularity: Granularity, k: int) -> None:
    """An artifact's packed codes and scales, as they are, give the fake-quant layer's output through w4_gemm."""
    n = 24
    model, _ = _exported_linear(QuantSpec(fmt, granularity), n, k)
    save(export(model), tmp_path / "a.safetensors")
    art = load(tmp_path / "a.safetensors")
    packed = art.tensors["0.weight_packed"].view(n, -1).to(path)  # a view: one row of bytes per output channel
    scale = art.tensors["0.weight_scale"].to(path)
    zp = art.tensors.get("0.weight_zero_point")  # int entries carry zero points, float entries none
    assert zp is None or not zp.any()  # symmetric: w4_gemm takes no zero point
    bias = art.tensors["float.0.bias"].to(path)
    block = block_size_for(granularity, (n, k))
    x = torch.randn(5, k)
    with torch.no_grad():
        expected = model(x)
    out = gemm.w4_gemm(x.to(path), packed, scale, fmt=fmt, block_size=block, bias=bias)
    torch.testing.assert_close(out.cpu(), expected)


# ------------------------------------------------------------------------------------------------ Hadamard


@pytest.mark.parametrize("n", [16, 256, 12, 24, 96, 1536, 40, 80, 160])
def test_hadamard(path: str, n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float64)  # the core's matrix is the definition
    x = torch.randn(6, n, dtype=torch.float64)
    expected = x @ h
    torch.testing.assert_close(hadamard_transform(x), expected)
    if n & (n - 1) == 0:
        torch.testing.assert_close(fwht(x), expected)
    torch.testing.assert_close(hadamard.fwht_reference(x), expected)  # the kernel's reference, in fp64
    torch.testing.assert_close(hadamard.fwht_reference(torch.eye(n, dtype=torch.float64)), h)
    # the dispatching op (fp32): rows of the identity give the matrix itself
    eye = torch.eye(n, device=path)[:256]
    torch.testing.assert_close(hadamard.fwht(eye).cpu(), h[:256].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(hadamard.fwht(x.float().to(path)).cpu(), expected.float(), rtol=1e-5, atol=1e-5)
    unnormalized = hadamard.fwht(x.float().to(path), scale=1.0).cpu()
    torch.testing.assert_close(unnormalized, (x @ hadamard_matrix(n, dtype=torch.float64, normalize=False)).float(),
                               rtol=1e-5, atol=1e-4)


def test_fwht_quantize_is_core_quantization_of_the_transform(path: str) -> None:
    x = torch.randn(5, 96)
    codes, scale = hadamard.fwht_quantize(x.to(path))
    y = hadamard_transform(x)
    block = block_size_for(PerToken(), y.shape)
    core_scale, _ = choose_qparams(y, "int8", block, symmetric=True)
    torch.testing.assert_close(scale.cpu(), core_scale, rtol=1e-5, atol=0)
    core_codes = quantize_tensor(y, "int8", core_scale, None, block)
    assert (codes.cpu().float() - core_codes).abs().max() <= 1  # fp32 rounding may cross a rounding boundary


# ------------------------------------------------------------------------------------------------ VQ


def _codebooks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randn(64, 8, generator=g), 0.3 * torch.randn(64, 8, generator=g),
                        0.1 * torch.randn(64, 8, generator=g)])  # (Q, K, D)


def test_vq_assign_and_decode(path: str) -> None:
    cbs = _codebooks()
    core = VectorQuantizer(dim=8, codebook_size=64)
    core.set_codebook(cbs[0])
    x = torch.randn(2, 500, 8)
    codes = core.encode(x)
    idx, dist = vq.vq_assign(x.to(path), cbs[0].to(path))
    if _on_reference_path():
        assert torch.equal(idx, codes)  # the same fp32 expansion |c|^2 - 2 x.c
    else:  # tensor-core products may rank near-ties differently
        assert (idx.cpu() == codes).float().mean() > 0.99
        true = ((x[..., None, :] - cbs[0]) ** 2).sum(-1)
        chosen = true.gather(-1, idx.cpu()[..., None]).squeeze(-1)
        assert torch.allclose(chosen, true.min(dim=-1).values, atol=1e-4)
    torch.testing.assert_close(dist.cpu(), ((x - core.decode(idx.cpu())) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    assert torch.equal(vq.vq_decode(codes.to(path), cbs[0].to(path)).cpu(), core.decode(codes))


def test_rvq_assign_and_decode(path: str) -> None:
    cbs = _codebooks()
    core = ResidualVQ(dim=8, num_quantizers=3, codebook_size=64)
    for layer, cb in zip(core.layers, cbs):
        layer.set_codebook(cb)
    x = torch.randn(300, 8)
    codes = core.encode(x)
    idx = vq.rvq_assign(x.to(path), cbs.to(path)).cpu()
    if _on_reference_path():
        assert torch.equal(idx, codes)
    else:  # tensor-core products may rank near-ties differently, and a different code changes later residuals
        assert (idx[:, 0] == codes[:, 0]).float().mean() > 0.99
    assert torch.equal(vq.rvq_decode(codes.to(path), cbs.to(path)).cpu(), core.decode(codes))


# ------------------------------------------------------------------------------------------------ binary


@pytest.mark.parametrize("d", [64, 21])
def test_binary_packing_and_hamming(d: int) -> None:
    fmt = BinaryFormat()
    x = torch.randn(7, d)
    core_codes = fmt.encode(fmt.round(x))  # sign bits: +1 (x >= 0) -> 1
    packed = hamming.pack_binary(x >= 0)
    assert torch.equal(packed, pack_rows(core_codes, 1))
    if d % 8 == 0:
        assert torch.equal(packed.flatten(), pack_bits(core_codes.flatten(), 1))
    assert torch.equal(hamming.unpack_binary(packed, d), core_codes.bool())
    # Hamming distance = number of differing core codes; dot product of the +-1 values = d - 2 * distance
    dist = hamming.hamming_distance_reference(packed, packed)
    differ = (core_codes[:, None, :] != core_codes[None, :, :]).sum(-1)
    assert torch.equal(dist, differ.to(torch.int32))
    values = fmt.decode(core_codes)
    assert torch.equal(values @ values.T, (d - 2 * differ).float())
