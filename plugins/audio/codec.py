"""The tiny codec: a SEANet-style convolutional autoencoder (hop 320 at 16 kHz) with a core VQ bottleneck.

    TinyCodec(quantizer)(wav (B, 1, T)) -> wav_hat (B, 1, T)          .reconstruct(wav) -> (wav_hat, codes, vq loss)
    codec.encode(wav, num_quantizers=None) -> codes (B, T', n) | (B, T', groups, n)     T' = ceil(T / 320)
    codec.decode(codes) -> wav (B, 1, 320 T')
    make_quantizer(spec) -> the core quantizer of a quantizer spec dict (rvq / grvq)
    bitrate(sample_rate, hop, codebook_sizes) -> bits per second

The encoder's strides (2, 4, 5, 8) give 50 frames per second at 16 kHz; each frame is a ``dim``-vector quantized by a
``ResidualVQ`` (EnCodec-style: EMA codebooks with Laplace smoothing, k-means init, dead-code restart) or a
``GroupedResidualVQ`` (HiFi-Codec-style: codebooks learned by gradient). 4 x 1024 codes per frame = 2 kbps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyquant.fsq import FSQ
from polyquant.vq import CODEBOOK_PRESETS, GroupedResidualVQ, ResidualVQ, VectorQuantizer

from .codes import has_kernel_path, kernel_decode, kernel_encode

__all__ = ["STRIDES", "HOP", "SAMPLE_RATE", "Codec", "TinyCodec", "make_quantizer", "bitrate", "QUANTIZER_KINDS",
           "codebook_sizes"]

STRIDES = (2, 4, 5, 8)
HOP = math.prod(STRIDES)  # 320 samples = 20 ms at 16 kHz
SAMPLE_RATE = 16_000
QUANTIZER_KINDS = ("rvq", "grvq", "dac")


class ResUnit(nn.Module):
    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c, c // 2, 3, dilation=dilation, padding=dilation)
        self.conv2 = nn.Conv1d(c // 2, c, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T) -> (B, C, T)
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.res = nn.Sequential(ResUnit(c_in, 1), ResUnit(c_in, 3))
        self.conv = nn.Conv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T / stride)
        return self.conv(F.elu(self.res(x)))


class Up(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        p = math.ceil(stride / 2)
        self.conv = nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=p, output_padding=2 * p - stride)
        self.res = nn.Sequential(ResUnit(c_out, 1), ResUnit(c_out, 3))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T) -> (B, C_out, T * stride)
        return self.res(self.conv(F.elu(x)))


class Encoder(nn.Module):
    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        c = channels
        self.inp = nn.Conv1d(1, c, 7, padding=3)
        blocks = []
        for s in STRIDES:
            blocks.append(Down(c, 2 * c, s))
            c *= 2
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv1d(c, dim, 3, padding=1)

    def forward(self, wav: Tensor) -> Tensor:  # (B, 1, T) -> (B, D, T / 320)
        return self.out(F.elu(self.blocks(self.inp(wav))))


class Decoder(nn.Module):
    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        c = channels * 2 ** len(STRIDES)
        self.inp = nn.Conv1d(dim, c, 7, padding=3)
        blocks = []
        for s in reversed(STRIDES):
            blocks.append(Up(c, c // 2, s))
            c //= 2
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv1d(c, 1, 7, padding=3)

    def forward(self, z: Tensor) -> Tensor:  # (B, D, T') -> (B, 1, 320 T')
        return self.out(F.elu(self.blocks(self.inp(z))))


def make_quantizer(spec: dict[str, Any], dim: int) -> nn.Module:
    """The bottleneck of a quantizer spec: ``{"kind": "rvq", "num_quantizers": 4, "codebook_size": 1024}`` (EnCodec
    style: EMA + Laplace smoothing, k-means init, dead-code threshold 2, quantizer dropout) or ``{"kind": "grvq",
    "groups": 2, "num_quantizers": 2, "codebook_size": 1024}`` (HiFi-Codec style: codebooks learned by gradient,
    commitment 0.25, U(+-1/K) init) or ``{"kind": "dac", "num_quantizers": 4, "codebook_size": 1024, "code_dim": 8}``
    (DAC style: factorized 8-d codes searched by cosine, learned codebooks, codebook 1 + commitment 0.25, quantizer
    dropout)."""
    kind = spec.get("kind")
    n, k = int(spec.get("num_quantizers", 4)), int(spec.get("codebook_size", 1024))
    if kind == "rvq":
        return ResidualVQ(dim=dim, num_quantizers=n, codebook_size=k, quantizer_dropout=True, decay=0.99,
                          kmeans_init=True, kmeans_iters=50, threshold_dead_code=2.0,
                          options=CODEBOOK_PRESETS["encodec"])
    if kind == "grvq":
        return GroupedResidualVQ(dim=dim, groups=int(spec.get("groups", 2)), num_quantizers=n, codebook_size=k,
                                 kmeans_init=False, commitment_weight=0.25, options=CODEBOOK_PRESETS["hificodec"])
    if kind == "dac":
        return ResidualVQ(dim=dim, num_quantizers=n, codebook_size=k, quantizer_dropout=True, kmeans_init=False,
                          commitment_weight=0.25, factorized_dim=int(spec.get("code_dim", 8)),
                          options=CODEBOOK_PRESETS["dac"])
    raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}, got {kind!r}")


def codebook_sizes(quantizer: nn.Module) -> list[int]:
    """K of every code of a frame: one per RVQ stage and group (its VectorQuantizer), or per FSQ group (its implicit
    grid of prod(levels) codes)."""
    return [int(m.codebook_size) for m in quantizer.modules() if isinstance(m, (VectorQuantizer, FSQ))]


def bitrate(sample_rate: int, hop: int, sizes: list[int]) -> float:
    """(sample_rate / hop) * sum(log2 K_q), bits per second."""
    return sample_rate / hop * sum(math.log2(k) for k in sizes)


class Codec(nn.Module):
    """A codec as the plugin's methods see it: ``latent(wav (B, 1, T)) -> frames (B, T', dim)``, ``synthesize(frames)
    -> wav``, a ``quantizer`` on the frames, ``sample_rate``, ``hop`` (samples per frame) and ``dim``. Subclasses
    write ``latent`` and ``synthesize``; forward, encode / decode (on ``polyquant.kernels`` for RVQ / GRVQ) and the
    bitrate are shared."""

    quantizer: nn.Module
    sample_rate: int
    hop: int
    dim: int

    def latent(self, wav: Tensor) -> Tensor:
        raise NotImplementedError

    def synthesize(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def reconstruct(self, wav: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: (wav_hat (B, 1, T) with the quantizer's straight-through gradient, codes, vq loss)."""
        z_hat, codes, loss = self.quantizer(self.latent(wav))
        return self.synthesize(z_hat)[..., : wav.shape[-1]], codes, loss

    def forward(self, wav: Tensor) -> Tensor:
        """(B, 1, T) -> the reconstruction (B, 1, T) through the quantizer."""
        return self.reconstruct(wav)[0]

    def _kernels(self) -> bool:
        """RVQ / GRVQ bottlenecks with Euclidean search run on ``polyquant.kernels`` (torch reference on CPU)."""
        return has_kernel_path(self.quantizer)

    @torch.no_grad()
    def encode(self, wav: Tensor, num_quantizers: int | None = None) -> Tensor:
        """(B, 1, T) -> codes (B, T', n) (RVQ), (B, T', G, n) (GRVQ) or the bottleneck's own; the first
        ``num_quantizers`` stages only when given."""
        z = self.latent(wav)
        if self._kernels():
            return kernel_encode(self.quantizer, z, num_quantizers)
        if num_quantizers is None:
            return self.quantizer.encode(z)
        return self.quantizer.encode(z, num_quantizers=num_quantizers)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes (of the first n <= n_q stages) -> (B, 1, hop T')."""
        if self._kernels() and codes.numel() and not bool((codes < 0).any()):
            return self.synthesize(kernel_decode(self.quantizer, codes))
        return self.synthesize(self.quantizer.decode(codes))

    def bitrate(self) -> float:
        return bitrate(self.sample_rate, self.hop, codebook_sizes(self.quantizer))

    @property
    def codebook_size(self) -> int:
        """K of the bottleneck's codes (one K for every stage and group; what a code file stores them at)."""
        sizes = set(codebook_sizes(self.quantizer))
        if len(sizes) != 1:
            raise ValueError(f"the bottleneck's codes have codebook sizes {sorted(sizes)}, not one K")
        return sizes.pop()

    def code_bitrate(self, codes: Tensor) -> float:
        """Bits per second of codes (B, T', *per frame), e.g. of the first levels only."""
        return bitrate(self.sample_rate, self.hop, [self.codebook_size] * math.prod(codes.shape[2:]))


class TinyCodec(Codec):
    """wav (B, 1, T) -> latent (B, D, T/320) -> the quantizer on each frame's D-vector -> wav."""

    def __init__(self, quantizer: nn.Module, channels: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(channels, dim), Decoder(channels, dim)
        self.quantizer = quantizer
        self.sample_rate, self.hop, self.dim = SAMPLE_RATE, HOP, dim

    def latent(self, wav: Tensor) -> Tensor:
        """(B, 1, T) -> frames (B, T', D), T' = ceil(T / hop) (right-padded with zeros)."""
        return self.encoder(F.pad(wav, (0, -wav.shape[-1] % self.hop))).transpose(1, 2)

    def synthesize(self, z: Tensor) -> Tensor:
        """frames (B, T', D) -> (B, 1, hop T')."""
        return self.decoder(z.transpose(1, 2))
