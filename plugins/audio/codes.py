"""Codec code streams: encode / decode through the shared kernels, token grids, ResGen cumulative embeddings, and
code files packed at ceil(log2 K) bits.

    has_kernel_path(quantizer) -> bool                            RVQ / GRVQ with L2-searched codebooks
    kernel_encode(quantizer, z, num_quantizers=None) -> codes     polyquant.kernels.rvq_assign per group
    kernel_decode(quantizer, codes) -> z_hat                      polyquant.kernels.rvq_decode per group
    token_grid(codes) -> tokens (B, T, levels)                    RVQ (B, T, n) as is; GRVQ (B, T, G, n) layer-major
    from_token_grid(tokens, groups) -> codes                      the inverse (HiFi-Codec order L0g0, L0g1, L1g0, ...)
    cumulative_embedding(quantizer, tokens, masked) -> (B, T, D)  sum of the codewords at the masked depths (ResGen)
    save_codes(path, codes, codebook_size, meta) / load_codes(path) -> (codes, meta)

``quantizer``: a core ``ResidualVQ`` or a ``GroupedResidualVQ`` of them (Euclidean search; the kernels have no cosine
path). Skipped stages (-1 codes) decode only through the module (``quantizer.decode``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.checkpoint import read_checkpoint, save_checkpoint
from polyquant.kernels import rvq_assign, rvq_decode
from polyquant.pack import pack_bits, unpack_bits
from polyquant.vq import GroupedResidualVQ, ResidualVQ, check_codes

__all__ = ["has_kernel_path", "kernel_encode", "kernel_decode", "token_grid", "from_token_grid", "cumulative_embedding", "save_codes",
           "load_codes", "code_bits", "MAX_CODE_FILE_BYTES"]

MAX_CODE_FILE_BYTES = 1 << 30
_FORMAT = "polyquant-audio-codes"


def _residual_vqs(quantizer: nn.Module) -> list[ResidualVQ]:
    """The RVQs of a ResidualVQ / GroupedResidualVQ (one per group), [] for any other quantizer."""
    if isinstance(quantizer, ResidualVQ):
        return [quantizer]
    if isinstance(quantizer, GroupedResidualVQ):
        return list(quantizer.quantizers)  # type: ignore[arg-type]
    return []


def has_kernel_path(quantizer: nn.Module) -> bool:
    """Whether ``kernel_encode`` / ``kernel_decode`` take this quantizer: RVQ or GRVQ stages with codebooks in the
    frames' space searched by L2 (not DAC's factorized stages, not a cosine search)."""
    rvqs = _residual_vqs(quantizer)
    return bool(rvqs) and all(r.factorized_dim is None and not any(layer.options.cosine for layer in r.layers)
                              for r in rvqs)


def _rvqs(quantizer: nn.Module) -> list[ResidualVQ]:
    if not has_kernel_path(quantizer):
        raise ValueError(f"{type(quantizer).__name__} has no kernel path (the kernels take RVQ / GRVQ codebooks in "
                         "the frames' space, searched by L2)")
    return _residual_vqs(quantizer)


@torch.no_grad()
def kernel_encode(quantizer: nn.Module, z: Tensor, num_quantizers: int | None = None) -> Tensor:
    """Codes of frames z (..., D) through ``polyquant.kernels.rvq_assign``: (..., n) or (..., G, n)."""
    rvqs = _rvqs(quantizer)
    parts = z.split(quantizer.sizes, dim=-1) if isinstance(quantizer, GroupedResidualVQ) else (z,)
    codes = []
    for rvq, part in zip(rvqs, parts):
        n = rvq.num_quantizers if num_quantizers is None else num_quantizers
        if not 1 <= n <= rvq.num_quantizers:
            raise ValueError(f"num_quantizers must be in 1..{rvq.num_quantizers}, got {n}")
        codes.append(rvq_assign(part, rvq.codebooks[:n].to(part.device)))
    return codes[0] if isinstance(quantizer, ResidualVQ) else torch.stack(codes, dim=-2)


@torch.no_grad()
def kernel_decode(quantizer: nn.Module, codes: Tensor) -> Tensor:
    """Frames of codes (..., n) or (..., G, n) in [0, K) through ``polyquant.kernels.rvq_decode``."""
    rvqs = _rvqs(quantizer)
    k = rvqs[0].layers[0].codebook_size
    check_codes(codes, 0, k, "kernel_decode")
    groups = [codes] if isinstance(quantizer, ResidualVQ) else list(codes.unbind(-2))
    if len(groups) != len(rvqs) or any(g.shape[-1] > r.num_quantizers for g, r in zip(groups, rvqs)):
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit this quantizer")
    out = [rvq_decode(g, r.codebooks[: g.shape[-1]].to(g.device)) for g, r in zip(groups, rvqs)]
    return torch.cat(out, dim=-1)


def token_grid(codes: Tensor) -> Tensor:
    """(B, T, n) RVQ codes as they are; (B, T, G, n) GRVQ codes as (B, T, n G) in HiFi-Codec's order (layer-major:
    L0g0, L0g1, L1g0, L1g1): what a generator consumes (VALL-E: AR on level 0, NAR on the rest)."""
    if codes.dim() == 3:
        return codes
    if codes.dim() != 4:
        raise ValueError(f"codes must be (B, T, n) or (B, T, G, n), got {tuple(codes.shape)}")
    b, t, g, n = codes.shape
    return codes.transpose(-1, -2).reshape(b, t, n * g)


def from_token_grid(tokens: Tensor, groups: int) -> Tensor:
    """Inverse of ``token_grid``: (B, T, levels) -> (B, T, n) for groups=1, else (B, T, G, levels / G)."""
    if tokens.dim() != 3 or groups < 1 or tokens.shape[-1] % groups:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not split into {groups} groups")
    if groups == 1:
        return tokens
    b, t, levels = tokens.shape
    return tokens.reshape(b, t, levels // groups, groups).transpose(-1, -2)


def cumulative_embedding(quantizer: nn.Module, tokens: Tensor, masked: Tensor) -> Tensor:
    """ResGen's target: per position, the sum of the codewords at the masked depths (``masked`` (B, T, levels) bool,
    True = masked) -> (B, T, D); the unmasked depths contribute nothing. Depth order is ``token_grid``'s."""
    if masked.shape != tokens.shape:
        raise ValueError(f"masked {tuple(masked.shape)} must have the tokens' shape {tuple(tokens.shape)}")
    groups = len(quantizer.quantizers) if isinstance(quantizer, GroupedResidualVQ) else 1
    kept = torch.where(masked.bool(), tokens, torch.full_like(tokens, -1))  # -1: the stage is skipped
    return quantizer.decode(from_token_grid(kept, groups))


