"""Number formats: what values a quantized tensor can take, in units of its scale.

Every format exposes its representable ``grid()`` (sorted, float32) and ``round(x)``: round-to-nearest onto
that grid, saturating at the ends. Rounding is done in closed form (no search over the grid), so it is as fast
as ``torch.round`` and differentiable through ``round_ste``.

| format        | values (scale = 1)                                       | zero point |
|---------------|----------------------------------------------------------|------------|
| IntFormat     | integers qmin..qmax (two's complement when signed)       | allowed    |
| FloatFormat   | sign * 2^(e - bias) * (1 + m / 2^M), with subnormals     | no         |
| LogFormat     | 0 and (sign) base^-k for k = 0 .. 2^bits - 1             | no         |
| TwinUniform-  | two (bits-1)-bit uniform ranges, steps 1 and 2^r         | no         |
| Format        | (PTQ4ViT), one bit picks the range                       |            |
| BinaryFormat  | -1, +1                                                   | no         |
| TableFormat   | any 2^b values: code c is values[c] (NF4, FP4DiT grids)  | no         |

``round`` keeps NaN (NaN in, NaN out) and saturates +-Inf; ``encode`` refuses NaN and values off the grid, and
``decode`` refuses codes the format does not have, with a ``ValueError`` (one reduction each).

Formats are frozen dataclasses and are looked up by name with ``get_format("int4")``, ``get_format("e2m1")``,
``get_format("log2_4")``, ``get_format("binary")``, ``get_format("nf4")``. ``list_formats()`` names them all.
``format_to_dict`` / ``format_from_dict`` write and read any format as JSON (artifacts record their formats so).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

import torch
from torch import Tensor

__all__ = [
    "IntFormat",
    "FloatFormat",
    "LogFormat",
    "TwinUniformFormat",
    "BinaryFormat",
    "TableFormat",
    "NF4_VALUES",
    "Format",
    "format_to_dict",
    "format_from_dict",
    "get_format",
    "list_formats",
    "checking_values",
    "round_ste",
]


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass; identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def checking_values() -> bool:
    """Whether the core's value checks run (codes in range, scales positive, inputs finite): in eager mode always;
    never while ``torch.compile`` or ``torch.export`` traces a model, where reading a tensor back to branch on it
    is a data-dependent graph break. A compiled model runs on values already checked: an artifact's tensors are
    verified when it is loaded, before any module is built; only its inputs go unchecked (NaN in, NaN out)."""
    return not torch.compiler.is_compiling()


def _check_range(t: Tensor, lo: float, hi: float, what: str) -> None:
    """``ValueError`` unless every element of ``t`` lies in [lo, hi] (NaN does not): one reduction, one read-back.
    Meta tensors (shapes without data) pass; so does everything while a graph is traced (``checking_values``)."""
    if t.numel() == 0 or t.is_meta or not checking_values():
        return
    mn, mx = torch.aminmax(t.detach().reshape(-1))
    if not bool((mn >= lo) & (mx <= hi)):
        raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}], got values in [{float(mn):g}, {float(mx):g}]")


def _check_bits(bits: int, lo: int, hi: int, what: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"{what}: bits must be an integer in [{lo}, {hi}], got {bits!r}")


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer format with ``bits`` bits, signed (two's complement) or unsigned."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits, 1, 8, "IntFormat")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        return float(max(abs(self.qmin), self.qmax))

    @property
    def supports_zero_point(self) -> bool:
        return True

    def grid(self) -> Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    def round(self, x: Tensor) -> Tensor:
        return torch.clamp(torch.round(x), self.qmin, self.qmax)

    def round_ste(self, x: Tensor) -> Tensor:
        # Clamp before the STE round: gradient 1 inside [qmin, qmax], 0 outside (clipped STE).
        return round_ste(torch.clamp(x, self.qmin, self.qmax))

    def encode(self, q: Tensor) -> Tensor:
        """Grid values -> unsigned codes 0 .. 2^bits - 1 (offset binary for signed formats); NaN or values outside
        [qmin, qmax] are a ``ValueError`` (``round`` first)."""
        _check_range(q, self.qmin, self.qmax, f"{self.name}: encode takes grid values (call round() first), which")
        return (q.round().to(torch.int32) - self.qmin).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes 0 .. 2^bits - 1 -> grid values (float32); other codes are a ``ValueError``."""
        _check_range(codes, 0, 2**self.bits - 1, f"{self.name}: codes")
        return codes.to(torch.float32) + self.qmin


