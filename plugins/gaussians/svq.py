"""OMG's sub-vector quantization (SVQ; Lee et al. 2025, "Optimized Minimal 3D Gaussian Splatting", code
maincold2/OMG ``apply_svq``) of a plain 3DGS scene's attributes.

An attribute matrix A (N, D) is cut into M = D / L sub-vectors of length L; sub-vector m has its own codebook
C_m (K_m, L), fitted by k-means on that slice alone (the core's ``ProductVQ``; OMG: cuML KMeans, n_init=1,
max_iter 1000), and i_{n,m} = argmin_k |A_{n, mL:(m+1)L} - C_m[k]|^2. The assignments are then frozen; the codebooks
are stored at fp16 (rounded here, then every vector re-assigned to its nearest fp16 codeword with the kernels'
``vq_assign``), so the saved scene is the one the model renders. OMG's own layout quantizes scale (log space,
3 x 1-d, K = 64), rotation (raw quaternion, 2 x 2-d, K = 512) and its 6-d appearance features (3 x 2-d, K = 1024;
``omg.py``); a plain 3DGS scene has no appearance features, so its opacity, SH-DC and SH-rest get slices of their
own (configurable L and K). Positions are not quantized: fp16, coded losslessly (``coding.py``).

``finetune_steps`` > 0 trains the codebooks against renders of the float scene (assignments frozen, L1 loss,
Adam); the default 0 is OMG's behaviour (its codebooks sit under Adam at lr 1e-8: effectively frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from polyquant.config import QuantConfig, UsageError, float_field, int_field
from polyquant.kernels import vq_assign
from polyquant.vq import ProductVQ

from .model import VQAttribute, attribute_matrix
from .scene import GaussianScene

__all__ = ["SVQConfig", "Layout", "svq_layout", "fit_attribute", "fit_layout", "check_layout"]

# attribute -> (slice lengths, codebook sizes)
Layout = dict[str, tuple[list[int], list[int]]]


@dataclass
class SVQConfig(QuantConfig):
    """OMG sub-vector quantization of a 3DGS scene's attributes (positions kept at fp16, coded losslessly).

    Args:
        scale_slice: sub-vector length L of the log scales (D = 3).
        scale_k: codes per scale sub-vector (OMG: 64).
        rotation_slice: L of the raw quaternions (D = 4).
        rotation_k: codes per rotation sub-vector (OMG: 512).
        opacity_k: codes of the opacity logit (D = 1, L = 1).
        dc_slice: L of the SH-DC colour (D = 3).
        dc_k: codes per SH-DC sub-vector.
        rest_slice: L of the higher SH bands, flattened band-major (D = 3B: L = 3 is one band's RGB).
        rest_k: codes per SH-rest sub-vector.
        kmeans_iters: Lloyd iterations per slice (stops early at convergence; OMG: max_iter 1000).
        finetune_steps: codebook fine-tuning steps against renders of the float scene (0: OMG's frozen codebooks).
        finetune_lr: Adam learning rate of the fine-tuning.
        seed: seeds k-means++ (slice m of attribute a: seed + 100 a + m) and the fine-tuning's view order.
    """

    scale_slice: Literal[1, 3] = 1
    scale_k: int = int_field(64, 2, 65536)
    rotation_slice: Literal[1, 2, 4] = 2
    rotation_k: int = int_field(512, 2, 65536)
    opacity_k: int = int_field(64, 2, 65536)
    dc_slice: Literal[1, 3] = 3
    dc_k: int = int_field(1024, 2, 65536)
    rest_slice: Literal[1, 3, 9, 15, 45] = 3
    rest_k: int = int_field(256, 2, 65536)
    kmeans_iters: int = int_field(100, 1, 1000)
    finetune_steps: int = int_field(0, 0, 100_000)
    finetune_lr: float = float_field(1e-3, 1e-8, 1.0)
    seed: int = int_field(0, 0, 2**31 - 1)


def _slices(dim: int, length: int, what: str) -> list[int]:
    if dim % length:
        raise UsageError(f"{what}: slice length {length} does not divide its {dim} values")
    return [length] * (dim // length)


def svq_layout(config: SVQConfig, sh_degree: int) -> Layout:
    """Slices and codebook sizes per attribute of a plain 3DGS scene (no sh_rest at degree 0)."""
    layout: Layout = {}
    for name, dim, length, k in (("scale", 3, config.scale_slice, config.scale_k),
                                 ("rotation", 4, config.rotation_slice, config.rotation_k),
                                 ("opacity", 1, 1, config.opacity_k),
                                 ("sh_dc", 3, config.dc_slice, config.dc_k)):
        s = _slices(dim, length, name)
        layout[name] = (s, [k] * len(s))
    bands = (sh_degree + 1) ** 2 - 1
    if bands:
        s = _slices(3 * bands, config.rest_slice, f"sh_rest (degree {sh_degree})")
        layout["sh_rest"] = (s, [config.rest_k] * len(s))
    return layout


def check_layout(layout: Layout, num_gaussians: int) -> None:
    """``UsageError`` for a scene with fewer Gaussians than some codebook has entries."""
    worst = max((k, name) for name, (_, sizes) in layout.items() for k in sizes)
    if num_gaussians < worst[0]:
        raise UsageError(f"the scene has {num_gaussians} Gaussians, fewer than the {worst[0]} entries of the "
                         f"{worst[1]} codebook: lower its K")


@torch.no_grad()
def fit_attribute(values: Tensor, slices: list[int], sizes: list[int], *, iters: int, seed: int) -> VQAttribute:
    """k-means per slice (core ``ProductVQ.fit``), codebooks rounded to fp16, every vector assigned to its nearest
    fp16 codeword per slice (``polyquant.kernels.vq_assign``); returns the frozen codes with their quantizer."""
    quantizer = ProductVQ(dim=values.shape[1], slices=slices, codebook_size=sizes, kmeans_iters=iters, seed=seed)
    quantizer = quantizer.to(values.device).fit(values.float())
    codes = []
    for vq, part in zip(quantizer.quantizers, values.float().split(slices, dim=1)):
        vq.set_codebook(vq.embed.half().float())
        codes.append(vq_assign(part.contiguous(), vq.embed)[0])
    return VQAttribute(quantizer.eval(), torch.stack(codes, dim=1))


def fit_layout(scene: GaussianScene, layout: Layout, *, iters: int, seed: int,
               progress: bool = False) -> dict[str, VQAttribute]:
    """``fit_attribute`` for every attribute of the layout (attribute a seeded seed + 100 a)."""
    from tqdm.auto import tqdm

    check_layout(layout, scene.num_gaussians)
    out = {}
    for a, (name, (slices, sizes)) in enumerate(tqdm(layout.items(), desc="k-means per attribute",
                                                     disable=not progress, leave=False)):
        out[name] = fit_attribute(attribute_matrix(scene, name), slices, sizes, iters=iters, seed=seed + 100 * a)
    return out
