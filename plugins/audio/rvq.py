"""RVQ bottleneck, EnCodec-style (Defossez et al. 2022, "High Fidelity Neural Audio Compression"; code
facebookresearch/encodec ``quantization/core_vq.py``), fitted post-training on a codec's latent frames.

The codec keeps its encoder and decoder; its bottleneck becomes a core ``ResidualVQ`` of ``n_q`` stages of K codes,
n_q = floor(bandwidth / (frame_rate log2 K)) (EnCodec's rule), fitted on the calibration audio's frames:
greedy stage-wise k-means (``kmeans_iters``; EnCodec: 50), then ``epochs`` EMA passes (decay 0.99, Laplace
smoothing) with dead-code restart (EMA count below ``threshold_dead_code``, EnCodec: 2) at random frames of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from polyquant.config import ConfigError, QuantConfig, float_field, int_field

__all__ = ["RVQConfig", "stages_for"]


def stages_for(bandwidth_kbps: float, frame_rate: float, codebook_size: int, groups: int = 1) -> int:
    """Codebooks per group that fit the bandwidth: floor(bw * 1000 / (frame_rate * log2 K * groups)), EnCodec's
    n_q rule (``EncodecModel.set_target_bandwidth``) split over groups."""
    return int(math.floor(bandwidth_kbps * 1000 / (frame_rate * math.log2(codebook_size) * groups) + 1e-9))


@dataclass
class RVQConfig(QuantConfig):
    """EnCodec-style residual VQ bottleneck, fitted on the codec's latent frames of the calibration audio.

    Args:
        bandwidth: target kbps; the number of stages is floor(bandwidth * 1000 / (frame_rate * log2 K)).
        codebook_size: codes K per stage.
        kmeans_iters: Lloyd iterations of the stage-wise k-means init (0: the seeded randn init of
            vector-quantize-pytorch, left to the EMA passes).
        epochs: EMA passes over the calibration frames after the init.
        threshold_dead_code: restart codes whose EMA count falls below this at random frames (0: no restart).
        decay: EMA decay of the codebook statistics.
        batch_frames: frames per EMA batch (the k-means counts that start the EMA are per all calibration frames,
            so batches as large as the calibration set keep the dead-code threshold on one scale).
        seed: seeds the init, k-means and restarts.
    """

    bandwidth: float = float_field(2.0, 0.01, 1000.0)
    codebook_size: int = int_field(1024, 2, 65536)
    kmeans_iters: int = int_field(50, 0, 1000)
    epochs: int = int_field(2, 0, 1000)
    threshold_dead_code: float = float_field(2.0, 0.0, 1e6)
    decay: float = float_field(0.99, 0.0, 0.9999)
    batch_frames: int = int_field(65536, 16, 1 << 24)
    seed: int = int_field(0, 0, 2**31 - 1)

    def validate(self) -> None:
        if self.kmeans_iters == 0 and self.epochs == 0:
            raise ConfigError("RVQConfig: kmeans_iters and epochs are both 0: the codebooks would stay random")