@dataclass(frozen=True)
class FloatFormat:
    """Minifloat ExMy: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits.

    Args:
        exp_bits: exponent bits E (>= 1).
        man_bits: mantissa bits M (>= 0).
        bias: exponent bias; default 2^(E-1) - 1.
        specials: which bit patterns are not finite numbers.
            "none": every pattern is a number (E2M1, E3M2, ... as in OCP MX FP4/FP6).
            "fn": only S.1..1.1..1 is NaN (OCP E4M3FN, max 448).
            "ieee": the top exponent holds inf/NaN (E5M2, max 57344).
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    specials: Literal["none", "fn", "ieee"] = "none"
    _bias: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bits(self.exp_bits, 1, 8, "FloatFormat exp_bits")
        if not isinstance(self.man_bits, int) or not 0 <= self.man_bits <= 10:
            raise ValueError(f"FloatFormat: man_bits must be an integer in [0, 10], got {self.man_bits!r}")
        if self.specials not in ("none", "fn", "ieee"):
            raise ValueError(f"FloatFormat: specials must be 'none', 'fn' or 'ieee', got {self.specials!r}")
        if self.specials == "fn" and self.exp_bits + self.man_bits < 2:
            raise ValueError("FloatFormat: 'fn' specials need at least 2 exponent+mantissa bits")
        bias = 2 ** (self.exp_bits - 1) - 1 if self.bias is None else self.bias
        object.__setattr__(self, "_bias", int(bias))

    @property
    def name(self) -> str:
        suffix = {"none": "", "fn": "fn", "ieee": ""}[self.specials]
        default_bias = 2 ** (self.exp_bits - 1) - 1
        bias = "" if self._bias == default_bias else f"_b{self._bias}"
        return f"e{self.exp_bits}m{self.man_bits}{suffix}{bias}"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def exponent_bias(self) -> int:
        return self._bias

    @property
    def max_exponent_field(self) -> int:
        top = 2**self.exp_bits - 1
        return top - 1 if self.specials == "ieee" else top

    @property
    def max_value(self) -> float:
        e = self.max_exponent_field
        top_mantissa = 2**self.man_bits - 1
        if self.specials == "fn":
            top_mantissa -= 1  # S.1111.111 is NaN
        if e == 0:  # only subnormals (E1 with bias such that field 1 ... never here) keep it general
            return 2.0 ** (1 - self._bias) * top_mantissa / 2**self.man_bits
        return 2.0 ** (e - self._bias) * (1 + top_mantissa / 2**self.man_bits)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self._bias

    @property
    def supports_zero_point(self) -> bool:
        return False

    def _positive_values(self) -> list[float]:
        values: list[float] = []
        m_count = 2**self.man_bits
        for e in range(0, self.max_exponent_field + 1):
            for m in range(m_count):
                if e == 0:
                    v = 2.0 ** (1 - self._bias) * (m / m_count)
                else:
                    v = 2.0 ** (e - self._bias) * (1 + m / m_count)
                if v <= self.max_value:
                    values.append(v)
        return values

    def grid(self) -> Tensor:
        pos = sorted(set(self._positive_values()))
        neg = [-v for v in reversed(pos) if v > 0]
        return torch.tensor(neg + pos, dtype=torch.float32)

    def step(self, x: Tensor) -> Tensor:
        """The grid spacing at each element of ``x`` (format units): 2^(e - M) with e the binade exponent of |x|,
        clamped to the subnormal range, so round(x / step) * step is the nearest grid value (AdaRound's neighbours
        are floor(x / step) * step and one step above)."""
        absx = x.detach().abs().float()
        e = torch.floor(torch.log2(absx.clamp_min(torch.finfo(torch.float32).tiny)))
        e = e.clamp(min=self.min_normal_exponent)
        return torch.exp2(e - self.man_bits)

    def round(self, x: Tensor) -> Tensor:
        x = torch.clamp(x, -self.max_value, self.max_value)  # saturate first: the step of +-Inf would be Inf
        step = self.step(x)
        return (torch.round(x / step) * step).to(x.dtype)  # round half to even on the mantissa

    def round_ste(self, x: Tensor) -> Tensor:
        x = torch.clamp(x, -self.max_value, self.max_value)
        step = self.step(x)
        return round_ste(x / step) * step

    def encode(self, q: Tensor) -> Tensor:
        """Grid values -> bit patterns (sign | exponent | mantissa) as uint8 (formats of up to 8 bits).

        Runs on ``q``'s device: the lookup tables are built there once (``_fp_tables``).
        """
        if self.bits > 8:
            raise ValueError(f"{self.name}: encode supports formats of at most 8 bits")
        grid, grid_codes, _ = _fp_tables(self, q.device)
        idx = torch.searchsorted(grid, q.float().contiguous().clamp(grid[0], grid[-1]))
        idx = idx.clamp(max=grid.numel() - 1)
        if not torch.equal(grid[idx], q.float()):
            raise ValueError(f"{self.name}: encode got values that are not on the grid; call round() first")
        return grid_codes[idx]

    def decode(self, codes: Tensor) -> Tensor:
        """Bit patterns -> values (float32, NaN for the special patterns), on ``codes``' device; codes outside
        0 .. 2^bits - 1 are a ``ValueError``."""
        _check_range(codes, 0, 2**self.bits - 1, f"{self.name}: codes")
        return _fp_tables(self, codes.device)[2][codes.long()]

    def _pattern_value(self, code: int) -> float:
        sign = -1.0 if code >> (self.exp_bits + self.man_bits) & 1 else 1.0
        e = (code >> self.man_bits) & (2**self.exp_bits - 1)
        m = code & (2**self.man_bits - 1)
        m_count = 2**self.man_bits
        if e > self.max_exponent_field or (
            self.specials == "fn" and e == self.max_exponent_field and m == m_count - 1
        ):
            return math.nan
        if e == 0:
            return sign * 2.0 ** (1 - self._bias) * (m / m_count)
        return sign * 2.0 ** (e - self._bias) * (1 + m / m_count)

    def _code_values(self) -> Tensor:
        return torch.tensor([self._pattern_value(c) for c in range(2**self.bits)], dtype=torch.float32)

    def _grid_codes(self) -> Tensor:
        # +0 (code 0) for zero, otherwise the unique pattern with that value. Python floats, no tensor read back:
        # torch.compile traces this when a graph first needs the tables.
        values = [self._pattern_value(c) for c in range(2**self.bits)]
        pos = sorted(set(self._positive_values()))
        grid = [-v for v in reversed(pos) if v > 0] + pos
        return torch.tensor([values.index(v) for v in grid], dtype=torch.uint8)


@functools.lru_cache(maxsize=64)
def _fp_tables(fmt: FloatFormat, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``fmt``'s lookup tables on ``device``, built once per (format, device) and shared: do not modify them.

    Returns:
        grid (G,) float32 (``fmt.grid()``), the code of each grid value (G,) uint8, and the value of each of the
        2^bits codes (2^bits,) float32.
    """
    with torch.inference_mode(False):  # plain tensors even when first called under inference_mode
        grid, grid_codes, code_values = fmt.grid(), fmt._grid_codes(), fmt._code_values()
        return grid.to(device), grid_codes.to(device), code_values.to(device)


