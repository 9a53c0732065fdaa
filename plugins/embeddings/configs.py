"""Method configs of the embeddings plugin: one ``QuantConfig`` per storage format, all with the same reduction
fields (any reduction combines with any format).

| method   | config         | codes per vector (D' reduced dims)    | scored on the codes by                   |
|----------|----------------|---------------------------------------|------------------------------------------|
| float16  | Float16Config  | D' float16                            | CPU: float32 tiles of the codes x the    |
| bfloat16 | BFloat16Config | D' bfloat16                           | float query (``formats.Codec.upcast``);  |
| fp8_e4m3 | FP8E4M3Config  | D' fp8 E4M3 (+ 4 bytes: vector scale) | CUDA: upcast chunks (floats), the int8   |
| fp8_e5m2 | FP8E5M2Config  | D' fp8 E5M2 (+ 4 bytes: vector scale) | GEMM ``kernels.int8_gemm`` (integers)    |
| int8     | Int8Config     | D' int8, per-dimension absmax steps   |                                          |
| uint8    | UInt8Config    | D' uint8, per-dimension min/max cells | + exact offset terms                     |
| int4     | Int4Config     | ceil(D'/2) bytes, per-dimension cells | + exact offset terms                     |
| binary   | BinaryConfig   | ceil(D'/8) bytes of sign bits         | Hamming top-k (``kernels.hamming_topk``: |
|          |                | (of x - mu with center=True)          | popcount on the CPU, Triton on CUDA)     |

This module imports nothing heavy: the handlers live in ``methods``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from polyquant.config import ConfigError, QuantConfig, float_field, int_field

__all__ = [
    "EmbeddingConfig",
    "Float16Config",
    "BFloat16Config",
    "FP8Config",
    "FP8E4M3Config",
    "FP8E5M2Config",
    "Int8Config",
    "UInt8Config",
    "Int4Config",
    "BinaryConfig",
    "METHODS",
    "method_name",
]

Reduction = Literal["none", "pca", "random", "truncate"]


@dataclass
class EmbeddingConfig(QuantConfig):
    """An embedding store: reduce the dimensionality (optional), then store the vectors in ``FORMAT``.

    Args:
        reduce: dimensionality reduction, fitted on the calibration vectors and applied to the stored vectors and
            the queries: none; pca (project on the top principal directions of the centred calibration vectors);
            random (a seeded Gaussian random projection, see seed); truncate (keep the first dims and
            re-normalise: Matryoshka-trained models).
        keep: fraction of the dimensions the reduction keeps, in (0, 1] (0.5: half; rounded, at least 1; ignored
            when dims is given).
        dims: number of dimensions the reduction keeps (overrides keep).
        calib_size: calibration vectors used to fit the reduction and the format's ranges.
        seed: seed of the random projection.
        keep_originals: also store the original float32 vectors, so that rescoring uses them (4 D bytes more per
            vector).
        rescore: default oversampling of search: k * rescore candidates are found on the codes, then rescored with
            the float query (1: no rescoring).
    """

    VERSION: ClassVar[int] = 1
    FORMAT: ClassVar[str] = ""

    reduce: Reduction = "none"
    keep: float = float_field(1.0, 0.0, 1.0)
    dims: int | None = int_field(None, 1, None)
    calib_size: int = int_field(10_000, 1, None)
    seed: int = int_field(0, 0, 2**31 - 1)
    keep_originals: bool = False
    rescore: int = int_field(1, 1, 1000)

    def validate(self) -> None:
        if self.keep <= 0.0:
            raise ConfigError(f"{type(self).__name__}.keep must be in (0, 1], got {self.keep!r}")
        if self.reduce == "none" and (self.keep != 1.0 or self.dims is not None):
            raise ConfigError(f"{type(self).__name__}: keep / dims need a reduction (reduce=pca, random or truncate)")

    def reduced_dim(self, dim: int) -> int:
        """The dimension vectors of ``dim`` dimensions are reduced to (``ValueError`` if dims exceeds dim)."""
        if self.reduce == "none":
            return dim
        if self.dims is not None:
            if self.dims > dim:
                raise ValueError(f"dims={self.dims} exceeds the {dim} dimensions of the vectors")
            return self.dims
        return max(1, round(self.keep * dim))


@dataclass
class Float16Config(EmbeddingConfig):
    """IEEE float16 codes (saturating at +-65504 instead of overflowing to inf)."""

    FORMAT: ClassVar[str] = "float16"


@dataclass
class BFloat16Config(EmbeddingConfig):
    """bfloat16 codes (8 exponent bits: no overflow, 8 significant bits)."""

    FORMAT: ClassVar[str] = "bfloat16"


@dataclass
class FP8Config(EmbeddingConfig):
    """fp8 codes; a raw cast of unit vectors underflows E4M3 (|x| ~ 0.05 at 384 dims is near its smallest normal),
    so by default each vector is scaled so that its absmax maps to the format's max.

    Args:
        scale: none (raw cast), vector (one float32 scale per vector: absmax / format max) or dimension (one scale
            per dimension, from the calibration absmax).
    """

    scale: Literal["none", "vector", "dimension"] = "vector"


@dataclass
class FP8E4M3Config(FP8Config):
    """fp8 E4M3 (OCP, max 448, 3 mantissa bits) codes with an optional scale."""

    FORMAT: ClassVar[str] = "fp8_e4m3"


@dataclass
class FP8E5M2Config(FP8Config):
    """fp8 E5M2 (IEEE-like, max 57344, 2 mantissa bits) codes with an optional scale."""

    FORMAT: ClassVar[str] = "fp8_e5m2"


@dataclass
class Int8Config(EmbeddingConfig):
    """Symmetric int8 codes: per-dimension step = calibration absmax / 127, x = code * step."""

    FORMAT: ClassVar[str] = "int8"


@dataclass
class UInt8Config(EmbeddingConfig):
    """uint8 codes over per-dimension calibrated [min, max] cut into 256 equal cells, dequantized at the cell
    midpoint: x = min + (code + 0.5) * step (FAISS QT_8bit / sentence-transformers uint8 ranges, dequantized).
    """

    FORMAT: ClassVar[str] = "uint8"


@dataclass
class Int4Config(EmbeddingConfig):
    """4-bit codes over per-dimension calibrated [min, max] cut into 16 cells (midpoints), two codes per byte."""

    FORMAT: ClassVar[str] = "int4"


@dataclass
class BinaryConfig(EmbeddingConfig):
    """One sign bit per dimension, searched by Hamming distance; rescoring (default 4x) uses the float query
    against the decoded signs (sign times a calibrated magnitude) or the original vectors.

    Args:
        rescore: default oversampling of search (4: 4 k Hamming candidates rescored with the float query).
        center: centred codes: the bits of x - mu (mu = the calibration mean per dimension, stored with the codec),
            decoded as mu + sign * mean |x - mu| (``formats`` module docstring); same bytes per vector. Off by
            default: on the docstring benchmark it gains +1.1 / +0.8 points of nDCG@10 retention at 4x rescoring
            (1,000 / 2,463 queries), within the paired standard error (1.3 / 0.8 points).
        magnitude: what a decoded sign is multiplied by: "uniform" (default), one magnitude for every dimension
            (the mean over dimensions of the calibrated mean |x_d|), which ranks rescored candidates exactly as
            sentence-transformers' +-1 / {0, 1} rescoring does (same ids, paired difference 0); or "dimension",
            each dimension's calibrated mean |x_d| (the least-squares decode per dimension): 0.68 +- 0.22 nDCG@10
            points below +-1 on a held-out corpus (issue 28), -0.1 +- 0.5 on the docstring benchmark at 2x, 4x and
            10x (``benchmarks/embeddings.py`` compares both, paired).
    """

    FORMAT: ClassVar[str] = "binary"

    rescore: int = int_field(4, 1, 1000)
    center: bool = False
    magnitude: Literal["uniform", "dimension"] = "uniform"


METHODS: dict[str, type[EmbeddingConfig]] = {
    "float16": Float16Config,
    "bfloat16": BFloat16Config,
    "fp8_e4m3": FP8E4M3Config,
    "fp8_e5m2": FP8E5M2Config,
    "int8": Int8Config,
    "uint8": UInt8Config,
    "int4": Int4Config,
    "binary": BinaryConfig,
}


def method_name(config: EmbeddingConfig) -> str:
    """The method name of a config (``Int8Config()`` -> ``"int8"``)."""
    for name, cls in METHODS.items():
        if type(config) is cls:
            return name
    raise TypeError(f"{type(config).__name__} is not an embeddings method config (methods: {', '.join(METHODS)})")
