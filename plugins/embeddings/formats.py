"""Storage formats of embedding vectors: a ``Codec`` fitted on calibration vectors encodes (N, D) float vectors into
codes, decodes them, and scores float queries against the codes without dequantizing the store.

Every format decodes as x = offset + value(code) * step * row_scale, each factor per dimension (offset, step) or
per vector (row_scale), absent (0 or 1) where the table has no entry. Casts and rounding are the core's
(``polyquant.formats`` / ``polyquant.primitives``); bit packing is ``polyquant.pack`` / ``polyquant.kernels``.

| format    | codes (N, W)              | value(code)       | step (D,)                 | offset (D,)      | row_scale |
|-----------|---------------------------|-------------------|---------------------------|------------------|-----------|
| float16   | float16 (N, D)            | the float         | -                         | -                | -         |
| bfloat16  | bfloat16 (N, D)           | the float         | -                         | -                | -         |
| fp8_e4m3, | float8 (N, D)             | the float         | scale=dimension: calib    | -                | scale=    |
| fp8_e5m2  |                           |                   | absmax / format max       |                  | vector    |
| int8      | int8 (N, D)               | c in -128..127    | calib absmax / 127        | -                | -         |
| uint8     | uint8 (N, D)              | c in 0..255       | (max - min) / 256         | min + step / 2   | -         |
| int4      | uint8 (N, ceil(D / 2))    | c in 0..15        | (max - min) / 16          | min + step / 2   | -         |
| binary    | uint8 (N, ceil(D / 8))    | +1 / -1 (sign of  | calib mean |x_d - mu_d|,  | mu (centred) or  | -         |
|           |                           | x - mu, or of x)  | averaged over d (uniform) | - (not centred)  |           |

fp8 with ``scale="vector"`` keeps one float32 row scale per vector (absmax / format max: the vector's largest
entry lands on the format's max instead of unit-vector entries underflowing E4M3). uint8 and int4 cut the
calibrated [min, max] of each dimension into 2^b equal cells and decode at the cell midpoint (code =
clamp(round((x - offset) / step)), which is floor((x - min) / step)): sentence-transformers' uint8 ranges, but
dequantized (its rescoring reads raw codes, sentence-transformers PR #4058). int4 codes are packed two per byte
with ``polyquant.pack.pack_rows`` (low nibble = even dimension); binary codes with ``polyquant.kernels.pack_binary``
(bit 1 = x >= 0, the core ``BinaryFormat`` code of +1). Float codes saturate at the format's max (no inf).

Binary magnitudes (``fit_codec(..., magnitude=)``, ``BinaryConfig(magnitude=)``): a decoded sign is multiplied by
one magnitude for every dimension ("uniform", the default: the mean over dimensions of the calibrated mean |x_d -
mu_d|), so rescoring ranks candidates by q . sign, the ranking of sentence-transformers' +-1 / {0, 1} rescoring;
or by each dimension's mean |x_d - mu_d| ("dimension", the least-squares decode of each dimension given its sign),
which reconstructs x better but ranked 0.68 +- 0.22 nDCG@10 points lower after 4x rescoring on a held-out corpus
(issue 28) and 0.1 +- 0.5 points lower on the docstring benchmark (``benchmarks/embeddings.py`` has both, paired).
The step is stored per dimension either way.

Centred binary codes (``fit_codec(..., center=True)``, ``BinaryConfig(center=True)``): embedding models are
anisotropic (a common mean direction mu, |mu| ~ 0.35 for all-MiniLM-L6-v2), so the bits of sign(x) are unbalanced
(a dimension's bit is the same for most vectors) and sign x mean |x| reconstructs x poorly. Centred codes are the
bits of x - mu (mu = the calibration mean, the codec's ``offset``) and decode as mu + sign * mean |x_d - mu_d|
(the table's offset + value * step). For a fixed query q, q . x = q . mu + q . (x - mu), so ranking by the
centred part loses nothing; the per-vector storage stays ceil(D / 8) bytes (mu and the steps are per-dimension
codec tensors). The query's bits stay sign(q): the Hamming stage estimates q . (x - mu) = sum_d q_d (x_d - mu_d),
whose weights have the signs of q (not of q - mu, which would estimate (q - mu) . (x - mu), a different ranking;
measured: sign(q) is as good or better at every oversampling, ``benchmarks/embeddings.py``). Centring is an
option, not the default: on the docstring benchmark it lifts binary + 4x rescoring from 94.46% / 94.86% to
95.56% / 95.64% nDCG@10 retention (1,000 / 2,463 queries), but the paired standard error of that gain (1.26 /
0.80 points) is as large as the gain.

Checked values: a codec's step must be finite and in [1e-12, ``MAX_MAGNITUDE`` = 1e6] and its offset finite and
within +-1e6 (a fit on unit vectors, reduced, gives steps and offsets of order 1; ``Reducer`` bounds its matrix and
mean the same way), so a codec loaded from a damaged or forged store is refused (``ValueError`` naming
``codec.step`` / ``codec.offset``) instead of decoding to NaN or Inf: with every factor within 1e6 and at most 2^20
dimensions, every score and decoded value stays finite in float32.

Scoring a query q (already reduced, with its reducer offset b) against codes, never decoding the store:

    q . x_hat = b + q . offset + row_scale * sum_d u_d value(c_d),        u = q * step (q where there is no step)

- On the CPU (every format but binary): value(code) is upcast to float32 ``TILE_ROWS`` vectors at a time into a
  buffer that stays in the cache, and multiplied with the float32 u by the BLAS (no rounding of the query: the score
  is the dequantized dot product up to fp32 rounding). The upcast is one vectorised cast for int8, uint8, float16
  and bfloat16; int4 splits the bytes into low and high nibbles (the even dimensions, then the odd ones, in each
  tile row: the query's weights are permuted alike); fp8 sign-extends each byte to int16 and moves it into float16
  bits with a multiply (and, for E4M3, a mask): E5M2 is the high byte of float16; E4M3 lands on float16 at 2^-8 of
  its value, subnormals included, and u is scaled by 2^8; then float16 is cast to float32. torch's own float8 cast
  is not vectorised (14 ns a value, 20x the int8 cast) and int8 integer GEMMs without VNNI are slower still, so
  these paths are what the CPU scan runs (measured beside FAISS and usearch: ``benchmarks/embeddings.md``). A
  float8 E4M3 NaN code (the byte 0x7F / 0xFF, never written by ``encode``) is read as +-480 times the scale by the
  scan (``damaged`` finds such rows; the store checks the vectors a search returns).
- On CUDA, int8 / uint8 / int4: u is quantized per query to int8 (``polyquant.kernels.quantize_dynamic``: u ~
  s_u * u_q, s_u = max|u| / 127) and multiplied with the int8 codes by ``polyquant.kernels.int8_gemm`` (exact
  int32 sums). uint8 codes enter the GEMM as c - 128 (int8), with + 128 * sum(u) added to the offset term; int4
  codes are unpacked to 0..15. The only approximation is the query's rounding: the score differs from the
  dequantized dot product by at most s_u / 2 * sum_d |c_d| (c_d as fed to the GEMM) plus fp32 rounding. Float
  formats upcast the chunk and multiply.
- binary: sign bits of q (also for centred codes) against the codes, Hamming distance h; the score is the cosine
  of the sign vectors, (D - 2 h) / D (``polyquant.kernels.hamming_topk`` finds the top k; ``scores`` gives the
  same values through a +-1 matmul). Rescoring with the float query against the decoded codes uses the step
  (least-squares magnitude of each dimension given its sign) and, for centred codes, the offset mu.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from polyquant.formats import FloatFormat, IntFormat, get_format
from polyquant.primitives import choose_qparams, quantize_tensor

__all__ = ["FORMATS", "SCALES", "MAX_MAGNITUDE", "TILE_ROWS", "Codec", "PreparedQueries", "check_values", "fit_codec"]

FORMATS = ("float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8", "uint8", "int4", "binary")
SCALES = ("none", "vector", "dimension")  # fp8 only

# format -> (core float format, torch dtype of the codes)
_FLOATS: dict[str, tuple[FloatFormat, torch.dtype]] = {
    "float16": (FloatFormat(5, 10, specials="ieee"), torch.float16),
    "bfloat16": (FloatFormat(8, 7, specials="ieee"), torch.bfloat16),
    "fp8_e4m3": (FloatFormat(4, 3, specials="fn"), torch.float8_e4m3fn),
    "fp8_e5m2": (FloatFormat(5, 2, specials="ieee"), torch.float8_e5m2),
}
_AFFINE_BITS = {"uint8": 8, "int4": 4}  # unsigned codes over calibrated [min, max] cells
_EPS = 1e-12  # the smallest step a fit gives (compared in float32)
MAX_MAGNITUDE = 1e6  # bound of every codec and reducer entry (module docstring)
TILE_ROWS = 2048  # vectors upcast to float32 per step on the CPU (3 MB at 384 dims; measured best of 512..8192)
_E4M3_BITS = -16385  # 0xBFFF as int16: every bit but 14


def check_values(t: Tensor, name: str, lo: float, hi: float) -> None:
    """``ValueError`` naming ``name`` unless every entry of ``t`` is finite and in [lo, hi] (compared in t's dtype)."""
    bad = ~(torch.isfinite(t) & (t >= lo) & (t <= hi)).reshape(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite and in [{lo:g}, {hi:g}]: {int(bad.sum())} entries are not "
                         f"(first: entry {i} = {t.reshape(-1)[i].item():g})")


@dataclass(frozen=True)
class PreparedQueries:
    """Queries made ready for scoring against one codec's codes (``Codec.prepare``).

    Args:
        reduced: (Q, D) float32 reduced queries (for rescoring against decoded codes).
        offset: (Q,) float32 reducer offset (``Reducer.queries``).
        weights: (Q, D) float32 u = q * step (or q).
        bias: (Q,) float32 constant term of every score: offset + q . codec offset (+ 128 sum(u) for uint8).
        qcodes, qscale: u quantized per query, (Q, D) int8 and (Q, 1) float32 (integer formats, when asked for:
            ``Codec.prepare``), else None.
        bits: (Q, ceil(D / 8)) uint8 packed sign bits (binary), else None.
        tile_weights: (Q, tile_width) float32: u in the column order of ``Codec.upcast`` (int4: even dimensions,
            then odd ones, zero for the padding nibble; E4M3 scaled by 2^8); None for binary.
        tile_bias: (Q,) float32 constant term of the CPU path's scores (``bias`` without the uint8 shift).
        workspace: the CPU path's tile and scratch buffers, made by the first ``scores`` call and reused by the
            next ones (a search scores chunk after chunk with the same prepared queries).
    """

    reduced: Tensor
    offset: Tensor
    weights: Tensor
    bias: Tensor
    qcodes: Tensor | None = None
    qscale: Tensor | None = None
    bits: Tensor | None = None
    tile_weights: Tensor | None = None
    tile_bias: Tensor | None = None
    workspace: dict[str, Tensor | None] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Codec:
    """A fitted format (see the module docstring's table).

    Args:
        format: one of ``FORMATS``.
        dim: dimensions of the vectors it encodes.
        scale: fp8 scaling, one of ``SCALES`` ("none" for the other formats).
        step: (dim,) float32 per-dimension step, or None.
        offset: (dim,) float32 per-dimension offset, or None; for binary codes the centre mu (centred codes).
    """

    format: str
    dim: int
    scale: str = "none"
    step: Tensor | None = None
    offset: Tensor | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r} (choose one of {', '.join(FORMATS)})")
        if self.scale not in SCALES or (self.scale != "none" and not self.format.startswith("fp8")):
            raise ValueError(f"{self.format}: bad scale {self.scale!r} (fp8 formats take {', '.join(SCALES)})")
        needs_step = self.format in ("int8", "binary", *_AFFINE_BITS) or self.scale == "dimension"
        needs_offset = self.format in _AFFINE_BITS or (self.format == "binary" and self.offset is not None)
        if needs_step != (self.step is not None) or needs_offset != (self.offset is not None):
            raise ValueError(f"{self.format}: step / offset do not match the format")
        for name, t in (("step", self.step), ("offset", self.offset)):
            if t is not None and (tuple(t.shape) != (self.dim,) or t.dtype != torch.float32):
                raise ValueError(f"{self.format}: {name} must be float32 ({self.dim},), got {t.dtype} "
                                 f"{tuple(t.shape)}")
        if self.step is not None:
            check_values(self.step, "codec.step", _EPS, MAX_MAGNITUDE)
        if self.offset is not None:
            check_values(self.offset, "codec.offset", -MAX_MAGNITUDE, MAX_MAGNITUDE)

    # --- layout -------------------------------------------------------------------------------------------------

    @property
    def code_dtype(self) -> torch.dtype:
        """The dtype of the codes tensor."""
        if self.format in _FLOATS:
            return _FLOATS[self.format][1]
        return torch.int8 if self.format == "int8" else torch.uint8

    @property
    def code_width(self) -> int:
        """Columns of the codes tensor per vector."""
        if self.format == "int4":
            return (self.dim + 1) // 2
        if self.format == "binary":
            return (self.dim + 7) // 8
        return self.dim

    @property
    def centred(self) -> bool:
        """Whether binary codes are the bits of x - offset (module docstring) rather than of x."""
        return self.format == "binary" and self.offset is not None

    @property
    def row_scaled(self) -> bool:
        """Whether each vector has a float32 row scale (fp8 with ``scale="vector"``)."""
        return self.scale == "vector"

    def code_bytes(self) -> int:
        """Bytes of one vector's codes (and row scale)."""
        return self.code_width * self.code_dtype.itemsize + (4 if self.row_scaled else 0)

    def tensors(self) -> dict[str, Tensor]:
        """The fitted tensors by name (``step``, ``offset``), for an artifact."""
        return {name: t for name, t in (("step", self.step), ("offset", self.offset)) if t is not None}

    def nbytes(self) -> int:
        """Bytes of the fitted tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # --- encode / decode ----------------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(N, dim) finite float vectors -> (codes (N, code_width) of ``code_dtype``, row scales (N,) or None)."""
        x = x.float()
        n = x.shape[0]
        if n == 0:
            return (torch.empty(0, self.code_width, dtype=self.code_dtype),
                    torch.empty(0) if self.row_scaled else None)
        if self.format in _FLOATS:
            fmt, dtype = _FLOATS[self.format]
            row_scale = None
            if self.scale == "vector":  # per-vector absmax -> the format's max (a zero vector keeps scale eps)
                scale, _ = choose_qparams(x, fmt, (1, self.dim))  # (N, 1)
                row_scale = scale.reshape(n)
                grid = quantize_tensor(x, fmt, scale, None, (1, self.dim))
            elif self.scale == "dimension":
                assert self.step is not None
                grid = quantize_tensor(x, fmt, self.step.reshape(1, -1), None, (n, 1))
            else:
                grid = fmt.round(x)
            return grid.to(dtype), row_scale  # grid values: the cast is exact
        if self.format == "binary":
            from polyquant.kernels import pack_binary

            return pack_binary(x >= self.offset if self.offset is not None else x >= 0), None  # bits of x - mu
        assert self.step is not None
        step = self.step.reshape(1, -1)
        if self.format == "int8":
            q = quantize_tensor(x, IntFormat(8), step, None, (n, 1))
            return q.to(torch.int8), None
        assert self.offset is not None
        bits = _AFFINE_BITS[self.format]
        q = quantize_tensor(x, IntFormat(bits, signed=False), step, -self.offset.reshape(1, -1) / step, (n, 1))
        codes = q.to(torch.uint8)
        if bits == 4:
            from polyquant.pack import pack_rows

            codes = pack_rows(codes, 4)
        return codes, None

    def values(self, codes: Tensor) -> Tensor:
        """value(code) of the table, (N, dim) float32 (no step, offset or row scale)."""
        if self.format in _FLOATS:
            return codes.float()
        if self.format == "binary":
            from polyquant.kernels import unpack_binary

            return unpack_binary(codes, self.dim).float() * 2 - 1
        if self.format == "int4":
            from polyquant.pack import unpack_rows

            return unpack_rows(codes, 4, self.dim).float()
        return codes.float()

    def decode(self, codes: Tensor, row_scale: Tensor | None = None) -> Tensor:
        """Codes (N, code_width) (+ row scales) -> vectors (N, dim) float32."""
        x = self.values(codes)
        if self.step is not None:
            x = x * self.step.to(x.device)
        if self.offset is not None:
            x = x + self.offset.to(x.device)
        if row_scale is not None:
            x = x * row_scale.float().reshape(-1, 1)
        return x

    # --- scoring ------------------------------------------------------------------------------------------------

    def prepare(self, reduced: Tensor, offset: Tensor, *, query_codes: bool | None = None) -> PreparedQueries:
        """Precompute the query side of ``scores`` for reduced queries (Q, dim) and their reducer offsets (Q,).
        ``query_codes``: also quantize u to int8 (``qcodes`` / ``qscale``: integer formats; what the CUDA int8 GEMM
        and the usearch i8 export take); default: where the queries are not on the CPU."""
        q = reduced.float()
        u = q if self.step is None or self.format == "binary" else q * self.step.to(q.device)
        base = offset.float().clone()  # the constant term of the CPU path's scores
        if self.offset is not None:
            base = base + q @ self.offset.to(q.device)
        bias = base + 128.0 * u.sum(dim=1) if self.format == "uint8" else base  # the GEMM's codes are c - 128
        qcodes = qscale = bits = None
        if query_codes is None:
            query_codes = q.device.type != "cpu"
        if query_codes and self.format in ("int8", *_AFFINE_BITS):
            from polyquant.kernels import quantize_dynamic

            qcodes, qscale = quantize_dynamic(u, fmt="int8")  # (Q, D) int8, (Q, 1) float32
        tile_weights = tile_bias = None
        if self.format == "binary":
            from polyquant.kernels import pack_binary

            bits = pack_binary(q >= 0)
        else:
            tile_weights, tile_bias = self._tile_weights(u), base
        return PreparedQueries(q, offset.float(), u, bias, qcodes, qscale, bits, tile_weights, tile_bias)

    # --- the CPU path: upcast tiles, BLAS products ----------------------------------------------------------------

    @property
    def tile_width(self) -> int:
        """Columns of ``upcast``'s tiles: dim, or 2 code_width for int4 (its pad nibble included)."""
        return 2 * self.code_width if self.format == "int4" else self.dim

    def _tile_weights(self, u: Tensor) -> Tensor:
        """u (Q, dim) as the (Q, tile_width) weights of ``upcast``'s columns (``PreparedQueries.tile_weights``):
        int4 tiles hold the even dimensions (low nibbles), then the odd ones."""
        if self.format == "fp8_e4m3":
            u = u * 256.0  # upcast gives E4M3 values times 2^-8 (exact: a power of two)
        if self.format != "int4":
            return u.contiguous()
        padded = torch.nn.functional.pad(u, (0, self.tile_width - self.dim))  # odd dim: 0 for the pad nibble
        return torch.cat([padded[:, 0::2], padded[:, 1::2]], dim=1).contiguous()

    def scratch(self, rows: int) -> Tensor | None:
        """The integer buffer ``upcast`` works in for up to ``rows`` codes: (rows, 2, code_width) uint8 for int4,
        (rows, dim) int16 for fp8, else None."""
        if self.format == "int4":
            return torch.empty(rows, 2, self.code_width, dtype=torch.uint8)
        if self.format.startswith("fp8"):
            return torch.empty(rows, self.dim, dtype=torch.int16)
        return None

    def upcast(self, codes: Tensor, out: Tensor, scratch: Tensor | None = None) -> None:
        """value(code) of CPU codes (n, code_width) into ``out`` (n, tile_width) float32, the columns of
        ``tile_weights`` (module docstring), working in ``scratch`` (``scratch(n)`` or larger; allocated if None).
        Float codes are read bit for bit (Inf / NaN kept), except an E4M3 NaN byte, which reads as +-480 (2^-8 of
        it): checking every byte would cost 10% of the scan; ``damaged`` finds them."""
        n = len(codes)
        buffer = self.scratch(n) if scratch is None else scratch
        if buffer is None:
            out.copy_(codes)  # int8, uint8, float16, bfloat16: vectorised casts
            return
        if self.format == "int4":
            nibbles = buffer[:n]
            torch.bitwise_and(codes, 0xF, out=nibbles[:, 0])  # low nibbles: even dimensions
            torch.bitwise_right_shift(codes, 4, out=nibbles[:, 1])
            out.copy_(nibbles.view(n, -1))
            return
        h = buffer[:n]
        h.copy_(codes.view(torch.int8))  # each byte b sign-extended: b - 256 s (s its top bit)
        if self.format == "fp8_e5m2":  # E5M2 bits are float16's high byte: (b - 256 s) << 8 = b << 8 (mod 2^16)
            h.mul_(256)
        else:  # E4M3 s eeee mmm -> float16 s 0 eeee mmm 0000000, 2^-8 of the value (subnormals included):
            # (b - 256 s) << 7 = (b & 0x7F) << 7 + s (2^15 + 2^14) (mod 2^16); clear bit 14
            h.mul_(128).bitwise_and_(_E4M3_BITS)  # (a NaN byte 0x7F / 0xFF reads as +-480: see ``damaged``)
        out.copy_(h.view(torch.float16))

    def damaged(self, codes: Tensor) -> Tensor:
        """(N,) bool: the rows of codes (N, code_width) that decode to NaN or Inf (float formats; the integer and
        binary codes have no such values)."""
        if self.format == "fp8_e4m3":  # the NaN bytes 0x7F / 0xFF (E4M3 has no Inf)
            return ((codes.view(torch.uint8) & 0x7F) == 0x7F).any(dim=1)
        if self.format in _FLOATS:
            return ~torch.isfinite(codes.float()).all(dim=1)
        return torch.zeros(len(codes), dtype=torch.bool)

    def _tile_scores(self, p: PreparedQueries, codes: Tensor, row_scale: Tensor | None) -> Tensor:
        """The CPU path of ``scores``: ``TILE_ROWS`` codes at a time upcast and multiplied (module docstring)."""
        assert p.tile_weights is not None and p.tile_bias is not None
        w = p.tile_weights
        n = len(codes)
        out = torch.empty(len(w), n)
        rows = min(n, TILE_ROWS)
        if "tile" not in p.workspace or p.workspace["tile"].shape[0] < rows:  # fresh pages cost page faults
            p.workspace["tile"], p.workspace["scratch"] = torch.empty(rows, self.tile_width), self.scratch(rows)
        tile, scratch = p.workspace["tile"][:rows], p.workspace["scratch"]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            t = tile if stop - start == rows else tile[: stop - start]
            self.upcast(codes[start:stop], t, scratch)
            torch.matmul(w, t.T, out=out[:, start:stop])
        if row_scale is not None:
            out.mul_(row_scale.float()[None, :])
        return out.add_(p.tile_bias[:, None])

    def gemm_codes(self, codes: Tensor) -> Tensor:
        """The int8 matrix the integer formats feed ``int8_gemm``: int8 codes, uint8 codes - 128, int4 0..15."""
        if self.format == "int8":
            return codes
        if self.format == "uint8":
            return (codes ^ 0x80).view(torch.int8)  # c - 128 in two's complement
        if self.format == "int4":
            from polyquant.pack import unpack_rows

            return unpack_rows(codes, 4, self.dim).view(torch.int8)
        raise ValueError(f"{self.format} is not scored by the int8 GEMM")

    def scores(self, prepared: PreparedQueries, codes: Tensor, row_scale: Tensor | None = None) -> Tensor:
        """Scores (Q, N) float32 of prepared queries against codes (N, code_width), on the codes (module docstring)."""
        p = prepared
        if self.format == "binary":
            signs = (p.reduced >= 0).float() * 2 - 1  # (Q, D)
            return (signs @ self.values(codes.to(signs.device)).T) / self.dim  # (D - 2 h) / D, exact integers
        if codes.device.type == "cpu" and p.weights.device.type == "cpu":
            return self._tile_scores(p, codes, row_scale)
        if p.qcodes is not None:
            from polyquant.kernels import int8_gemm

            assert p.qscale is not None
            dots = int8_gemm(p.qcodes, p.qscale, self.gemm_codes(codes.to(p.qcodes.device)), 1.0,
                             out_dtype=torch.float32)  # (Q, N), a fresh tensor
            return dots.add_(p.bias[:, None])
        dots = p.weights @ codes.to(p.weights.device).float().T  # (Q, N)
        if row_scale is not None:
            dots = dots * row_scale.to(dots.device).float()[None, :]
        return p.bias[:, None] + dots

    def dequantized_scores(self, prepared: PreparedQueries, codes: Tensor, row_scale: Tensor | None = None) -> Tensor:
        """offset + reduced query . decoded codes, (Q, N): the float query against the dequantized vectors."""
        x = self.decode(codes.to(prepared.reduced.device), row_scale)
        return prepared.offset[:, None] + prepared.reduced @ x.T


