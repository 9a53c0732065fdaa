"""Lossless coding of a compressed Gaussian scene: fp16 positions and entropy-coded index streams.

OMG (Lee et al., "Optimized Minimal 3D Gaussian Splatting", arXiv:2503.16924; github.com/maincold2/OMG) stores
the Gaussian centres as fp16 and codes them losslessly with MPEG G-PCC, and the sub-vector-quantization indices
with an entropy coder. Here both are replaced by small, dependency-light coders:

- positions: each fp16 coordinate becomes an order-preserving 16-bit grid value; the Gaussians are sorted by the
  48-bit key ``x + y * 2^16 + z * 2^32`` (z major, like OMG's ``calculate_morton_order``), the sorted keys are
  delta-coded, split into byte planes and compressed with ``lzma``;
- index streams: a static categorical model (the stream's own histogram, stored in a compact header) drives a
  ``constriction`` range coder, so the payload is within a fraction of a percent of the empirical entropy.

Every ``encode_*`` returns ``bytes`` and every ``decode_*`` is its exact inverse given the element count::

    perm = canonical_order(xyz)                      # reorder *all* attributes of the scene with it
    blob = encode_positions(xyz[perm])               # (N, 3) float -> bytes
    xyz16 = decode_positions(blob, n)                # (N, 3) float16, bit-exact fp16 of xyz[perm]
    stream = encode_symbols(codes[perm], k=4096)     # (N,) ints in [0, k) -> bytes
    codes2 = decode_symbols(stream, n, k=4096)       # (N,) int64

Stream layouts (all integers little-endian, varints are unsigned LEB128):

=================  ==================================================================================
positions          ``mode`` (1 byte: 0 xz, 1 raw LZMA2) | crc32 of the planes (4) | lzma data of the 6
                   byte planes of the key deltas (first key absolute)
symbols            ``mode`` (1 byte: 0 dense, 1 sparse, 2 packed) | crc32 of the rest (4) | histogram |
                   uint32 words of the range coder; or ``mode`` 3 (fixed) | crc32 | the codes at ceil(log2 k)
                   bits each (``polyquant.pack.pack_bits``), when that is smaller (a flat histogram on few codes)
histogram, dense   k varint counts (zeros included)
histogram, sparse  varint u | u varint gaps between used symbols (first: the symbol) | u varint counts
histogram, packed  varint size | the dense histogram compressed with raw LZMA2, 1 MiB window (size bytes)
=================  ==================================================================================

A stream with one distinct symbol (or none) is its header alone.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from polyquant.pack import pack_bits, packed_numel, unpack_bits

__all__ = [
    "float16_grid",
    "grid_to_float16",
    "canonical_order",
    "encode_positions",
    "decode_positions",
    "encode_symbols",
    "decode_symbols",
    "entropy_bits",
]

GRID_BITS = 16  # one fp16 bit pattern per coordinate
KEY_BYTES = 6  # 3 coordinates x 16 bits
MAX_SYMBOLS = 65536

_LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_LZMA_RAW_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": _LZMA_PRESET}]
# a histogram is small: a 1 MiB window packs it as well and skips preset 9's ~30 ms, ~700 MiB encoder set-up
_LZMA_TABLE_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": _LZMA_PRESET, "dict_size": 1 << 20}]
_POS_XZ, _POS_RAW = 0, 1
_SYM_DENSE, _SYM_SPARSE, _SYM_PACKED, _SYM_FIXED = 0, 1, 2, 3
_CRC = struct.Struct("<I")
_MAX_VARINT_BYTES = 9  # 63 bits: every count and symbol fits


# ---------------------------------------------------------------------------------------------------------------
# positions


def float16_grid(xyz: Tensor) -> Tensor:
    """(N, 3) float -> (N, 3) int32 in [0, 65535]: the fp16 bit pattern of each coordinate, mapped so that the
    integer order equals the float order (negative: ``~bits & 0xFFFF``, non-negative: ``bits | 0x8000``).

    -0.0 and +0.0 land on the adjacent 0x7FFF and 0x8000. Raises ValueError when a value is inf or NaN in fp16
    (a float32 beyond +-65504 overflows)."""
    if xyz.dim() != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {tuple(xyz.shape)}")
    if not xyz.is_floating_point():
        raise ValueError(f"xyz must be a float tensor, got {xyz.dtype}")
    half = xyz.detach().cpu().to(torch.float16)
    bad = int((~torch.isfinite(half)).sum())
    if bad:
        raise ValueError(f"{bad} coordinate(s) are inf or NaN in float16 (|x| > 65504 overflows); "
                         "rescale the scene or drop those Gaussians first")
    bits = half.view(torch.int16).to(torch.int32) & 0xFFFF  # (N, 3) in [0, 65535]
    negative = bits >= 0x8000
    return torch.where(negative, ~bits & 0xFFFF, bits | 0x8000)


def grid_to_float16(grid: Tensor) -> Tensor:
    """Bit-exact inverse of :func:`float16_grid`: (N, 3) ints in [0, 65535] -> (N, 3) float16."""
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid must have shape (N, 3), got {tuple(grid.shape)}")
    if grid.is_floating_point() or grid.dtype == torch.bool:
        raise ValueError(f"grid must be an integer tensor, got {grid.dtype}")
    g = grid.detach().cpu().to(torch.int32)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) > 0xFFFF):
        raise ValueError(f"grid values must be in [0, 65535], got [{int(g.min())}, {int(g.max())}]")
    bits = torch.where(g >= 0x8000, g & 0x7FFF, ~g & 0xFFFF)  # (N, 3) in [0, 65535]
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # two's complement int16 range
    return bits.to(torch.int16).view(torch.float16)


def _keys(grid: Tensor) -> Tensor:
    """(N, 3) grid -> (N,) int64 keys ``x + y * 2^16 + z * 2^32`` (48 bits, z major)."""
    g = grid.to(torch.int64)
    return g[:, 0] | (g[:, 1] << GRID_BITS) | (g[:, 2] << (2 * GRID_BITS))


def canonical_order(xyz: Tensor) -> Tensor:
    """The permutation (int64, N) that sorts the Gaussians by their fp16 grid key, z major then y then x; stable,
    so Gaussians at the same fp16 position keep their input order. Apply it to every attribute of the scene."""
    keys = _keys(float16_grid(xyz))
    return torch.sort(keys, stable=True).indices


def encode_positions(xyz: Tensor) -> bytes:
    """(N, 3) float positions, already in :func:`canonical_order` -> bytes (lossless at fp16).

    The sorted 48-bit keys are delta-coded, written as 6 byte planes (all lowest bytes first) and compressed with
    ``lzma``, keeping the smaller of the xz container and a raw LZMA2 stream."""
    keys = _keys(float16_grid(xyz)).numpy()  # (N,) int64
    deltas = np.diff(keys, prepend=np.int64(0))  # first key absolute
    if deltas.size > 1 and int(deltas[1:].min()) < 0:
        first = int(np.flatnonzero(deltas[1:] < 0)[0]) + 1
        raise ValueError(f"xyz is not in canonical order (row {first} sorts before row {first - 1}); "
                         "reorder the scene with canonical_order(xyz) first")
    planes = deltas.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :KEY_BYTES].T.tobytes()  # (6, N) row-major
    crc = _CRC.pack(zlib.crc32(planes))
    xz = lzma.compress(planes, format=lzma.FORMAT_XZ, preset=_LZMA_PRESET)
    raw = lzma.compress(planes, format=lzma.FORMAT_RAW, filters=_LZMA_RAW_FILTERS)
    if len(raw) <= len(xz):
        return bytes([_POS_RAW]) + crc + raw
    return bytes([_POS_XZ]) + crc + xz


def decode_positions(data: bytes, n: int) -> Tensor:
    """Exact inverse of :func:`encode_positions`: bytes -> (n, 3) float16 in canonical order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(data) < 1 + _CRC.size:
        raise ValueError(f"position stream too short ({len(data)} bytes): truncated?")
    mode, (crc,), body = data[0], _CRC.unpack_from(data, 1), data[1 + _CRC.size:]
    try:
        if mode == _POS_RAW:
            planes = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_LZMA_RAW_FILTERS)
        elif mode == _POS_XZ:
            planes = lzma.decompress(body, format=lzma.FORMAT_XZ)
        else:
            raise ValueError(f"unknown position stream mode {mode} (expected 0 xz or 1 raw): not a position stream?")
    except lzma.LZMAError as err:
        raise ValueError(f"corrupted position stream: {err}") from err
    if len(planes) != KEY_BYTES * n:
        raise ValueError(f"position stream holds {len(planes)} bytes, expected {KEY_BYTES} x n = {KEY_BYTES * n}: "
                         "wrong n or a truncated stream")
    if zlib.crc32(planes) != crc:
        raise ValueError("corrupted position stream: checksum mismatch")
    le = np.zeros((n, 8), dtype=np.uint8)
    le[:, :KEY_BYTES] = np.frombuffer(planes, dtype=np.uint8).reshape(KEY_BYTES, n).T
    keys = np.cumsum(le.view("<u8").reshape(n), dtype=np.uint64)  # (N,)
    if n and int(keys[-1]) >= 1 << (3 * GRID_BITS):
        raise ValueError("corrupted position stream: keys overflow 48 bits")
    k = torch.from_numpy(keys.astype(np.int64))
    mask = (1 << GRID_BITS) - 1
    grid = torch.stack([k & mask, (k >> GRID_BITS) & mask, k >> (2 * GRID_BITS)], dim=1)  # (N, 3)
    return grid_to_float16(grid)


