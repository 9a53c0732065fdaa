"""Lossless coding of Gaussian positions (order-preserving fp16 grid, lzma byte planes) and index streams
(constriction range coder): exact round trips, sizes against the ideal, and clear errors."""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import Tensor

from polyquant.plugins.gaussians.coding import (
    canonical_order,
    decode_positions,
    decode_symbols,
    encode_positions,
    encode_symbols,
    entropy_bits,
    float16_grid,
    grid_to_float16,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bits(half: Tensor) -> Tensor:
    return half.view(torch.int16)


def _clustered(n: int, seed: int) -> Tensor:
    """A scene-like cloud: Gaussian blobs of different sizes around random centres, a few far outliers."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(32, 3, generator=g) * 20 - 10  # (C, 3)
    sizes = torch.rand(32, 1, generator=g) * 0.5 + 0.05  # (C, 1)
    which = torch.randint(0, 32, (n,), generator=g)
    xyz = centres[which] + torch.randn(n, 3, generator=g) * sizes[which]  # (N, 3)
    far = torch.randint(0, n, (n // 100,), generator=g)
    xyz[far] = torch.randn(far.numel(), 3, generator=g) * 100
    return xyz


def _round_trip(xyz: Tensor) -> None:
    ordered = xyz[canonical_order(xyz)]
    blob = encode_positions(ordered)
    out = decode_positions(blob, xyz.shape[0])
    assert out.dtype == torch.float16 and out.shape == xyz.shape
    assert torch.equal(_bits(out), _bits(ordered.to(torch.float16)))


# --- the order-preserving fp16 grid ---------------------------------------------------------------------------


def test_grid_hand_computed_values() -> None:
    xyz = torch.tensor([[0.0, 1.0, -1.0], [-0.0, 2.0, 65504.0]])
    grid = float16_grid(xyz)
    assert grid.dtype == torch.int32
    assert grid.tolist() == [[0x8000, 0x8000 | 0x3C00, ~0xBC00 & 0xFFFF], [0x7FFF, 0x8000 | 0x4000, 0x8000 | 0x7BFF]]


def test_grid_is_order_preserving_and_inverts_exactly() -> None:
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)  # all fp16 patterns
    finite = every[torch.isfinite(every)]
    xyz = finite.repeat_interleave(3).reshape(-1, 3)  # (N, 3)
    grid = float16_grid(xyz)
    assert int(grid.min()) >= 0 and int(grid.max()) <= 0xFFFF
    assert torch.equal(_bits(grid_to_float16(grid)), _bits(xyz))  # bit-exact, -0.0 and subnormals included
    ints = grid[:, 0]
    assert ints.unique().numel() == finite.numel()  # injective: -0.0 and +0.0 stay apart
    by_int = finite.float()[torch.argsort(ints)]
    assert bool((by_int[1:] > by_int[:-1]).sum() == finite.numel() - 2)  # sorted ints -> sorted floats (one tie: +-0)


def test_grid_rejects_non_finite_and_bad_input() -> None:
    with pytest.raises(ValueError, match="2 coordinate"):
        float16_grid(torch.tensor([[1.0, 7e4, float("nan")]]))
    with pytest.raises(ValueError, match="shape"):
        float16_grid(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="float"):
        float16_grid(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="65535"):
        grid_to_float16(torch.full((1, 3), 70000))


def test_canonical_order_is_z_major_and_stable() -> None:
    xyz = torch.tensor([[1.0, 0.0, 2.0], [5.0, 5.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0], [-3.0, 9.0, 1.0]])
    assert canonical_order(xyz).tolist() == [2, 1, 4, 0, 3]  # z=1 by y (1, 5, 9), then z=2 tied: kept
    perm = canonical_order(_clustered(2000, 0))
    assert perm.dtype == torch.int64 and torch.equal(torch.sort(perm).values, torch.arange(2000))


# --- positions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positions_round_trip(seed: int) -> None:
    _round_trip(_clustered(3000, seed))
    _round_trip(torch.randn(500, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e3)


def test_positions_edge_cases() -> None:
    _round_trip(torch.tensor([[0.25, -7.5, 3.0]]))  # N = 1
    dup = torch.randn(50, 3).repeat(4, 1)  # every position 4 times
    _round_trip(dup)
    special = torch.tensor([[-0.0, 0.0, -0.0], [0.0, -0.0, 0.0], [6e-8, -6e-8, 1e-5], [65504.0, -65504.0, 0.0]])
    _round_trip(special)  # negative zero, subnormals, the fp16 extremes
    assert decode_positions(encode_positions(torch.zeros(0, 3)), 0).shape == (0, 3)


def test_positions_need_canonical_order() -> None:
    xyz = _clustered(100, 0)
    with pytest.raises(ValueError, match="canonical_order"):
        encode_positions(xyz[canonical_order(xyz).flip(0)])


def test_positions_clustered_cloud_under_6_bytes_per_point() -> None:
    n = 50_000
    xyz = _clustered(n, 0)
    blob = encode_positions(xyz[canonical_order(xyz)])
    per_point = len(blob) / n
    print(f"\npositions: {per_point:.3f} bytes/point ({len(blob)} bytes for {n} points; raw fp16 is 6)")
    assert per_point < 6.0


def test_positions_corrupted_or_truncated() -> None:
    xyz = _clustered(500, 0)
    blob = encode_positions(xyz[canonical_order(xyz)])
    with pytest.raises(ValueError):
        decode_positions(blob[: len(blob) // 2], 500)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    with pytest.raises(ValueError):
        decode_positions(bytes(flipped), 500)
    with pytest.raises(ValueError, match="wrong n"):
        decode_positions(blob, 499)
    with pytest.raises(ValueError, match="mode"):
        decode_positions(b"\x07" + blob[1:], 500)


# --- index streams --------------------------------------------------------------------------------------------


def _zipf(n: int, k: int, seed: int) -> Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.minimum(rng.zipf(1.4, n), k) - 1)


@pytest.mark.parametrize("k", [2, 64, 1024, 65536])
@pytest.mark.parametrize("shape", ["uniform", "skewed", "single"])
def test_symbols_round_trip(k: int, shape: str) -> None:
    n = 20_000
    if shape == "uniform":
        codes = torch.randint(0, k, (n,))
    elif shape == "skewed":
        codes = _zipf(n, k, k)
    else:
        codes = torch.full((n,), k - 1)
    data = encode_symbols(codes.to(torch.int32), k)
    out = decode_symbols(data, n, k)
    assert out.dtype == torch.int64 and torch.equal(out, codes.to(torch.int64))
    if shape == "single":
        assert len(data) < 16  # header only


def test_symbols_tiny_streams() -> None:
    for codes in (torch.zeros(0, dtype=torch.int64), torch.tensor([3]), torch.tensor([0, 1]), torch.tensor([5, 5])):
        assert torch.equal(decode_symbols(encode_symbols(codes, 8), codes.numel(), 8), codes)


@pytest.mark.parametrize("shape", ["zipf", "gaussian"])
def test_symbols_payload_near_entropy(shape: str) -> None:
    n, k = 100_000, 4096
    if shape == "zipf":
        codes = _zipf(n, k, 0)
    else:
        codes = (torch.randn(n) * 40 + k / 2).round().clamp(0, k - 1).to(torch.int64)
    data = encode_symbols(codes, k)
    ideal = entropy_bits(codes, k) / 8
    used = int(torch.unique(codes).numel())
    header_bound = 5 + 3 * 2 + used * (2 + 3)  # mode, crc, u + (gap, count) varints per used symbol
    print(f"\n{shape}: {len(data)} bytes vs entropy {ideal:.0f} bytes (+{100 * (len(data) / ideal - 1):.2f}% "
          f"incl. header, {used} used symbols)")
    assert len(data) <= ideal * 1.01 + header_bound
    assert torch.equal(decode_symbols(data, n, k), codes)
    if shape == "zipf":
        assert data[0] == 2  # a long-tailed histogram is stored lzma-packed


def test_entropy_bits() -> None:
    assert entropy_bits(torch.tensor([0, 1, 0, 1]), 2) == pytest.approx(4.0)
    assert entropy_bits(torch.full((10,), 3), 4) == 0.0


def test_symbols_large_stream_is_fast() -> None:
    import time

    codes = _zipf(1_000_000, 1024, 1)
    start = time.perf_counter()
    out = decode_symbols(encode_symbols(codes, 1024), 1_000_000, 1024)
    elapsed = time.perf_counter() - start
    assert torch.equal(out, codes)
    assert elapsed < 2.0, f"1e6 symbols took {elapsed:.2f} s"


def test_symbols_reject_bad_codes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        encode_symbols(torch.tensor([0, 8]), 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        encode_symbols(torch.tensor([-1, 2]), 8)
    with pytest.raises(ValueError, match="integer"):
        encode_symbols(torch.tensor([0.0, 1.0]), 8)
    with pytest.raises(ValueError, match="shape"):
        encode_symbols(torch.zeros(2, 2, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="k must"):
        encode_symbols(torch.tensor([0]), 65537)


def test_symbols_corrupted_or_truncated() -> None:
    codes = _zipf(5000, 256, 3)
    data = encode_symbols(codes, 256)
    for bad in (data[:-4], data[:3], data[: len(data) // 2]):
        with pytest.raises(ValueError):
            decode_symbols(bad, 5000, 256)
    for at in (6, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        with pytest.raises(ValueError, match="corrupted"):
            decode_symbols(bytes(flipped), 5000, 256)
    with pytest.raises(ValueError, match="expected n"):
        decode_symbols(data, 4999, 256)
    with pytest.raises(ValueError, match="mode"):
        decode_symbols(b"\x09" + data[1:], 5000, 256)


def test_symbols_without_constriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes ``import constriction`` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'polyquant\[gaussians\]'"):
        encode_symbols(torch.tensor([0, 1, 1]), 2)


def test_flat_histograms_fall_back_to_fixed_length_codes() -> None:
    # 4096 uniform codes of k = 1024: the histogram header would outweigh any entropy-coding gain, so the stream
    # holds the 10-bit codes themselves (mode 3): 1 + 4 + 4096 * 10 / 8 bytes, and still decodes exactly.
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1024, (4096,), generator=g)
    data = encode_symbols(codes, 1024)
    assert data[0] == 3 and len(data) == 5 + 4096 * 10 // 8
    assert torch.equal(decode_symbols(data, 4096, 1024), codes)
    body = data[5:-1]  # one byte short, with a valid checksum: the length check names it
    with pytest.raises(ValueError, match="bytes of 10-bit codes"):
        decode_symbols(data[:1] + struct.pack("<I", zlib.crc32(body)) + body, 4096, 1024)
