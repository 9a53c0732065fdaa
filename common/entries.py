"""Typed weight entries: every quantized weight of an artifact is one entry of a small closed set of kinds.

Core export helpers write them (``polyquant.export``), ``polyquant.packed.pack_model`` turns each into one
packed module, and ``polyquant.nn`` holds each kind's fake-quant twin, so a plugin never writes its own decode:

| kind     | entry                | tensors (``<fqn>.`` + ...)                          | fake-quant (nn)     | packed          |
|----------|----------------------|-----------------------------------------------------|---------------------|-----------------|
| int      | WeightEntry          | weight_packed, weight_scale, weight_zero_point,     | Quantizer, IntFormat| PackedLinear /  |
|          |                      | weight_shape                                        |                     | W8A8Linear /    |
|          |                      |                                                     |                     | PackedConv      |
| float    | WeightEntry          | weight_packed, weight_scale, weight_shape           | FloatFormat         | PackedLinear    |
| table    | WeightEntry          | weight_packed, weight_scale, weight_table,          | TableFormat, log    | PackedLinear    |
|          |                      | weight_shape                                        | formats             | (table decode)  |
| vq       | VQEntry              | weight_codes, weight_codebooks, weight_shape        | VQWeightQuantizer   | VQLinear        |
| rotated  | RotatedEntry         | the inner entry's                                   | RotatedLinear       | HadamardLinear  |

The manifest records each entry's JSON (``entry_to_dict``: kind, format, bits, block, ...) under
``config["entries"][<fqn>]``, so an artifact describes its own weights: ``read_entry`` rebuilds the entry from the
tensors and that JSON and checks every tensor against it (dtype, shape, finiteness, code range) before use, raising
``ArtifactError`` naming the tensor.

Values: int / float / table code c in block b stands for ``(fmt.decode(c) - zero_point[b]) * scale[b]`` (no zero
point for float and table formats); blocks are ``block`` of the weight's shape (``polyquant.primitives``). Codes
are in ``polyquant.pack``'s row layout over the weight flattened to (N, K): one zero-padded row of bytes per output
channel (the layout the GEMM kernels read). VQ: ``polyquant.nn.VQSpec``'s layout, codes (G, M, R) stored as rows of
R codes at ceil(log2 C) bits (int32 above 16 bits; older artifacts hold int32 codes above 8 bits, still read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from .artifact import ArtifactError
from .formats import FloatFormat, Format, IntFormat, TableFormat, format_from_dict, format_to_dict, get_format
from .pack import pack_rows, row_length, unpack_rows
from .nn import ROTATIONS, vq_decode_weight
from .primitives import dequantize, scale_shape
from .transforms import is_hadamard_size

__all__ = [
    "WeightEntry",
    "VQEntry",
    "RotatedEntry",
    "Entry",
    "ENTRY_KINDS",
    "entry_tensors",
    "entry_to_dict",
    "read_entry",
    "read_entries",
    "read_weight",
]

ENTRY_KINDS = ("int", "float", "table", "vq", "rotated")
_MAX_NUMEL = 1 << 40  # a weight of more elements than this is refused before anything is allocated


def _check_shape(shape: tuple[int, ...]) -> None:
    if not 2 <= len(shape) <= 8 or min(shape) < 1 or math.prod(shape) > _MAX_NUMEL:
        raise ValueError(f"weight shape must be (N, K, ...) with 2 to 8 positive dims, got {shape}")


def _check_finite(what: str, t: Tensor, *, positive: bool = False) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{what} must be floating point, got {t.dtype}")
    bad = ~torch.isfinite(t) if not positive else ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        raise ValueError(f"{what}: {int(bad.sum())} of {t.numel()} values are "
                         f"{'not finite and > 0' if positive else 'NaN or Inf'}")


def _row_block(shape: tuple[int, ...], scales: int) -> tuple[int, ...]:
    """The block of ``scales`` scales over rows of the flattened weight: one (per tensor), one per row (per
    channel), or G per row of a 2-d weight (per group along the last dim)."""
    n, k = shape[0], math.prod(shape[1:])
    if scales == 1:
        return shape
    if scales == n:
        return (1, *shape[1:])
    if len(shape) == 2 and scales % n == 0 and k % (scales // n) == 0:
        return (1, k // (scales // n))
    raise ValueError(f"{scales} scales do not make row blocks of a {shape} weight; give the block")


@dataclass
class WeightEntry:
    """One int / float / table quantized weight as an artifact stores it.

    Args:
        packed: uint8 codes in the row layout, (N, row bytes) or flat.
        scale: block scales (the scale shape of ``block``, or any shape of that many elements).
        zero_point: block zero points (as many as scales) or None; integer formats only.
        shape: the weight's shape (N, ...); K is the product of the other dims.
        fmt: the codes' format: ``IntFormat``, ``FloatFormat`` (kinds int, float) or ``TableFormat`` (table).
        bits: stored bits per code (``fmt.bits``).
        block: the block of one scale (``primitives.block_size_for``); None: (1, K / G) rows of the flattened
            weight, G = scales per row (per-channel and per-group along the last dim).
    """

    packed: Tensor
    scale: Tensor
    zero_point: Tensor | None
    shape: tuple[int, ...]
    fmt: Format
    bits: int
    block: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(v) for v in self.shape)
        if not isinstance(self.fmt, (IntFormat, FloatFormat, TableFormat)):
            raise ValueError(f"weight entries take int, float or table formats, got {self.fmt.name}")
        if self.bits != self.fmt.bits:
            raise ValueError(f"{self.fmt.name} codes take {self.fmt.bits} bits, got bits={self.bits}")
        _check_shape(self.shape)
        n, k = self.rows, self.cols
        expected = n * row_length(k, self.bits) * self.bits // 8
        if self.packed.dtype != torch.uint8 or self.packed.numel() != expected:
            raise ValueError(f"packed codes of a {self.shape} weight at {self.bits} bits take {expected} uint8 bytes, "
                             f"got {self.packed.numel()} {self.packed.dtype}")
        if self.block is None:
            self.block = _row_block(self.shape, self.scale.numel())
        self.block = tuple(int(v) for v in self.block)
        try:
            blocks = scale_shape(self.shape, self.block)
        except ValueError as e:
            raise ValueError(f"block {self.block}: {e}") from None
        if self.scale.numel() != math.prod(blocks):
            raise ValueError(f"{self.scale.numel()} scales for {math.prod(blocks)} blocks {self.block} of {self.shape}")
        if self.zero_point is not None:
            if not isinstance(self.fmt, IntFormat):
                if bool((self.zero_point != 0).any()):
                    raise ValueError(f"{self.fmt.name} has no zero point")
                self.zero_point = None
            elif self.zero_point.numel() != self.scale.numel():
                raise ValueError(f"zero_point has {self.zero_point.numel()} elements, scale {self.scale.numel()}")

    @property
    def kind(self) -> str:
        return "int" if isinstance(self.fmt, IntFormat) else "float" if isinstance(self.fmt, FloatFormat) else "table"

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def row_blocks(self) -> bool:
        """Whether the blocks are (1, g) runs of the weight flattened to (N, K) (what packed modules read)."""
        assert self.block is not None
        if tuple(self.block) == self.shape:
            return True
        if self.block[0] != 1:
            return False
        if len(self.shape) == 2:
            return True
        return tuple(self.block[1:]) == self.shape[1:]

    @property
    def group_size(self) -> int:
        """g: the block length along the flattened K (K for per-channel and per-tensor scales)."""
        groups = 1 if self.scale.numel() == 1 else self.scale.numel() // self.rows
        return self.cols // groups

    def block_params(self) -> tuple[Tensor, Tensor | None]:
        """Scales and zero points as fp32 (N, K / g) (a per-tensor value repeated over the rows); row blocks only."""
        if not self.row_blocks:
            raise ValueError(f"blocks {self.block} of a {self.shape} weight are not rows of the flattened weight")
        groups = self.cols // self.group_size
        scale = self.scale.float().reshape(-1).expand(self.rows * groups).reshape(self.rows, groups)
        if self.zero_point is None:
            return scale.contiguous(), None
        zp = self.zero_point.float().reshape(-1).expand(self.rows * groups).reshape(self.rows, groups)
        return scale.contiguous(), zp.contiguous()

    def codes(self) -> Tensor:
        """The codes (N, K) uint8."""
        return unpack_rows(self.packed.reshape(self.rows, -1), self.bits, self.cols)

    def dequantize(self) -> Tensor:
        """The weight (float32, ``shape``): ``(fmt.decode(code) - zero_point) * scale`` per block."""
        assert self.block is not None
        q = self.fmt.decode(self.codes()).reshape(self.shape)
        zp = None if self.zero_point is None else self.zero_point.reshape(scale_shape(self.shape, self.block))
        return dequantize(q, self.scale.reshape(scale_shape(self.shape, self.block)), zp, self.block)


@dataclass
class VQEntry:
    """A vector-quantized weight (``polyquant.nn.VQSpec``'s layout).

    Args:
        codes: (G, M, R) integer codes, M = N * K / (G d) sub-vectors per channel group.
        codebooks: (G, R, C, d) float codewords.
        shape: the weight's shape (N, ...).
    """

    codes: Tensor
    codebooks: Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(v) for v in self.shape)
        _check_shape(self.shape)
        if self.codebooks.dim() != 4 or self.codes.dim() != 3:
            raise ValueError(f"codebooks must be (G, R, C, d) and codes (G, M, R), got "
                             f"{tuple(self.codebooks.shape)} and {tuple(self.codes.shape)}")
        g, r, c, d = self.codebooks.shape
        k = math.prod(self.shape[1:])
        if min(g, r, c, d) < 1 or k % g or (k // g) % d:
            raise ValueError(f"codebooks {tuple(self.codebooks.shape)} do not cut a {self.shape} weight into groups "
                             "of sub-vectors")
        m = self.shape[0] * k // (g * d)
        if tuple(self.codes.shape) != (g, m, r):
            raise ValueError(f"codes must be (G, M, R) = {(g, m, r)}, got {tuple(self.codes.shape)}")
        if self.codes.dtype.is_floating_point or self.codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {self.codes.dtype}")
        if self.codes.numel() and (int(self.codes.min()) < 0 or int(self.codes.max()) >= c):
            raise ValueError(f"codes must lie in [0, {c})")

    kind = "vq"

    @property
    def groups(self) -> int:
        return self.codebooks.shape[0]

    @property
    def levels(self) -> int:
        return self.codebooks.shape[1]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[2]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[3]

    @property
    def bits(self) -> int:
        """Stored bits per code: ceil(log2 C)."""
        return max(1, (self.codebook_size - 1).bit_length())

    def dequantize(self) -> Tensor:
        return vq_decode_weight(self.codes, self.codebooks, self.shape)


@dataclass
class RotatedEntry:
    """A weight stored rotated (W H, H a fixed orthonormal rotation) around an inner entry; the layer computes
    (x H) @ (W H).T (``polyquant.nn.RotatedLinear``, ``polyquant.packed.HadamardLinear``)."""

    inner: WeightEntry | VQEntry
    rotation: str = "hadamard"

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}")
        if not isinstance(self.inner, (WeightEntry, VQEntry)):
            raise ValueError(f"a rotated entry wraps an int, float, table or vq entry, got {type(self.inner).__name__}")
        if len(self.inner.shape) != 2 or not is_hadamard_size(self.inner.shape[1]):
            raise ValueError(f"no Hadamard rotation of a {self.inner.shape} weight (a Linear of in_features 2^k, "
                             "12 * 2^k, 40 * 2^k, ...)")

    kind = "rotated"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape


Entry = Union[WeightEntry, VQEntry, RotatedEntry]


# --- to and from artifact tensors ------------------------------------------------------------------------------------


def entry_to_dict(entry: Entry) -> dict[str, Any]:
    """The manifest JSON of an entry (what ``read_entry`` needs beside the tensors)."""
    if isinstance(entry, RotatedEntry):
        return {"kind": "rotated", "rotation": entry.rotation, "inner": entry_to_dict(entry.inner)}
    if isinstance(entry, VQEntry):
        return {"kind": "vq", "bits": entry.bits, "groups": entry.groups, "levels": entry.levels,
                "codebook_size": entry.codebook_size, "dim": entry.dim}
    assert entry.block is not None
    out: dict[str, Any] = {"kind": entry.kind, "bits": entry.bits, "block": list(entry.block)}
    if entry.kind != "table":
        out["format"] = format_to_dict(entry.fmt)
    return out


def entry_tensors(name: str, entry: Entry) -> dict[str, Tensor]:
    """The artifact tensors of module ``name``'s entry (keys in the module docstring)."""
    if isinstance(entry, RotatedEntry):
        return entry_tensors(name, entry.inner)
    shape = torch.tensor(list(entry.shape), dtype=torch.int64)
    if isinstance(entry, VQEntry):
        g, m, r = entry.codes.shape
        rows = entry.codes.reshape(g * m, r)
        # packed rows at ceil(log2 C) bits (up to 16: a 65536-entry codebook); beyond, int32 codes
        codes = pack_rows(rows, entry.bits) if entry.bits <= 16 else rows.to(torch.int32)
        return {f"{name}.weight_codes": codes.contiguous(), f"{name}.weight_codebooks": entry.codebooks.float().contiguous(),
                f"{name}.weight_shape": shape}
    out = {f"{name}.weight_packed": entry.packed.reshape(-1).contiguous(),
           f"{name}.weight_scale": entry.scale.float().contiguous(), f"{name}.weight_shape": shape}
    if isinstance(entry.fmt, IntFormat):
        zp = entry.zero_point if entry.zero_point is not None else torch.zeros_like(entry.scale)
        out[f"{name}.weight_zero_point"] = zp.float().contiguous()
    if isinstance(entry.fmt, TableFormat):
        out[f"{name}.weight_table"] = entry.fmt.table()
    return out


def _get(tensors: dict[str, Tensor], key: str) -> Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise ArtifactError(f"the artifact has no quantized weight tensor {key} (missing)") from None


def _shape(tensors: dict[str, Tensor], name: str) -> tuple[int, ...]:
    t = _get(tensors, f"{name}.weight_shape")
    if t.dtype != torch.int64 or t.dim() != 1 or not 2 <= t.numel() <= 8:
        raise ArtifactError(f"{name}.weight_shape must be 2 to 8 int64 values, got {t.dtype} {list(t.shape)}")
    shape = tuple(int(v) for v in t.tolist())
    try:
        _check_shape(shape)
    except ValueError as e:
        raise ArtifactError(f"{name}.weight_shape: {e}") from None
    return shape


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ArtifactError(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def read_entry(tensors: dict[str, Tensor], name: str, spec: Any) -> Entry:
    """The entry of module ``name`` from an artifact's tensors and its manifest JSON (``entry_to_dict``); every
    tensor is checked (dtype, shape, finite values, scales > 0, code range) before use: ``ArtifactError`` naming
    the tensor otherwise."""
    if not isinstance(spec, dict) or spec.get("kind") not in ENTRY_KINDS:
        raise ArtifactError(f"{name}: not a weight entry description: {spec!r:.200}")
    kind = spec["kind"]
    try:
        if kind == "rotated":
            inner = read_entry(tensors, name, spec.get("inner"))
            if isinstance(inner, RotatedEntry):
                raise ValueError("a rotated entry cannot wrap another")
            return RotatedEntry(inner, rotation=str(spec.get("rotation")))
        shape = _shape(tensors, name)
        if kind == "vq":
            return _read_vq(tensors, name, spec, shape)
        return _read_weight(tensors, name, spec, shape)
    except ArtifactError:
        raise
    except ValueError as e:
        raise ArtifactError(f"{name}: {e}") from None


def _read_vq(tensors: dict[str, Tensor], name: str, spec: dict[str, Any], shape: tuple[int, ...]) -> VQEntry:
    g = _int(spec.get("groups"), f"{name}: groups", 1, 1 << 20)
    r = _int(spec.get("levels"), f"{name}: levels", 1, 64)
    c = _int(spec.get("codebook_size"), f"{name}: codebook_size", 2, 1 << 20)
    d = _int(spec.get("dim"), f"{name}: dim", 1, 1 << 16)
    bits = _int(spec.get("bits"), f"{name}: bits", 1, 32)
    if bits != max(1, (c - 1).bit_length()):
        raise ArtifactError(f"{name}: bits {bits} do not fit codebook_size {c}")
    books = _get(tensors, f"{name}.weight_codebooks")
    if books.dtype != torch.float32 or tuple(books.shape) != (g, r, c, d):
        raise ArtifactError(f"{name}.weight_codebooks must be float32 {[g, r, c, d]}, got {books.dtype} "
                            f"{list(books.shape)}")
    _check_finite(f"{name}.weight_codebooks", books)
    k = math.prod(shape[1:])
    if k % g or (k // g) % d:
        raise ArtifactError(f"{name}: groups {g} and dim {d} do not cut a {shape} weight")
    m = shape[0] * k // (g * d)
    raw = _get(tensors, f"{name}.weight_codes")
    if bits <= 16 and not (bits > 8 and raw.dtype == torch.int32):  # int32 9..16-bit codes: older artifacts
        want = (g * m, row_length(r, bits) * bits // 8)
        if raw.dtype != torch.uint8 or tuple(raw.shape) != want:
            raise ArtifactError(f"{name}.weight_codes must be uint8 {list(want)}, got {raw.dtype} {list(raw.shape)}")
        codes = unpack_rows(raw, bits, r).long()
    else:
        if raw.dtype != torch.int32 or tuple(raw.shape) != (g * m, r):
            raise ArtifactError(f"{name}.weight_codes must be int32 {[g * m, r]}, got {raw.dtype} {list(raw.shape)}")
        codes = raw.long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c):
        raise ArtifactError(f"{name}.weight_codes: codes must lie in [0, {c})")
    return VQEntry(codes.reshape(g, m, r), books, shape)


def _read_weight(tensors: dict[str, Tensor], name: str, spec: dict[str, Any], shape: tuple[int, ...]) -> WeightEntry:
    kind = spec["kind"]
    bits = _int(spec.get("bits"), f"{name}: bits", 1, 8)
    block = spec.get("block")
    if not (isinstance(block, list) and len(block) == len(shape) and all(isinstance(v, int) for v in block)):
        raise ArtifactError(f"{name}: block must be {len(shape)} integers, got {block!r:.80}")
    try:
        blocks = scale_shape(shape, block)
    except ValueError as e:
        raise ArtifactError(f"{name}: {e}") from None
    if kind == "table":
        table = _get(tensors, f"{name}.weight_table")
        if table.dtype != torch.float32 or table.dim() != 1 or not 2 <= table.numel() <= 2**bits:
            raise ArtifactError(f"{name}.weight_table must be 2 to {2**bits} float32 values, got {table.dtype} "
                                f"{list(table.shape)}")
        _check_finite(f"{name}.weight_table", table)
        fmt: Format = TableFormat(tuple(table.tolist()))
    else:
        fmt = format_from_dict(spec.get("format"))
        if kind == "int" and not isinstance(fmt, IntFormat) or kind == "float" and not isinstance(fmt, FloatFormat):
            raise ArtifactError(f"{name}: a {kind} entry of format {fmt.name}")
    if fmt.bits != bits:
        raise ArtifactError(f"{name}: {fmt.name} codes take {fmt.bits} bits, the manifest says {bits}")
    packed = _get(tensors, f"{name}.weight_packed")
    want = shape[0] * row_length(math.prod(shape[1:]), bits) * bits // 8
    if packed.dtype != torch.uint8 or packed.numel() != want:
        raise ArtifactError(f"{name}.weight_packed must be {want} uint8 bytes, got {packed.numel()} {packed.dtype}")
    scale = _get(tensors, f"{name}.weight_scale")
    if scale.dtype != torch.float32 or scale.numel() != math.prod(blocks):
        raise ArtifactError(f"{name}.weight_scale must be {math.prod(blocks)} float32 values, got {scale.dtype} "
                            f"{list(scale.shape)}")
    _check_finite(f"{name}.weight_scale", scale, positive=True)
    zp = None
    if isinstance(fmt, IntFormat):
        zp = _get(tensors, f"{name}.weight_zero_point")
        if zp.dtype != torch.float32 or zp.numel() != scale.numel():
            raise ArtifactError(f"{name}.weight_zero_point must be {scale.numel()} float32 values, got {zp.dtype} "
                                f"{list(zp.shape)}")
        _check_finite(f"{name}.weight_zero_point", zp)
    entry = WeightEntry(packed, scale, zp, shape, fmt, bits, tuple(block))
    if isinstance(fmt, TableFormat) and len(fmt.values) < 2**bits:
        codes = entry.codes()
        if codes.numel() and int(codes.max()) >= len(fmt.values):
            raise ArtifactError(f"{name}.weight_packed: codes must lie in [0, {len(fmt.values)})")
    return entry


def read_entries(tensors: dict[str, Tensor], specs: Any) -> dict[str, Entry]:
    """Every entry a manifest's ``config["entries"]`` describes, by module name (see ``read_entry``)."""
    if not isinstance(specs, dict):
        raise ArtifactError("the manifest's entries must be a JSON object")
    return {name: read_entry(tensors, name, spec) for name, spec in specs.items()}


def read_weight(tensors: dict[str, Tensor], name: str, fmt: Format | str, bits: int | None = None) -> WeightEntry:
    """The int / float ``WeightEntry`` of module ``name`` with row blocks, for artifacts whose manifest records no
    entries (``ArtifactError`` if missing or bad)."""
    f = get_format(fmt)
    spec = {"kind": "int" if isinstance(f, IntFormat) else "float", "format": format_to_dict(f),
            "bits": f.bits if bits is None else bits}
    shape = _shape(tensors, name)
    try:
        spec["block"] = list(_row_block(shape, _get(tensors, f"{name}.weight_scale").numel()))
    except ValueError as e:
        raise ArtifactError(f"{name}: {e}") from None
    return _read_weight(tensors, name, spec, shape)
