"""OMG's representation (Lee et al. 2025, "Optimized Minimal 3D Gaussian Splatting"; code maincold2/OMG
``scene/gaussian_model.py``): per Gaussian only position, log scale, raw quaternion and two 3-d features, a static
f_s (initialised from SH-DC) and a view feature f_v (initialised to zero); small MLPs predict the rest:

    c = MLP_cont(Freq16(contract(xyz)))  in R^13         (ReLU)
    DC = MLP_dc([c, f_s]),  opacity = sigmoid(MLP_op([c, f_s])),  SH_rest = MLP_view([c, f_v])   (LeakyReLU)

``contract`` maps the scene's AABB to [-1, 1]^3, then x -> (2 - 1/|x|) x/|x| where |x| > 1, then x/4 + 0.5;
``Freq16`` is tiny-cuda-nn's frequency encoding (sin and cos of 2^i pi x, i < 16). The MLPs are one hidden layer of
64 (``nn.Linear`` in place of tiny-cuda-nn's fused MLPs), stored at fp16. SVQ then quantizes scale (3 x 1-d,
K = 64), rotation (2 x 2-d, K = 512) and the 6-d appearance [f_s, f_v] (3 x 2-d, K = 1024): 66 index bits
(8.25 B) per Gaussian.

OMG trains all of it from scratch with the scene (30k iterations, SVQ at 29k). Post-training, from a fitted 3DGS
scene, the handler here: (1) distils the MLPs and features from the scene's own opacity / SH (attribute-space MSE,
full batch, Adam lr 0.01 for the MLPs as OMG, ``feature_lr`` for the features); (2) optionally trains them against
renders of the float scene (``render_steps``); (3) applies SVQ (``svq.fit_attribute``); (4) with the codes frozen,
trains the MLPs against renders for ``post_steps`` (OMG's last 1k iterations, where its codebooks sit at lr 1e-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from polyquant.config import QuantConfig, float_field, int_field

from .scene import GaussianScene

__all__ = ["OMGConfig", "OMGDecoder", "contract", "frequency_encoding", "distill"]

CONT_DIM = 13


@dataclass
class OMGConfig(QuantConfig):
    """OMG: attribute MLPs on static / view features, then sub-vector quantization of scale, rotation and features.

    Args:
        scale_k: codes per scale sub-vector (3 x 1-d; OMG: 64).
        rotation_k: codes per rotation sub-vector (2 x 2-d; OMG: 512).
        appearance_k: codes per appearance sub-vector (OMG: 1024).
        appearance_slice: sub-vector length of the 6-d [f_s, f_v] (OMG: 2).
        hidden: hidden width of each MLP (OMG: 64).
        frequencies: frequencies of the positional encoding (OMG: 16).
        distill_steps: full-batch steps fitting the MLPs and features to the scene's opacity and SH.
        render_steps: steps against renders of the float scene before SVQ (needs calibration cameras).
        post_steps: steps against renders after SVQ, codes frozen, MLPs trained (OMG's last iterations).
        lr: Adam learning rate of the MLPs (OMG: 0.01).
        feature_lr: Adam learning rate of f_s and f_v.
        kmeans_iters: Lloyd iterations per SVQ slice.
        seed: seeds the MLP init, k-means++ and the view order.
    """

    scale_k: int = int_field(64, 2, 65536)
    rotation_k: int = int_field(512, 2, 65536)
    appearance_k: int = int_field(1024, 2, 65536)
    appearance_slice: Literal[1, 2, 3, 6] = 2
    hidden: int = int_field(64, 4, 1024)
    frequencies: int = int_field(16, 1, 16)
    distill_steps: int = int_field(1500, 0, 1_000_000)
    render_steps: int = int_field(0, 0, 1_000_000)
    post_steps: int = int_field(100, 0, 1_000_000)
    lr: float = float_field(0.01, 1e-6, 1.0)
    feature_lr: float = float_field(0.01, 1e-6, 1.0)
    kmeans_iters: int = int_field(100, 1, 1000)
    seed: int = int_field(0, 0, 2**31 - 1)


def contract(x: Tensor, aabb: Tensor) -> Tensor:
    """Positions (N, 3) -> [0, 1]^3: the AABB (2, 3) to [-1, 1]^3, the unit-sphere contraction of the points outside
    the unit ball, then x / 4 + 0.5 (OMG's ``contract_to_unisphere``)."""
    lo, hi = aabb[0], aabb[1]
    x = 2 * (x - lo) / (hi - lo).clamp(min=1e-12) - 1
    mag = x.norm(dim=-1, keepdim=True)
    x = torch.where(mag > 1, (2 - 1 / mag.clamp(min=1e-12)) * (x / mag.clamp(min=1e-12)), x)
    return x / 4 + 0.5


def frequency_encoding(x: Tensor, frequencies: int) -> Tensor:
    """(N, D) -> (N, D * 2F): sin and cos of 2^i pi x for i < F (tiny-cuda-nn's ``Frequency`` encoding)."""
    scales = (2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device)) * math.pi
    arg = x[..., None] * scales  # (N, D, F)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).flatten(1)


def _mlp(inp: int, hidden: int, out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), act, nn.Linear(hidden, out))