# ---------------------------------------------------------------------------------------------------------------
# index streams


def _constriction() -> ModuleType:
    """Import ``constriction`` (an optional dependency of this plugin) or say how to install it."""
    try:
        import constriction
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError("the gaussians plugin needs constriction: pip install 'polyquant[gaussians]'") from err
    return constriction


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SYMBOLS:
        raise ValueError(f"k must be an int in [1, {MAX_SYMBOLS}], got {k!r}")


def _codes_numpy(codes: Tensor, k: int) -> np.ndarray:
    """Validate (N,) integer codes in [0, k) and return them as a numpy int64 array."""
    _check_k(k)
    if codes.dim() != 1:
        raise ValueError(f"codes must have shape (N,), got {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.detach().cpu().to(torch.int64).numpy()
    if c.size and (int(c.min()) < 0 or int(c.max()) >= k):
        raise ValueError(f"codes must be in [0, {k}), got [{int(c.min())}, {int(c.max())}]")
    return c


def entropy_bits(codes: Tensor, k: int) -> float:
    """The empirical entropy of the stream, N * H(histogram) in bits: the ideal payload size."""
    counts = np.bincount(_codes_numpy(codes, k), minlength=k)
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def _varints(values: np.ndarray) -> bytes:
    """Non-negative integers -> unsigned LEB128 (7 bits a byte, high bit = more), vectorized."""
    v = values.astype(np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * j))
    cols = np.arange(int(nbytes.max()))  # (B,)
    body = (v[:, None] >> (np.uint64(7) * cols.astype(np.uint64))) & np.uint64(0x7F)  # (M, B)
    more = cols[None, :] < (nbytes[:, None] - 1)  # (M, B)
    out = (body | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    return out[cols[None, :] < nbytes[:, None]].tobytes()


def _read_varints(buf: np.ndarray, offset: int, count: int) -> tuple[np.ndarray, int]:
    """Read ``count`` varints from ``buf`` (uint8) at ``offset`` -> (uint64 values, offset after them)."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), offset
    tail = buf[offset:offset + count * _MAX_VARINT_BYTES]
    ends = np.flatnonzero(tail < 0x80)[:count]
    if ends.size < count:
        raise ValueError(f"corrupted symbol stream: header truncated ({ends.size} of {count} varints)")
    starts = np.concatenate([[0], ends[:-1] + 1])
    if int((ends - starts).max()) >= _MAX_VARINT_BYTES:
        raise ValueError("corrupted symbol stream: varint too long in the header")
    used = tail[:ends[-1] + 1].astype(np.uint64)
    pos = np.arange(used.size) - np.repeat(starts, ends - starts + 1)  # byte index inside its varint
    parts = (used & np.uint64(0x7F)) << (np.uint64(7) * pos.astype(np.uint64))
    return np.bitwise_or.reduceat(parts, starts), offset + int(ends[-1]) + 1


def encode_symbols(codes: Tensor, k: int) -> bytes:
    """(N,) integer codes in [0, k), k <= 65536 -> a self-contained bytes stream (see the module docstring).

    A static categorical model from the stream's own histogram drives a ``constriction`` range coder; the
    histogram is stored as varints: dense over k, sparse over the used symbols, or dense and lzma-packed,
    whichever is smallest."""
    c = _codes_numpy(codes, k)
    counts = np.bincount(c, minlength=k)  # (k,)
    used = np.flatnonzero(counts)  # (u,)
    dense = _varints(counts)
    packed = lzma.compress(dense, format=lzma.FORMAT_RAW, filters=_LZMA_TABLE_FILTERS)
    tables = {
        _SYM_DENSE: dense,
        _SYM_SPARSE: _varints(np.array([used.size])) + _varints(np.diff(used, prepend=0)) + _varints(counts[used]),
        _SYM_PACKED: _varints(np.array([len(packed)])) + packed,
    }
    mode = min(tables, key=lambda m: len(tables[m]))  # ties: the first (simplest) mode
    table = tables[mode]
    words = b""
    if used.size > 1:
        stream = _constriction().stream
        remap = np.zeros(k, dtype=np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        model = stream.model.Categorical(_probabilities(counts[used]), perfect=False)
        encoder = stream.queue.RangeEncoder()
        encoder.encode(remap[c], model)
        words = encoder.get_compressed().astype("<u4").tobytes()
    rest = table + words
    bits = fixed_bits(k)
    if c.size and packed_numel(c.size, bits) < len(rest):  # a flat histogram: the fixed-length codes are smaller
        mode, rest = _SYM_FIXED, pack_bits(torch.from_numpy(c.astype(np.int64)), bits).numpy().tobytes()
    return bytes([mode]) + _CRC.pack(zlib.crc32(rest)) + rest


def fixed_bits(k: int) -> int:
    """Bits of a fixed-length code of k symbols: ceil(log2 k), at least 1."""
    return max(1, (k - 1).bit_length())


def _probabilities(counts: np.ndarray) -> np.ndarray:
    """The model both sides build from the stored counts (float64 counts / total: deterministic)."""
    c = counts.astype(np.float64)
    return c / c.sum()


def _unpack_table(packed: bytes, k: int) -> np.ndarray:
    """Decompress an lzma-packed dense histogram (at most k varints), refusing anything longer."""
    limit = k * _MAX_VARINT_BYTES
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_TABLE_FILTERS)
    try:
        table = decompressor.decompress(packed, max_length=limit)
    except lzma.LZMAError as err:
        raise ValueError(f"corrupted symbol stream: packed histogram: {err}") from err
    if not decompressor.eof:
        raise ValueError("corrupted symbol stream: packed histogram truncated or too long")
    return np.frombuffer(table, dtype=np.uint8)


def decode_symbols(data: bytes, n: int, k: int) -> Tensor:
    """Exact inverse of :func:`encode_symbols`: bytes -> (n,) int64 codes in [0, k)."""
    _check_k(k)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(data) < 1 + _CRC.size:
        raise ValueError(f"symbol stream too short ({len(data)} bytes): truncated?")
    mode, (crc,) = data[0], _CRC.unpack_from(data, 1)
    if zlib.crc32(data[1 + _CRC.size:]) != crc:
        raise ValueError("corrupted symbol stream: checksum mismatch (truncated or altered)")
    buf = np.frombuffer(data, dtype=np.uint8)
    offset = 1 + _CRC.size
    if mode == _SYM_FIXED:
        bits = fixed_bits(k)
        body = data[offset:]
        if len(body) != packed_numel(n, bits):
            raise ValueError(f"corrupted symbol stream: {len(body)} bytes of {bits}-bit codes, expected "
                             f"{packed_numel(n, bits)} for n = {n}")
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        codes = unpack_bits(torch.frombuffer(bytearray(body), dtype=torch.uint8), bits, n).to(torch.int64)
        if n and int(codes.max()) >= k:
            raise ValueError(f"corrupted symbol stream: a code >= k = {k}")
        return codes
    if mode in (_SYM_DENSE, _SYM_PACKED):
        if mode == _SYM_PACKED:
            (size,), offset = _read_varints(buf, offset, 1)
            end = offset + int(size)
            table, offset = _unpack_table(data[offset:end], k), end
            counts, used_bytes = _read_varints(table, 0, k)
            if used_bytes != table.size:
                raise ValueError("corrupted symbol stream: trailing bytes in the packed histogram")
        else:
            counts, offset = _read_varints(buf, offset, k)
        used = np.flatnonzero(counts)
        counts = counts[used]
    elif mode == _SYM_SPARSE:
        (u,), offset = _read_varints(buf, offset, 1)
        if int(u) > k:
            raise ValueError(f"corrupted symbol stream: {int(u)} used symbols for k = {k}")
        gaps, offset = _read_varints(buf, offset, int(u))
        counts, offset = _read_varints(buf, offset, int(u))
        used = np.cumsum(gaps, dtype=np.uint64).astype(np.int64)
        if u and (int(used[-1]) >= k or (u > 1 and int(gaps[1:].min()) == 0) or int(counts.min()) == 0):
            raise ValueError("corrupted symbol stream: invalid sparse histogram")
    else:
        raise ValueError(f"unknown symbol stream mode {mode} (expected 0 dense, 1 sparse, 2 packed or 3 fixed): "
                         "not a symbol stream?")
    total = int(counts.sum(dtype=np.uint64)) if counts.size else 0
    if total != n:
        raise ValueError(f"symbol stream holds {total} symbols, expected n = {n}")
    payload = data[offset:]
    if used.size <= 1:
        if payload:
            raise ValueError(f"corrupted symbol stream: {len(payload)} payload bytes after a one-symbol header")
        return torch.full((n,), int(used[0]) if used.size else 0, dtype=torch.int64)
    if len(payload) % 4:
        raise ValueError(f"corrupted symbol stream: payload of {len(payload)} bytes is not whole uint32 words")
    stream = _constriction().stream
    model = stream.model.Categorical(_probabilities(counts), perfect=False)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        index = stream.queue.RangeDecoder(words).decode(model, n)
    except (AssertionError, ValueError, RuntimeError) as err:  # constriction reports invalid data like this
        raise ValueError(f"corrupted symbol stream: {err}") from err
    return torch.from_numpy(used[index.astype(np.int64)].astype(np.int64))
