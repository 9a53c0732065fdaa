"""Dense bit packing of 1..16-bit integer codes into bytes, exact round trip (9..16 bits: e.g. the 10-bit codes of
a 1024-entry codebook; unpacked as int32, 1..8 bits as uint8).

Layout: the codes are read in flattened (row-major) order and written to one little-endian bit stream. Code ``i``
occupies stream bits ``[i * bits, (i + 1) * bits)``, its least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. So the first code sits in the low bits of byte 0, and with ``bits`` in {3, 5, 6, 7}
codes straddle byte boundaries. ``n`` codes take exactly ``ceil(n * bits / 8)`` bytes; unused high bits of the last
byte are zero.

    bits=4, codes [1, 2, 3]  ->  bytes [0x21, 0x03]
    bits=3, codes [7, 1]     ->  bytes [0x0F]          (0b00_001_111)
    bits=10, codes [1023, 1] ->  bytes [0xFF, 0x07, 0x00]   (0b0000_0000_0001 | 11_1111_1111)

The shape is not stored: pass ``numel`` to ``unpack_bits`` and reshape the result yourself.
Signed codes are stored in offset binary (``code + 2 ** (bits - 1)``), see ``pack_signed``.

Row layout (``pack_rows``), the one layout of packed weights: artifacts (``polyquant.export``) and the packed-weight
kernels (``polyquant.kernels.w4_gemm``) read the same bytes. Codes (..., K), e.g. a weight (N, K) in ``nn.Linear``
layout (a conv weight (O, I, kh, kw) as (O, I * kh * kw)), are packed row by row in row-major order:

  - every row is padded at its end with zero codes to ``K' = row_length(K, bits)``, the smallest multiple of
    ``8 / gcd(bits, 8)`` that is >= K, so that each row fills whole bytes (K' = K rounded up to even for 4 bits);
  - the padded rows are one stream as above: row n takes bytes ``[n * K' * bits / 8, (n + 1) * K' * bits / 8)``,
    and the result has shape (..., K' * bits / 8).

For 4 bits, byte j of a row holds code 2j in its low nibble and code 2j + 1 in its high nibble:

    bits=4, codes [[1, 2, 3], [4, 5, 6]]  ->  bytes [[0x21, 0x03], [0x54, 0x06]]

Codes are the unsigned codes of the formats' ``encode`` (``polyquant.formats``): offset binary ``q - qmin`` for
integer formats (int4: q + 8), the bit pattern sign | exponent | mantissa for floating-point formats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "packed_numel",
    "pack_bits",
    "unpack_bits",
    "pack_signed",
    "unpack_signed",
    "row_length",
    "pad_rows",
    "pack_rows",
    "unpack_rows",
]

# Eight codes of at most 7 bits make at most 56 bits: one int64 word per group, no overflow into the sign bit.
_GROUP = 8
# Groups handled per step, to bound the int64 temporaries (8 bytes per code) for very large tensors.
_CHUNK_GROUPS = 1 << 20


# Codes of 9..16 bits (a 1024-entry codebook's 10-bit codes) go through bit planes, this many codes per step (a
# multiple of 8, so every step ends on a byte boundary).
_WIDE_CHUNK = 1 << 18


def _check_bits(bits: int, most: int = 16) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= most:
        raise ValueError(f"bits must be an integer in 1..{most}, got {bits!r}")


def _pack_wide(flat: Tensor, bits: int) -> Tensor:
    """``pack_bits`` for any bits (used for 9..16): each code's bits, least significant first, are the stream."""
    n = flat.numel()
    out = torch.zeros(packed_numel(n, bits), dtype=torch.uint8, device=flat.device)
    code_bit = torch.arange(bits, device=flat.device)
    byte_bit = torch.arange(8, device=flat.device)
    for start in range(0, n, _WIDE_CHUNK):
        c = flat[start : start + _WIDE_CHUNK].to(torch.int64)
        stream = ((c[:, None] >> code_bit) & 1).reshape(-1)  # (codes * bits,) bits, LSB first
        stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).view(-1, 8)
        first = start * bits // 8  # whole bytes: start is a multiple of 8 codes
        out[first : first + stream.shape[0]] = (stream << byte_bit).sum(dim=1).to(torch.uint8)
    return out