class OMGDecoder(nn.Module):
    """The attribute MLPs: (positions (N, 3), appearance [f_s, f_v] (N, 6)) -> opacity logits (N, 1), sh_dc (N, 3),
    sh_rest (N, 3B) band-major (``model.attribute_matrix``'s layout)."""

    def __init__(self, aabb: Tensor, sh_degree: int, hidden: int = 64, frequencies: int = 16) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb.float().clone())
        self.frequencies = int(frequencies)
        self.rest_dim = 3 * ((sh_degree + 1) ** 2 - 1)
        self.mlp_cont = _mlp(3 * 2 * frequencies, hidden, CONT_DIM, nn.ReLU())
        self.mlp_dc = _mlp(CONT_DIM + 3, hidden, 3, nn.LeakyReLU())
        self.mlp_opacity = _mlp(CONT_DIM + 3, hidden, 1, nn.LeakyReLU())
        self.mlp_view = _mlp(CONT_DIM + 3, hidden, max(1, self.rest_dim), nn.LeakyReLU())

    def forward(self, xyz: Tensor, appearance: Tensor) -> dict[str, Tensor]:
        c = self.mlp_cont(frequency_encoding(contract(xyz, self.aabb), self.frequencies))
        f_s, f_v = appearance[:, :3], appearance[:, 3:]
        static = torch.cat([c, f_s], dim=1)
        out = {"opacity": self.mlp_opacity(static), "sh_dc": self.mlp_dc(static)}
        if self.rest_dim:
            out["sh_rest"] = self.mlp_view(torch.cat([c, f_v], dim=1))
        return out

    def round_to_half(self) -> "OMGDecoder":
        """Weights rounded to fp16 values (what the artifact stores), kept in float32."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.half().float())
        return self


def scene_aabb(xyz: Tensor) -> Tensor:
    """(2, 3) min / max of the positions, widened by 1e-3 of the extent (no zero-width axis)."""
    lo, hi = xyz.min(0).values, xyz.max(0).values
    pad = 1e-3 * (hi - lo).max().clamp(min=1e-3)
    return torch.stack([lo - pad, hi + pad])


def distill(decoder: OMGDecoder, xyz: Tensor, scene: GaussianScene, appearance: Tensor, *, steps: int, lr: float,
            feature_lr: float, progress: bool = False) -> list[float]:
    """Fit the MLPs and the (leaf) ``appearance`` features to the scene's opacity logits, SH-DC and SH-rest (MSE,
    full batch, each target normalised by its variance); returns the losses."""
    from tqdm.auto import tqdm

    targets = {"opacity": scene.opacity, "sh_dc": scene.sh_dc,
               "sh_rest": scene.sh_rest.reshape(scene.num_gaussians, -1)}
    weights = {k: 1.0 / float(v.var().clamp(min=1e-8)) for k, v in targets.items() if v.numel()}
    opt = torch.optim.Adam([{"params": list(decoder.parameters()), "lr": lr},
                            {"params": [appearance], "lr": feature_lr}])
    losses = []
    for _ in tqdm(range(steps), desc="OMG attribute MLPs", disable=not progress, leave=False):
        out = decoder(xyz, appearance)
        loss = sum(w * (out[k] - targets[k]).pow(2).mean() for k, w in weights.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