def fit_codec(calibration: Tensor, format: str, *, scale: str = "none", center: bool = False,
              magnitude: str = "uniform") -> Codec:
    """Fit ``format`` on calibration vectors (N, D) (already reduced): the per-dimension ranges of the table.

    Args:
        calibration: (N, D) finite float vectors, N >= 1.
        format: one of ``FORMATS``.
        scale: fp8 scaling, one of ``SCALES``.
        center: binary only: centred codes, the bits of x - mu with mu the calibration mean (module docstring).
        magnitude: binary only: the step of every dimension is "uniform", the mean over dimensions of the
            calibrated mean |x_d - mu_d| (rescoring then ranks by q . sign, as sentence-transformers does), or
            "dimension", each dimension's own mean |x_d - mu_d| (module docstring).
    """
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise ValueError(f"calibration vectors must be (N, D) with N >= 1, got {tuple(calibration.shape)}")
    x = calibration.float()
    n, d = x.shape
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calibration vectors contain NaN or Inf")
    if center and format != "binary":
        raise ValueError(f"{format}: center applies to binary codes only")
    if format in _FLOATS:
        if scale == "dimension":
            fmt = _FLOATS[format][0]
            step, _ = choose_qparams(x, fmt, (n, 1), eps=_EPS)  # (1, D): calibration absmax / format max
            return Codec(format=format, dim=d, scale=scale, step=step.reshape(d).contiguous())
        return Codec(format=format, dim=d, scale=scale)
    if scale != "none":
        raise ValueError(f"{format}: scale applies to fp8 formats only, got {scale!r}")
    if magnitude not in ("uniform", "dimension") or (magnitude != "uniform" and format != "binary"):
        raise ValueError(f"{format}: magnitude applies to binary codes ('uniform' or 'dimension'), got {magnitude!r}")
    if format == "binary":
        mu = x.mean(dim=0) if center else None  # (D,)
        step = (x if mu is None else x - mu).abs().mean(dim=0).clamp_min(_EPS)  # least-squares magnitude per sign
        if magnitude == "uniform":
            step = step.mean().expand(d).clamp_min(_EPS)  # one magnitude: rescoring ranks by q . sign
        return Codec(format=format, dim=d, step=step.contiguous(), offset=None if mu is None else mu.contiguous())
    if format == "int8":
        step, _ = choose_qparams(x, get_format("int8"), (n, 1), eps=_EPS)  # (1, D): absmax / 127
        return Codec(format=format, dim=d, step=step.reshape(d).contiguous())
    if format not in _AFFINE_BITS:
        raise ValueError(f"unknown format {format!r} (choose one of {', '.join(FORMATS)})")
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    step = ((hi - lo) / 2 ** _AFFINE_BITS[format]).clamp_min(_EPS)
    return Codec(format=format, dim=d, step=step.contiguous(), offset=(lo + step / 2).contiguous())