def _unpack_wide(flat: Tensor, bits: int, numel: int) -> Tensor:
    """``unpack_bits`` for any bits: int32 codes."""
    out = torch.empty(numel, dtype=torch.int32, device=flat.device)
    code_bit = torch.arange(bits, device=flat.device)
    byte_bit = torch.arange(8, device=flat.device)
    for start in range(0, numel, _WIDE_CHUNK):
        count = min(_WIDE_CHUNK, numel - start)
        first, last = start * bits // 8, -(-(start + count) * bits // 8)
        stream = ((flat[first:last].to(torch.int64)[:, None] >> byte_bit) & 1).reshape(-1)[: count * bits]
        out[start : start + count] = (stream.view(count, bits) << code_bit).sum(dim=1).to(torch.int32)
    return out


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits take: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes in ``[0, 2**bits)`` densely into a 1-D uint8 tensor (see the module docstring).

    Args:
        codes: integer (or bool) tensor of any shape; it is read in flattened order.
        bits: bits per code, 1..16.

    Returns:
        uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes, on the device of ``codes``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):
        flat = flat.to(torch.int64)  # min/max are not implemented for these; huge uint64 wrap negative and fail below
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, got values in [{lo}, {hi}]")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    if bits > 8:
        return _pack_wide(flat, bits)

    num_groups = math.ceil(n / _GROUP)
    padded = torch.zeros(num_groups * _GROUP, dtype=torch.int64, device=codes.device)
    padded[:n] = flat
    groups = padded.view(num_groups, _GROUP)  # (G, 8) codes
    code_shift = torch.arange(_GROUP, device=codes.device) * bits  # (8,)
    byte_shift = torch.arange(bits, device=codes.device) * 8  # (bits,)
    out = torch.empty(num_groups, bits, dtype=torch.uint8, device=codes.device)  # 8 codes -> `bits` bytes
    for start in range(0, num_groups, _CHUNK_GROUPS):
        g = groups[start : start + _CHUNK_GROUPS]
        words = (g << code_shift).sum(dim=1)  # (g,) disjoint bit fields, so the sum is a bitwise OR
        out[start : start + _CHUNK_GROUPS] = ((words[:, None] >> byte_shift) & 0xFF).to(torch.uint8)
    return out.view(-1)[: packed_numel(n, bits)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes of ``packed`` as a 1-D uint8 tensor (int32 for 9..16 bits).

    ``packed`` must hold exactly ``ceil(numel * bits / 8)`` bytes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    expected = packed_numel(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() != expected:
        raise ValueError(
            f"packed has {flat.numel()} bytes, but {numel} codes of {bits} bits need exactly {expected} bytes"
        )
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8 if bits <= 8 else torch.int32, device=packed.device)
    if bits == 8:
        return flat.clone()
    if bits > 8:
        return _unpack_wide(flat, bits, numel)

    num_groups = math.ceil(numel / _GROUP)
    padded = torch.zeros(num_groups * bits, dtype=torch.int64, device=packed.device)
    padded[:expected] = flat
    groups = padded.view(num_groups, bits)  # (G, bits) bytes
    code_shift = torch.arange(_GROUP, device=packed.device) * bits  # (8,)
    byte_shift = torch.arange(bits, device=packed.device) * 8  # (bits,)
    mask = (1 << bits) - 1
    out = torch.empty(num_groups, _GROUP, dtype=torch.uint8, device=packed.device)
    for start in range(0, num_groups, _CHUNK_GROUPS):
        g = groups[start : start + _CHUNK_GROUPS]
        words = (g << byte_shift).sum(dim=1)  # (g,)
        out[start : start + _CHUNK_GROUPS] = ((words[:, None] >> code_shift) & mask).to(torch.uint8)
    return out.view(-1)[:numel]


def pack_signed(codes: Tensor, bits: int) -> Tensor:
    """Pack signed codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` (the range of a two's-complement ``bits``-bit int).

    Each code is stored in offset binary, ``code + 2**(bits-1)`` (two's complement with the top bit flipped), then
    packed with ``pack_bits``. 1..8 bits.
    """
    _check_bits(bits, most=8)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a signed integer tensor, got dtype {codes.dtype}")
    offset = 1 << (bits - 1)
    flat = codes.reshape(-1)
    if flat.numel() > 0:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -offset or hi > offset - 1:
            raise ValueError(
                f"signed codes must lie in [{-offset}, {offset - 1}] for bits={bits}, got values in [{lo}, {hi}]"
            )
    return pack_bits(flat.to(torch.int16) + offset, bits)


def unpack_signed(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of ``pack_signed``: the first ``numel`` signed codes as a 1-D int8 tensor."""
    _check_bits(bits, most=8)
    offset = 1 << (bits - 1)
    return (unpack_bits(packed, bits, numel).to(torch.int16) - offset).to(torch.int8)


def row_length(k: int, bits: int) -> int:
    """Codes per row in the row layout: ``k`` rounded up to a multiple of ``8 / gcd(bits, 8)`` (whole bytes)."""
    _check_bits(bits)
    if k < 0:
        raise ValueError(f"row length must be >= 0, got {k}")
    step = 8 // math.gcd(bits, 8)
    return -(-k // step) * step


def pad_rows(codes: Tensor, bits: int) -> Tensor:
    """Pad the last dim of ``codes`` (..., K) with zero codes to ``row_length(K, bits)``.

    ``pack_bits(pad_rows(codes, bits), bits)`` is the row layout, flattened (see the module docstring).
    """
    if codes.dim() == 0:
        raise ValueError("the row layout needs codes with at least one dimension (..., K)")
    k = codes.shape[-1]
    return torch.nn.functional.pad(codes, (0, row_length(k, bits) - k))


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (..., K) in the row layout: (..., row_length(K, bits) * bits / 8) uint8."""
    padded = pad_rows(codes, bits)  # (..., K')
    return pack_bits(padded, bits).reshape(*codes.shape[:-1], padded.shape[-1] * bits // 8)


def unpack_rows(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of ``pack_rows``: (..., row_length(k, bits) * bits / 8) uint8 -> (..., k) uint8 codes (int32 for
    9..16 bits)."""
    length = row_length(k, bits)
    if packed.dim() == 0 or packed.shape[-1] != length * bits // 8:
        raise ValueError(
            f"packed rows must have {length * bits // 8} bytes for {k} codes of {bits} bits, "
            f"got shape {tuple(packed.shape)}"
        )
    rows = packed.shape[:-1]
    codes = unpack_bits(packed, bits, math.prod(rows) * length)
    return codes.reshape(*rows, length)[..., :k]