@dataclass(frozen=True)
class LogFormat:
    """Logarithmic format: 0 and base^-k for k in 0 .. 2^bits - 1 (times a sign when signed).

    ``base_log2`` is log2 of the base: 1.0 for log2, 0.5 for log-sqrt2. As in RepQ-ViT and AdaLog, codes
    k >= 2^bits are flushed to zero (a mask), not clamped.

    AdaLog's adaptive base 2^(q/r) (integers q, r; AdaLog fixes r = 37 and searches q) is given exactly as
    ``base_ratio=(q, r)`` (``base_log2`` then is q / r): exponents are computed as -log2|x| * r / q and levels
    as 2^(-k q / r). ``lut=True`` (rational bases only) gives the hardware levels of AdaLog's dequantizer:
    T2[(k q) mod r] * 2^(-floor(k q / r)), with T2[j] = 2^(-j / r) rounded to a step of 1 / (2^(bits+1) - 2).
    """

    bits: int
    base_log2: float = 1.0
    signed: bool = False
    base_ratio: tuple[int, int] | None = None
    lut: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, 1, 8, "LogFormat")
        if self.base_ratio is not None:
            q, r = self.base_ratio
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (q, r)):
                raise ValueError(f"LogFormat: base_ratio must be two positive integers (q, r), got {self.base_ratio!r}")
            if self.base_log2 not in (1.0, q / r):
                raise ValueError(f"LogFormat: base_log2 {self.base_log2!r} contradicts base_ratio {q}/{r}")
            object.__setattr__(self, "base_ratio", (q, r))
            object.__setattr__(self, "base_log2", q / r)
        elif self.lut:
            raise ValueError("LogFormat: lut=True needs a rational base (base_ratio=(q, r))")
        if not self.base_log2 > 0 or not math.isfinite(self.base_log2):
            raise ValueError(f"LogFormat: base_log2 must be a positive finite number, got {self.base_log2!r}")

    @property
    def name(self) -> str:
        if self.base_ratio is not None:
            kind = f"log{self.base_ratio[0]}r{self.base_ratio[1]}{'lut' if self.lut else ''}"
        else:
            kind = {1.0: "log2", 0.5: "logsqrt2"}.get(self.base_log2, f"log{self.base_log2:g}")
        return f"{'s' if self.signed else ''}{kind}_{self.bits}"

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def max_value(self) -> float:
        return 1.0

    @property
    def supports_zero_point(self) -> bool:
        return False

    def magnitude(self, k: Tensor) -> Tensor:
        """base^-k for integer-valued codes ``k`` (float32), exact or from the hardware table (``lut``)."""
        k = k.float()
        if self.base_ratio is None:
            return torch.exp2(-k * self.base_log2)
        q, r = self.base_ratio
        if not self.lut:
            return torch.exp2(-k * q / r)
        kq = torch.round(k * q)  # exact integers
        t1 = torch.floor(kq / r)
        step = 1.0 / (2 ** (self.bits + 1) - 2)
        j = torch.arange(r, dtype=torch.float64)
        table = (torch.round(torch.exp2(-j / r) / step) * step).float().to(k.device)
        return table[(kq - t1 * r).long().clamp(0, r - 1)] * torch.exp2(-t1)

    def grid(self) -> Tensor:
        k = torch.arange(self.levels, dtype=torch.float64)
        if self.base_ratio is None:
            pos = torch.exp2(-k * self.base_log2).float().flip(0)
        else:
            pos = self.magnitude(k).flip(0)
        zero = torch.zeros(1)
        if self.signed:
            return torch.cat([-pos.flip(0), zero, pos])
        return torch.cat([zero, pos])

    def exponent(self, x: Tensor) -> Tensor:
        """k = round(-log2|x| / base_log2) with no clamping (>= levels means zero)."""
        absx = x.detach().abs().float().clamp_min(1e-30)
        if self.base_ratio is not None:
            q, r = self.base_ratio
            return torch.round(-torch.log2(absx) * r / q)
        return torch.round(-torch.log2(absx) / self.base_log2)

    def round(self, x: Tensor) -> Tensor:
        k = self.exponent(x)
        flush = k >= self.levels
        k = k.clamp(0, self.levels - 1)
        mag = self.magnitude(k) if self.base_ratio is not None else torch.exp2(-k * self.base_log2)
        mag = torch.where(flush | (x == 0), torch.zeros_like(mag), mag)
        out = mag * torch.sign(x) if self.signed else torch.where(x < 0, torch.zeros_like(mag), mag)  # NaN stays
        return out.to(x.dtype)

    def round_ste(self, x: Tensor) -> Tensor:
        return x + (self.round(x) - x).detach()

    def encode(self, q: Tensor) -> Tensor:
        """Grid values -> codes: k for base^-k; zero gets code ``levels`` (one more than n bits can hold).

        NaN, negative values and values off the levels are a ``ValueError`` (``round`` first).
        """
        if self.signed:
            raise ValueError("encode of signed log formats is not supported")
        what = f"{self.name}: encode takes grid values (call round() first), which"
        _check_range(q, 0.0, 1.0, what)
        if self.lut:
            grid = self.magnitude(torch.arange(self.levels, dtype=torch.float32, device=q.device))  # decreasing in k
            hits = grid[None, :] == q.float().reshape(-1, 1)  # (N, levels)
            if bool(((q.reshape(-1) != 0) & ~hits.any(dim=1)).any()):
                raise ValueError(f"{what} must be levels of {self.name}; got values that are not")
            idx = hits.float().argmax(dim=1).reshape(q.shape)
            return torch.where(q == 0, torch.full_like(idx, self.levels), idx).to(torch.int32)
        k = self.exponent(q)
        codes = torch.where(q == 0, torch.full_like(k, self.levels), k)
        _check_range(codes, 0, self.levels, f"{what} (as exponents k of base^-k)")
        return codes.to(torch.int32)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes -> values (float32): base^-k for k < levels, 0 for k >= levels; negative codes are a
        ``ValueError``."""
        _check_range(codes, 0, math.inf, f"{self.name}: codes")
        if self.base_ratio is not None:
            mag = self.magnitude(codes.clamp(0, self.levels - 1))
        else:
            mag = torch.exp2(-codes.float() * self.base_log2)
        return torch.where(codes >= self.levels, torch.zeros_like(mag), mag)


@dataclass(frozen=True)
class TwinUniformFormat:
    """PTQ4ViT's twin-uniform format: two uniform ranges of ``bits - 1`` bits each, one more bit picks the range.

    In units of the fine step d1 (the scale) with the coarse step d2 = 2^ratio_log2 * d1, h = 2^(bits-1):

    | ``signed`` | fine range R1                    | coarse range R2                        | a value uses     |
    |------------|----------------------------------|----------------------------------------|------------------|
    | False      | 0, 1, .., h - 1                  | 0, d2, .., (h - 1) d2                  | R1 below h, R2   |
    |            |                                  |                                        | above (softmax)  |
    | True       | -h, .., -1, 0 (negative values)  | 0, d2, .., (h - 1) d2 (non-negative)   | R1 if negative   |
    |            |                                  |                                        | (post-GELU)      |

    A value picks its range first, so ``round`` saturates inside the fine range (h - 0.4 -> h - 1) instead of
    going to the nearer coarse value: PTQ4ViT's rule, not plain round-to-nearest.
    """

    bits: int
    ratio_log2: int = 0
    signed: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, 2, 8, "TwinUniformFormat")
        if not isinstance(self.ratio_log2, int) or isinstance(self.ratio_log2, bool):
            raise ValueError(f"TwinUniformFormat: ratio_log2 must be an integer, got {self.ratio_log2!r}")

    @property
    def name(self) -> str:
        return f"twin{'s' if self.signed else ''}{self.ratio_log2}_{self.bits}"

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def ratio(self) -> float:
        return 2.0**self.ratio_log2

    @property
    def max_value(self) -> float:
        return float(max(self.half - 1, (self.half - 1) * self.ratio))

    @property
    def supports_zero_point(self) -> bool:
        return False

    def grid(self) -> Tensor:
        i = torch.arange(self.half, dtype=torch.float32)
        fine = -i.flip(0) - 1 if self.signed else i
        values = torch.cat([fine, torch.zeros(1), i * self.ratio])
        return torch.unique(values)  # sorted

    def round(self, x: Tensor) -> Tensor:
        h, c = self.half, self.ratio
        coarse = torch.clamp(torch.round(x / c), 0, h - 1) * c
        if self.signed:
            return coarse + torch.clamp(torch.round(x), -h, 0)
        fine = torch.clamp(torch.round(x), 0, h - 1)
        return torch.where(x < h, fine, coarse)

    def round_ste(self, x: Tensor) -> Tensor:
        return x + (self.round(x) - x).detach()

    def encode(self, q: Tensor) -> Tensor:
        raise NotImplementedError("twin-uniform codes are not packed (activations only)")

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError("twin-uniform codes are not packed (activations only)")


@dataclass(frozen=True)
class BinaryFormat:
    """Binary format {-1, +1} (sign); zero maps to +1 as in XNOR-Net / binary embeddings."""

    @property
    def name(self) -> str:
        return "binary"

    @property
    def bits(self) -> int:
        return 1

    @property
    def max_value(self) -> float:
        return 1.0

    @property
    def supports_zero_point(self) -> bool:
        return False

    def grid(self) -> Tensor:
        return torch.tensor([-1.0, 1.0])

    def round(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, torch.ones_like(x), x.clamp(-1.0, -1.0))  # NaN stays NaN (clamp keeps it)

    def round_ste(self, x: Tensor) -> Tensor:
        # Clipped STE (BinaryConnect): gradient 1 where |x| <= 1.
        clipped = x.clamp(-1, 1)
        return clipped + (self.round(x) - clipped).detach()

    def encode(self, q: Tensor) -> Tensor:
        """+1 -> 1, -1 -> 0; anything else (NaN, 0, ...) is a ``ValueError`` (``round`` first)."""
        if q.numel() and not bool(((q == 1) | (q == -1)).all()):
            raise ValueError("binary: encode takes -1 / +1 (call round() first); got other values")
        return (q > 0).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes 0 / 1 -> -1 / +1; other codes are a ``ValueError``."""
        _check_range(codes, 0, 1, "binary: codes")
        return codes.float() * 2 - 1


