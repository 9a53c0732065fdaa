"""The ``vq`` baseline: full-vector VQ of each attribute with as many codebook entries as SVQ gives it.

Where SVQ cuts attribute a into M_a sub-vectors with K_a codes each (M_a K_a entries, each of L_a values), this
baseline fits one codebook of M_a K_a whole D_a-vectors (k-means, fp16 codebooks, frozen assignments: the same
pipeline as ``svq.fit_layout``). Equal entry counts: the comparison OMG makes for its SVQ (an attribute whose
SVQ layout is already a single slice is the same in both).
"""

from __future__ import annotations

from dataclasses import dataclass

from .svq import SVQConfig, Layout, svq_layout

__all__ = ["VQConfig", "vq_layout"]


@dataclass
class VQConfig(SVQConfig):
    """Full-vector VQ baseline: per attribute, one codebook with the entries SVQ's layout (the same options) has.

    Args:
        scale_slice: as SVQ (sets the entry count: 3 / L codebooks of scale_k entries).
        scale_k: as SVQ.
        rotation_slice: as SVQ.
        rotation_k: as SVQ.
        opacity_k: as SVQ.
        dc_slice: as SVQ.
        dc_k: as SVQ.
        rest_slice: as SVQ.
        rest_k: as SVQ.
        kmeans_iters: Lloyd iterations.
        finetune_steps: codebook fine-tuning steps against renders (0: frozen).
        finetune_lr: Adam learning rate of the fine-tuning.
        seed: seeds k-means++ and the fine-tuning.
    """


def vq_layout(config: VQConfig, sh_degree: int) -> Layout:
    """One slice of the whole attribute per attribute, with the sum of SVQ's codebook sizes as its K."""
    return {name: ([sum(slices)], [sum(sizes)]) for name, (slices, sizes) in svq_layout(config, sh_degree).items()}
