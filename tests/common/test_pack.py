"""pack_bits / unpack_bits: hand-computed layouts, validation, and exact round trips for every width."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyquant.pack import (
    pack_bits,
    pack_rows,
    pack_signed,
    packed_numel,
    pad_rows,
    row_length,
    unpack_bits,
    unpack_rows,
    unpack_signed,
)


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (4, [1, 2, 3], [0x21, 0x03]),
        (3, [7, 1], [0x0F]),  # 0b00_001_111
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0x0D, 0x01]),
        (2, [0, 1, 2, 3], [0xE4]),  # 0b11_10_01_00
        (2, [3, 3, 3, 3, 1], [0xFF, 0x01]),
        (5, [31, 1, 2], [0x3F, 0x08]),  # 31 | 1 << 5 | 2 << 10 = 0x083F
        (6, [1, 2, 3, 4], [0x81, 0x30, 0x10]),  # 1 | 2 << 6 | 3 << 12 | 4 << 18 = 0x103081
        (7, [127, 1], [0xFF, 0x00]),  # 127 | 1 << 7 = 0x00FF, 14 bits -> 2 bytes
        (7, [0, 0, 0, 0, 0, 0, 0, 127], [0, 0, 0, 0, 0, 0, 0xFE]),  # last code in stream bits 49..55
        (8, [0, 255, 17], [0x00, 0xFF, 0x11]),
    ],
)
def test_hand_computed(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack_bits(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


def test_signed_hand_computed() -> None:
    packed = pack_signed(torch.tensor([-8, 7, 0], dtype=torch.int8), 4)
    assert packed.tolist() == [0xF0, 0x08]  # offset binary: [0, 15, 8]
    out = unpack_signed(packed, 4, 3)
    assert out.dtype == torch.int8 and out.tolist() == [-8, 7, 0]
    assert unpack_signed(pack_signed(torch.tensor([-1, 0]), 1), 1, 2).tolist() == [-1, 0]


def test_packed_size_and_shape() -> None:
    codes = torch.randint(0, 8, (3, 5, 7))
    packed = pack_bits(codes, 3)
    assert packed.shape == (packed_numel(105, 3),) == ((105 * 3 + 7) // 8,)
    assert torch.equal(unpack_bits(packed, 3, 105).reshape(3, 5, 7), codes.to(torch.uint8))


def test_large_tensor_crosses_chunks() -> None:
    codes = torch.randint(0, 32, (8 * (1 << 20) + 13,), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 5), 5, codes.numel()), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_empty(bits: int) -> None:
    packed = pack_bits(torch.empty(0, dtype=torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 0
    assert unpack_bits(packed, bits, 0).numel() == 0
    assert pack_signed(torch.empty(0, dtype=torch.int8), bits).numel() == 0


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_invalid_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), bits, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        pack_signed(torch.zeros(3, dtype=torch.int8), 9)


def test_wide_codes_hand_computed_and_round_trip() -> None:
    # 10 bits (a 1024-entry codebook): 1023 fills bits 0..9, 1 sets bit 10 -> bytes 0xFF, 0x07, 0x00
    assert pack_bits(torch.tensor([1023, 1]), 10).tolist() == [0xFF, 0x07, 0x00]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    g = torch.Generator().manual_seed(0)
    for bits in range(9, 17):
        codes = torch.randint(0, 1 << bits, (1001,), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.numel() == packed_numel(1001, bits)
        out = unpack_bits(packed, bits, 1001)
        assert out.dtype == torch.int32 and torch.equal(out.long(), codes)
        rows = codes[:1000].reshape(8, 125)
        assert torch.equal(unpack_rows(pack_rows(rows, bits), bits, 125).long(), rows)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_bits(torch.tensor([1024]), 10)


def test_wide_path_is_the_same_layout() -> None:
    """The bit-plane path of 9..16 bits, run on 1..8-bit codes, writes the bytes of the word path."""
    from polyquant.pack import _pack_wide

    g = torch.Generator().manual_seed(1)
    for bits in range(1, 9):
        codes = torch.randint(0, 1 << bits, (8 * 300 + 5,), generator=g)
        assert torch.equal(_pack_wide(codes, bits), pack_bits(codes, bits)), bits


def test_wide_codes_cross_chunks() -> None:
    codes = torch.randint(0, 1024, ((1 << 18) + 77,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(unpack_bits(pack_bits(codes, 10), 10, codes.numel()).long(), codes)


@pytest.mark.parametrize(("bits", "bad"), [(1, 2), (3, 8), (4, 16), (7, 128), (4, -1)])
def test_codes_out_of_range(bits: int, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, {(1 << bits) - 1}\]"):
        pack_bits(torch.tensor([0, bad, 1]), bits)


def test_signed_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_signed(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_signed(torch.tensor([-9]), 4)


def test_rejects_float_codes_and_wrong_packed() -> None:
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.tensor([1], dtype=torch.int32), 4, 2)
    with pytest.raises(ValueError, match="need exactly 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 3)


def test_bool_and_wide_int_inputs() -> None:
    mask = torch.tensor([True, False, True])
    assert unpack_bits(pack_bits(mask, 1), 1, 3).tolist() == [1, 0, 1]
    codes = torch.tensor([5, 0, 3], dtype=torch.int64)
    assert unpack_bits(pack_bits(codes, 3), 3, 3).tolist() == [5, 0, 3]


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_roundtrip_property(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=200))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.numel() == (len(codes) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, len(codes)), t)
    # Matches a slow bit-by-bit reference.
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    assert packed.tolist() == list(stream.to_bytes(packed.numel(), "little"))


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_signed_roundtrip_property(bits: int, data: st.DataObject) -> None:
    half = 1 << (bits - 1)
    codes = data.draw(st.lists(st.integers(-half, half - 1), min_size=0, max_size=100))
    t = torch.tensor(codes, dtype=torch.int64)
    assert unpack_signed(pack_signed(t, bits), bits, len(codes)).tolist() == codes


# ------------------------------------------------------------------------------------------------ row layout


def test_row_length() -> None:
    assert [row_length(5, b) for b in range(1, 9)] == [8, 8, 8, 6, 8, 8, 8, 5]
    assert [row_length(k, 4) for k in (0, 1, 2, 3)] == [0, 2, 2, 4]
    assert row_length(5, 10) == 8 and row_length(5, 16) == 5  # 4 codes of 10 bits fill 5 bytes
    with pytest.raises(ValueError, match="bits"):
        row_length(4, 17)


def test_rows_hand_computed() -> None:
    packed = pack_rows(torch.tensor([[1, 2, 3], [4, 5, 6]]), 4)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x03], [0x54, 0x06]]  # low nibble first
    assert unpack_rows(packed, 4, 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    # 3 bits: a row of 3 codes is padded to 8 codes (3 bytes) so the next row starts on a byte
    assert pack_rows(torch.tensor([[7, 1, 0], [1, 0, 0]]), 3).tolist() == [[0x0F, 0, 0], [0x01, 0, 0]]
    assert pad_rows(torch.tensor([[1, 2, 3]]), 4).tolist() == [[1, 2, 3, 0]]


def test_rows_are_the_flat_stream_of_padded_rows() -> None:
    codes = torch.randint(0, 16, (3, 5, 9), dtype=torch.uint8)
    packed = pack_rows(codes, 4)
    assert packed.shape == (3, 5, 5)
    assert torch.equal(packed.flatten(), pack_bits(pad_rows(codes, 4), 4))
    even = codes[..., :8]
    assert torch.equal(pack_rows(even, 4).flatten(), pack_bits(even, 4))  # whole-byte rows: no padding
    assert torch.equal(unpack_rows(packed, 4, 9), codes)


def test_rows_errors_and_empty() -> None:
    with pytest.raises(ValueError, match="3 bytes"):
        unpack_rows(torch.zeros(2, 2, dtype=torch.uint8), 4, 5)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_rows(torch.tensor(3), 4)
    assert pack_rows(torch.zeros(0, 7, dtype=torch.uint8), 4).shape == (0, 4)
    assert unpack_rows(torch.zeros(2, 0, dtype=torch.uint8), 4, 0).shape == (2, 0)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 4), k=st.integers(0, 20), data=st.data())
def test_rows_roundtrip_property(bits: int, rows: int, k: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=rows * k, max_size=rows * k))
    codes = torch.tensor(values, dtype=torch.uint8).reshape(rows, k)
    packed = pack_rows(codes, bits)
    assert packed.shape == (rows, row_length(k, bits) * bits // 8)
    assert torch.equal(unpack_rows(packed, bits, k), codes)
    for r in range(rows):  # each row is its own dense stream, starting at a byte boundary
        assert packed[r].tolist() == pack_bits(pad_rows(codes[r], bits), bits).tolist()