def code_bits(codebook_size: int) -> int:
    """ceil(log2 K): bits per stored code (at least 1)."""
    return max(1, math.ceil(math.log2(codebook_size)))


def save_codes(path: str | os.PathLike[str], codes: Tensor, codebook_size: int, meta: dict[str, Any]) -> Path:
    """Write integer codes in [0, K) packed at ceil(log2 K) bits (``polyquant.pack.pack_bits``) with their shape and
    ``meta`` (JSON: sample rate, hop, samples, model, ...) to a safetensors file, atomically."""
    bits = code_bits(codebook_size)
    check_codes(codes, 0, codebook_size, "save_codes")
    header = {"format": _FORMAT, "bits": bits, "codebook_size": codebook_size, "shape": list(codes.shape), **meta}
    return save_checkpoint({"codes": pack_bits(codes.to(torch.int64).cpu(), bits)}, path,
                           {"polyquant_codes": json.dumps(header)})


def load_codes(path: str | os.PathLike[str]) -> tuple[Tensor, dict[str, Any]]:
    """(codes int64 of the stored shape, header) of a ``save_codes`` file; ``ValueError`` (one line) for anything
    else: not a code file, a header that does not fit the tensor, codes out of [0, K)."""
    p = Path(path)
    if p.is_file() and p.stat().st_size > MAX_CODE_FILE_BYTES:
        raise ValueError(f"{p}: larger than {MAX_CODE_FILE_BYTES} bytes, not a code file")
    tensors, metadata = read_checkpoint(p)
    try:
        header = json.loads(metadata["polyquant_codes"])
        assert header["format"] == _FORMAT
        bits, k, shape = int(header["bits"]), int(header["codebook_size"]), [int(s) for s in header["shape"]]
        assert 2 <= k <= 1 << 16 and bits == code_bits(k) and 1 <= len(shape) <= 8 and min(shape) >= 0
        assert set(tensors) == {"codes"} and tensors["codes"].dtype == torch.uint8
    except (KeyError, ValueError, TypeError, AssertionError, json.JSONDecodeError):
        raise ValueError(f"{p} is not a polyquant audio code file") from None
    try:
        codes = unpack_bits(tensors["codes"], bits, math.prod(shape)).to(torch.int64).view(shape)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    try:
        check_codes(codes, 0, k, str(p))
    except ValueError as e:
        raise ValueError(f"{p}: codes out of range: {e}") from None
    return codes, header
