"""EnCodec (Defossez et al. 2022) from the ``encodec`` package or from ``transformers`` as this plugin's codec, so that
every method (rvq / grvq / fsq refits, ptq of the convolutions) and the code files apply to it.

    from_encodec(model, bandwidth=6.0) -> EncodecCodec       encodec.EncodecModel (mono, no normalization, no
                                                             segments: the 24 kHz model)
    from_transformers(model, bandwidth=6.0) -> EncodecCodec  transformers.EncodecModel (same conditions)
    build_encodec(model_config) -> EncodecCodec              seeded random-init skeletons, for ``polyquant.load``

The adapter keeps EnCodec's encoder and decoder (weight normalization folded: ``polyquant.surgery.fold_weight_norm``,
the forward unchanged) and copies its residual quantizer's first n_q codebooks into a core ``ResidualVQ`` (n_q from
the bandwidth by EnCodec's rule), so the adapter's codes are EnCodec's own (tested). Pretrained weights download
from the hub, which this machine cannot reach: the tests run random-init models with random codebooks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.api import describe_model
from polyquant.config import UsageError
from polyquant.surgery import fold_weight_norm
from polyquant.vq import CODEBOOK_PRESETS, ResidualVQ

from .codec import Codec

__all__ = ["EncodecCodec", "from_encodec", "from_transformers", "build_encodec", "rvq_from_codebooks"]


def rvq_from_codebooks(codebooks: list[Tensor]) -> ResidualVQ:
    """A core ResidualVQ (EnCodec's EMA settings) holding these (K, D) codebooks, one per stage."""
    k, d = codebooks[0].shape
    rvq = ResidualVQ(dim=d, num_quantizers=len(codebooks), codebook_size=k, decay=0.99, kmeans_init=True,
                     kmeans_iters=50, threshold_dead_code=2.0, options=CODEBOOK_PRESETS["encodec"])
    for layer, book in zip(rvq.layers, codebooks):
        layer.set_codebook(book.detach().float().cpu())
    return rvq.eval()


class EncodecCodec(Codec):
    """EnCodec's SEANet encoder and decoder around a core ResidualVQ on its frames."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: nn.Module, *, sample_rate: int, hop: int,
                 dim: int) -> None:
        super().__init__()
        fold_weight_norm(encoder)
        fold_weight_norm(decoder)
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.sample_rate, self.hop, self.dim = sample_rate, hop, dim

    def latent(self, wav: Tensor) -> Tensor:
        return self.encoder(wav).transpose(1, 2)  # (B, 1, T) -> (B, T', D)

    def synthesize(self, z: Tensor) -> Tensor:
        return self.decoder(z.transpose(1, 2))  # (B, T', D) -> (B, 1, hop T')


def _stages(bits_per_frame: float, bandwidth: float | None, available: int) -> int:
    if bandwidth is None:
        return available
    n = max(1, int(math.floor(bandwidth * 1000 / bits_per_frame)))  # EnCodec's get_num_quantizers_for_bandwidth
    return min(n, available)


def _check_plain(normalize: bool, segment: Any, channels: int) -> None:
    if normalize or segment or channels != 1:
        raise UsageError("the adapter takes a mono EnCodec without audio normalization or segments (the 24 kHz "
                         "model); the 48 kHz stereo model normalizes and overlaps segments")


def from_encodec(model: nn.Module, bandwidth: float | None = 6.0) -> EncodecCodec:
    """An ``encodec.EncodecModel`` as a codec; its first n_q codebooks (n_q for ``bandwidth`` kbps) become a core
    ResidualVQ. The model's modules are shared, not copied."""
    _check_plain(model.normalize, model.segment, model.channels)
    frame_rate = model.frame_rate
    n = _stages(math.log2(model.quantizer.bins) * frame_rate, bandwidth, model.quantizer.n_q)
    books = [layer.codebook for layer in model.quantizer.vq.layers[:n]]
    hop = int(math.prod(model.encoder.ratios))
    return EncodecCodec(model.encoder, model.decoder, rvq_from_codebooks(books), sample_rate=model.sample_rate,
                        hop=hop, dim=model.quantizer.dimension)


def from_transformers(model: nn.Module, bandwidth: float | None = 6.0) -> EncodecCodec:
    """A ``transformers.EncodecModel`` as a codec (see ``from_encodec``)."""
    cfg = model.config
    _check_plain(bool(cfg.normalize), cfg.chunk_length_s, cfg.audio_channels)
    n = _stages(math.log2(cfg.codebook_size) * cfg.frame_rate, bandwidth, len(model.quantizer.layers))
    books = [layer.codebook.embed for layer in model.quantizer.layers[:n]]
    return EncodecCodec(model.encoder, model.decoder, rvq_from_codebooks(books), sample_rate=cfg.sampling_rate,
                        hop=cfg.hop_length, dim=cfg.codebook_dim)


def build_encodec(model_config: dict[str, Any]) -> EncodecCodec:
    """A seeded random-init skeleton: ``{"encodec": "24khz", "bandwidth": 6.0, "seed": 0}`` (the ``encodec``
    package's 24 kHz architecture) or ``{"transformers": {EncodecConfig fields}, "bandwidth": ..., "seed": 0}``;
    ``polyquant.load`` then loads the artifact's weights into it."""
    seed = int(model_config.get("seed", 0))
    bandwidth = model_config.get("bandwidth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_config.get("encodec") == "24khz":
            from encodec import EncodecModel

            codec = from_encodec(EncodecModel.encodec_model_24khz(pretrained=False), bandwidth)
        elif isinstance(model_config.get("transformers"), dict):
            from transformers import EncodecConfig, EncodecModel as HFEncodec

            codec = from_transformers(HFEncodec(EncodecConfig(**model_config["transformers"])), bandwidth)
        else:
            raise UsageError(f"an EnCodec model config needs 'encodec': '24khz' or 'transformers': {{...}}, got "
                             f"{sorted(model_config)}")
    return describe_model(codec.eval(), dict(model_config))
