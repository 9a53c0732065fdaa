"""CenterHead targets, losses and decoding, shared by training and by TGPL's pseudo-labels.

| function            | what                                                                                     |
|---------------------|------------------------------------------------------------------------------------------|
| ``render_targets``  | boxes + labels -> Gaussian heatmap (B, 2, H, W), regression (B, 8, H, W) and the centre  |
|                     | mask (B, H, W) (offset 2, z 1, log size 3, sin/cos yaw 2 at each box's centre cell)       |
| ``focal_loss``      | CenterNet's penalty-reduced focal loss on the heatmap logits, per positive               |
| ``regression_l1``   | L1 of the regression outputs at the centre cells, per positive                           |
| ``decode``          | head output -> per-scene boxes (M, 7), labels, scores (3x3 max-pool peaks, top-K)         |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .model import HEAD_SLICES, GridConfig, gaussian_radius
from .synthetic import CLASSES

__all__ = ["Targets", "Detections", "render_targets", "focal_loss", "regression_l1", "detection_loss", "decode"]


@dataclass
class Targets:
    """CenterHead targets of a batch (see the module docstring)."""

    heatmap: Tensor  # (B, C, H, W) in [0, 1], 1 at centres
    regression: Tensor  # (B, 8, H, W), valid where ``centres``
    centres: Tensor  # (B, H, W) bool


@dataclass
class Detections:
    """Decoded boxes of one scene: (M, 7) cx, cy, cz, l, w, h, yaw; labels (M,); scores (M,)."""

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    cells: Tensor | None = None  # (M, 2) the (row, column) of each detection's heatmap peak on the output grid


def render_targets(boxes: list[Tensor], labels: list[Tensor], grid: GridConfig,
                   cells: list[Tensor] | None = None) -> Targets:
    """Targets for each scene's boxes (M_i, 7) and labels (M_i,) on the head's output grid.

    A box's centre cell is the one holding its centre, or with ``cells`` ((M_i, 2) rows and columns, e.g. the
    peaks ``decode`` found) that cell: a pseudo-label then sits on the float model's own peak even where the
    model's offset points outside it.
    """
    b, size, cell = len(boxes), grid.out_cells, grid.out_cell
    heat = torch.zeros(b, len(CLASSES), size, size)
    reg = torch.zeros(b, 8, size, size)
    centres = torch.zeros(b, size, size, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for i, (bx, lab) in enumerate(zip(boxes, labels)):
        peaks = None if cells is None else cells[i].tolist()
        for k, (box, c) in enumerate(zip(bx.tolist(), lab.tolist())):
            fx, fy = box[0] / cell, (box[1] + grid.extent / 2) / cell
            iy, ix = (int(math.floor(fy)), int(math.floor(fx))) if peaks is None else peaks[k]
            if not (0 <= ix < size and 0 <= iy < size):
                continue
            radius = gaussian_radius(box[3], box[4], cell)
            sigma = (2 * radius + 1) / 6
            g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma * sigma))
            g[(xs - ix).abs() > radius] = 0
            g[(ys - iy).abs() > radius] = 0
            heat[i, c] = torch.maximum(heat[i, c], g)
            reg[i, :, iy, ix] = torch.tensor([fx - ix, fy - iy, box[2], math.log(box[3]), math.log(box[4]),
                                              math.log(box[5]), math.sin(box[6]), math.cos(box[6])])
            centres[i, iy, ix] = True
    return Targets(heat, reg, centres)


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's focal loss (alpha 2, beta 4) of heatmap logits against a Gaussian target, per positive."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1.0 - pos
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * (1 - target).pow(4) * neg).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def regression_l1(output: Tensor, targets: Targets) -> Tensor:
    """L1 of the 8 regression channels at the centre cells, summed over channels, per positive."""
    reg = output[:, 2:].float()  # (B, 8, H, W)
    mask = targets.centres[:, None].float()
    return ((reg - targets.regression).abs() * mask).sum() / mask.sum().clamp_min(1.0)


def detection_loss(output: Tensor, targets: Targets, reg_weight: float = 1.0) -> Tensor:
    """Focal loss on the heatmap plus ``reg_weight`` x L1 on the regression (CenterPoint's training loss)."""
    return focal_loss(output[:, HEAD_SLICES["heatmap"]], targets.heatmap) + reg_weight * regression_l1(output,
                                                                                                      targets)


def decode(output: Tensor, grid: GridConfig, *, top_k: int = 64, threshold: float = 0.05) -> list[Detections]:
    """Boxes of each scene: heatmap peaks (3x3 max-pool), the ``top_k`` best above ``threshold``."""
    out = output.detach().float()
    b, _, size, _ = out.shape
    heat = torch.sigmoid(out[:, HEAD_SLICES["heatmap"]])
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    classes = heat.shape[1]
    result = []
    for i in range(b):
        scores, flat = peaks[i].reshape(-1).topk(min(top_k, peaks[i].numel()))
        keep = scores > threshold
        scores, flat = scores[keep], flat[keep]
        labels = flat // (size * size)
        cell_index = flat % (size * size)
        iy, ix = cell_index // size, cell_index % size
        reg = out[i, 2:, iy, ix].T  # (M, 8)
        cx = (ix.float() + reg[:, 0]) * grid.out_cell
        cy = (iy.float() + reg[:, 1]) * grid.out_cell - grid.extent / 2
        dims = reg[:, 3:6].clamp(-5, 5).exp()
        yaw = torch.atan2(reg[:, 6], reg[:, 7])
        boxes = torch.stack([cx, cy, reg[:, 2], dims[:, 0], dims[:, 1], dims[:, 2], yaw], 1)
        result.append(Detections(boxes, labels.clamp(max=classes - 1), scores, torch.stack([iy, ix], 1)))
    return result