# QLoRA's NormalFloat4 (NF4): the 16 quantiles of N(0, 1) scaled to [-1, 1] (Dettmers et al. 2023, arXiv:2305.14314).
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class TableFormat:
    """A lookup-table format: code c stands for ``values[c]`` (2 to 256 values, stored at ceil(log2 n) bits).

    Any grid times a scale: NF4, FP4DiT's E3M0 / E1M2 / real-bias grids, log grids (``TableFormat.of(fmt)`` is
    the table of another format's codes). ``round`` goes to the nearest value (ties to the lower one); ``encode``
    gives the first code holding a value. Values are float32 numbers (given as Python floats: JSON round trips
    them exactly).

    Args:
        values: the value of each code, finite.
        label: the format's name (``"nf4"``); default ``"table<bits>"``.
    """

    values: tuple[float, ...]
    label: str = ""

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if not 2 <= len(values) <= 256:
            raise ValueError(f"TableFormat: needs 2 to 256 values, got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError("TableFormat: values must be finite")
        f32 = torch.tensor(values, dtype=torch.float32).tolist()  # the values a float32 tensor holds
        object.__setattr__(self, "values", tuple(f32))
        if not isinstance(self.label, str) or not re.fullmatch(r"[a-z0-9_]*", self.label):
            raise ValueError(f"TableFormat: label must be lowercase letters, digits and '_', got {self.label!r}")

    @classmethod
    def of(cls, fmt: "Format") -> "TableFormat":
        """The table of ``fmt``'s codes: values[c] = fmt.decode(c) for every stored code c (log formats: bits + 1)."""
        bits = fmt.bits + 1 if isinstance(fmt, LogFormat) else fmt.bits
        codes = torch.arange(2**bits)
        return cls(tuple(fmt.decode(codes).tolist()), label=f"table_{fmt.name}".lower().replace(".", "_")
                   .replace("/", "_").replace("-", "_"))

    @property
    def name(self) -> str:
        return self.label or f"table{self.bits}"

    @property
    def bits(self) -> int:
        return max(1, (len(self.values) - 1).bit_length())

    @property
    def max_value(self) -> float:
        return max(abs(v) for v in self.values)

    @property
    def supports_zero_point(self) -> bool:
        return False

    def grid(self) -> Tensor:
        return torch.unique(torch.tensor(self.values, dtype=torch.float32))  # sorted

    def table(self, device: torch.device | str | None = None) -> Tensor:
        """The value of each code, (n,) float32."""
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    def round(self, x: Tensor) -> Tensor:
        grid = self.grid().to(x.device)
        if grid.numel() == 1:
            return torch.where(torch.isnan(x), x, torch.full_like(x, float(grid[0])))
        # x == mid goes to the lower value; NaN sorts after the +inf sentinel (searchsorted tests !(mid >= x)), onto
        # the NaN appended to the grid: NaN stays NaN at no cost
        mids = torch.cat([(grid[1:] + grid[:-1]) / 2, grid.new_full((1,), math.inf)])
        grid = torch.cat([grid, grid.new_full((1,), math.nan)])
        idx = torch.searchsorted(mids, x.float().contiguous(), right=False)
        return grid[idx].to(x.dtype)

    def round_ste(self, x: Tensor) -> Tensor:
        lo, hi = min(self.values), max(self.values)
        clipped = x.clamp(lo, hi)
        return clipped + (self.round(x) - clipped).detach()

    def encode(self, q: Tensor) -> Tensor:
        """Values -> the first code holding each (uint8); values not in the table are an error."""
        table = self.table(q.device)
        order = torch.sort(table, stable=True)
        idx = torch.searchsorted(order.values, q.float().contiguous()).clamp(max=table.numel() - 1)
        if not torch.equal(order.values[idx], q.float()):
            raise ValueError(f"{self.name}: encode got values that are not in the table; call round() first")
        return order.indices[idx].to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes -> values (float32); a code past the table is an error."""
        _check_range(codes, 0, len(self.values) - 1, f"{self.name}: codes")
        return self.table(codes.device)[codes.long()]


Format = Union[IntFormat, FloatFormat, LogFormat, TwinUniformFormat, BinaryFormat, TableFormat]
_FORMAT_TYPES: dict[str, type] = {t.__name__: t for t in (IntFormat, FloatFormat, LogFormat, TwinUniformFormat,
                                                           BinaryFormat, TableFormat)}

# Named minifloats: OCP MX / FP8 conventions; the FP4/FP6 family has no special values.
_FLOATS: dict[str, FloatFormat] = {
    "e2m1": FloatFormat(2, 1),
    "e3m0": FloatFormat(3, 0),
    "e1m2": FloatFormat(1, 2),
    "e2m3": FloatFormat(2, 3),
    "e3m2": FloatFormat(3, 2),
    "e3m4": FloatFormat(3, 4),
    "e4m3": FloatFormat(4, 3, specials="fn"),
    "e5m2": FloatFormat(5, 2, specials="ieee"),
}
_ALIASES = {"fp4": "e2m1", "fp4_e2m1": "e2m1", "fp8": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2",
            "e4m3fn": "e4m3", "fp6_e2m3": "e2m3", "fp6_e3m2": "e3m2"}


def list_formats() -> list[str]:
    """Every name ``get_format`` accepts (aliases and per-bit families spelled out)."""
    names = [f"int{b}" for b in range(1, 9)] + [f"uint{b}" for b in range(1, 9)]
    names += list(_FLOATS) + list(_ALIASES)
    names += [f"{kind}_{b}" for kind in ("log2", "logsqrt2") for b in range(1, 9)]
    names += ["binary", "nf4"]
    return names


def get_format(name: str | Format) -> Format:
    """Look a format up by name: int1..int8, uint1..uint8, e2m1 (fp4), e4m3, e5m2, ..., log2_4, logsqrt2_4,
    binary. A Format instance is returned unchanged."""
    if isinstance(name, tuple(_FORMAT_TYPES.values())):
        return name  # type: ignore[return-value]
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a Format, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _FLOATS:
        return _FLOATS[key]
    if key == "binary":
        return BinaryFormat()
    if key == "nf4":
        return TableFormat(NF4_VALUES, label="nf4")
    if m := re.fullmatch(r"(u?)int(\d+)", key):
        bits = int(m.group(2))
        if not 1 <= bits <= 8:
            raise ValueError(f"unknown format {name!r}: integer formats have 1 to 8 bits")
        return IntFormat(bits, signed=m.group(1) == "")
    if m := re.fullmatch(r"(log2|logsqrt2)_(\d+)", key):
        bits = int(m.group(2))
        if not 1 <= bits <= 8:
            raise ValueError(f"unknown format {name!r}: log formats have 1 to 8 bits")
        return LogFormat(bits, base_log2=1.0 if m.group(1) == "log2" else 0.5)
    close = difflib.get_close_matches(key, list_formats(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown format {name!r}{hint} (see polyquant.formats.list_formats())")


def format_to_dict(fmt: Format) -> dict[str, Any]:
    """JSON of a format: its type and constructor fields (``format_from_dict`` reads it back, equal)."""
    fmt = get_format(fmt)
    out: dict[str, Any] = {"type": type(fmt).__name__}
    for f in fields(fmt):  # type: ignore[arg-type]
        if f.init:
            v = getattr(fmt, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def format_from_dict(data: Any) -> Format:
    """The format a ``format_to_dict`` JSON describes (``ValueError`` for anything else: no other type is built)."""
    if not isinstance(data, dict) or data.get("type") not in _FORMAT_TYPES:
        raise ValueError(f"not a format description: {data!r:.200}")
    cls = _FORMAT_TYPES[data["type"]]
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {k: v for k, v in data.items() if k != "type"}
    if set(kwargs) - names:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(set(kwargs) - names)}")
    for key in ("values", "base_ratio"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{cls.__name__}: {e}") from None
