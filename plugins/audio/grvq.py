"""Group-residual VQ bottleneck (Yang et al. 2023, "HiFi-Codec: Group-residual Vector quantization for High Fidelity
Audio Codec"; code yangdongchao/AcademiCodec ``models/hificodec``), fitted post-training on a codec's latent frames.

The latent's D channels split into ``groups`` slices (HiFi-Codec: 2), each with its own RVQ of n layers (HiFi-Codec:
2), n = floor(bandwidth / (frame_rate log2 K groups)); the codes (B, T, G, n) become tokens in HiFi-Codec's order
(L0g0, L0g1, L1g0, L1g1; ``codes.token_grid``). HiFi-Codec learns its codebooks by gradient inside codec training
(the shipped ``tiny-grvq`` codec does); fitted post-training here, each group's RVQ gets RVQConfig's procedure
(stage-wise k-means, EMA passes, dead-code restart).
"""

from __future__ import annotations

from dataclasses import dataclass

from polyquant.config import ConfigError, int_field

from .rvq import RVQConfig

__all__ = ["GRVQConfig"]


@dataclass
class GRVQConfig(RVQConfig):
    """HiFi-Codec-style group-residual VQ bottleneck: an RVQ per channel group.

    Args:
        groups: channel groups (the latent size must divide by it); the stages per group follow from bandwidth.
    """

    groups: int = int_field(2, 1, 64)

    def validate(self) -> None:
        super().validate()
        if self.groups < 1:
            raise ConfigError("GRVQConfig.groups must be >= 1")
