"""A pure-torch CenterPoint-Pillar detector: PFN (Linear-BN-ReLU-max) -> scatter to BEV -> 3-stage 2D backbone
with an upsampling neck -> CenterHead (heatmap, offset, z, log-size, sin/cos yaw).

The pillars are computed inside ``forward`` from padded point clouds (``points`` (B, N, 4), ``mask`` (B, N)), so
every module's input and output is batched by scene: the core's calibration and block reconstruction see one row
per scene. The PFN runs on every point and max-pools per pillar (PointPillars without the per-pillar point cap);
padding rows (``mask`` False) fall in no pillar; ``pad_clouds`` also fills them with a real point of their scene, so
their PFN inputs stay in the data's range.

| module           | input -> output                                    | notes                                         |
|------------------|----------------------------------------------------|-----------------------------------------------|
| ``pfn``          | (B, 9, N) point features -> (B, C, N)              | 1x1 Conv1d (Linear) + BatchNorm1d + ReLU      |
| scatter          | (B, C, N) -> (B, C, H, W)                          | max per pillar; empty pillars are 0           |
| ``backbone.k``   | (B, C_k, H_k, W_k) -> (B, C_k+1, H_k/2, W_k/2)     | stride-2 conv + 2 convs, BN, ReLU             |
| ``neck``         | 3 stage outputs -> (B, 3 * neck_channels, H/2, W/2)| conv / transposed convs to stride 2, concat   |
| ``head``         | -> (B, 2 + 2 + 1 + 3 + 2, H/2, W/2)                | heatmap logits, offset, z, log size, sin/cos  |

The 9 point features are x, y, z, intensity, the offsets to the pillar's point mean (3) and to the pillar's
centre (2): raw x reaches ``extent`` metres, so the PFN input has the large coordinate values LiDAR-PTQ names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .synthetic import CLASSES, Scene

__all__ = ["GridConfig", "HEAD_SLICES", "CenterPointPillar", "check_points", "pad_clouds", "scene_batch",
           "point_features", "occupancy", "gaussian_radius"]

HEAD_SLICES = {"heatmap": slice(0, 2), "offset": slice(2, 4), "z": slice(4, 5), "size": slice(5, 8),
               "rot": slice(8, 10)}
NUM_FEATURES = 4  # x, y, z, intensity


@dataclass(frozen=True)
class GridConfig:
    """The BEV grid and the network's widths.

    Args:
        extent: side of the square area, metres (x in [0, extent], y in [-extent/2, extent/2]).
        cells: pillars per side.
        pfn_channels: PFN output channels.
        channels: output channels of the three backbone stages (each halves the resolution).
        neck_channels: channels of each neck branch (three branches, concatenated).
        head_channels: channels of the head's shared conv.
    """

    extent: float = 40.0
    cells: int = 64
    pfn_channels: int = 32
    channels: tuple[int, int, int] = (32, 64, 96)
    neck_channels: int = 32
    head_channels: int = 32

    @property
    def pillar(self) -> float:
        return self.extent / self.cells

    @property
    def out_cells(self) -> int:
        return self.cells // 2

    @property
    def out_cell(self) -> float:
        return self.extent / self.out_cells

    def to_dict(self) -> dict[str, object]:
        return {"extent": self.extent, "cells": self.cells, "pfn_channels": self.pfn_channels,
                "channels": list(self.channels), "neck_channels": self.neck_channels,
                "head_channels": self.head_channels}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "GridConfig":
        keys = {"extent", "cells", "pfn_channels", "channels", "neck_channels", "head_channels"}
        if not isinstance(data, dict) or not set(data) <= keys:
            raise ValueError(f"not a lidar GridConfig: {data!r:.200}")
        values = dict(data)
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


def check_points(points: Tensor, what: str = "point cloud", features: int = NUM_FEATURES) -> None:
    """Raise ``ValueError`` for a cloud that is not (N, ``features``) finite floats with N >= 1."""
    if not isinstance(points, Tensor) or points.dim() != 2:
        raise ValueError(f"{what}: expected an (N, {features}) tensor of points, got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if points.shape[1] != features:
        names = " (x, y, z, intensity)" if features == NUM_FEATURES else ""
        raise ValueError(f"{what}: points have {points.shape[1]} features; this detector reads {features}{names}")
    if points.shape[0] == 0:
        raise ValueError(f"{what}: the cloud is empty (0 points)")
    if not torch.isfinite(points).all():
        raise ValueError(f"{what}: the cloud holds NaN or infinite values")


def pad_clouds(clouds: list[Tensor], size: int | None = None, features: int = NUM_FEATURES) -> tuple[Tensor, Tensor]:
    """Stack clouds of ``features`` columns into (B, N, features) and a validity mask (B, N); padding rows repeat
    each cloud's first point."""
    for i, c in enumerate(clouds):
        check_points(c, f"point cloud {i}", features)
    n = size if size is not None else max(c.shape[0] for c in clouds)
    points = torch.empty(len(clouds), n, features)
    mask = torch.zeros(len(clouds), n, dtype=torch.bool)
    for i, c in enumerate(clouds):
        c = c[:n].float()
        points[i, : c.shape[0]] = c
        points[i, c.shape[0]:] = c[0]
        mask[i, : c.shape[0]] = True
    return points, mask


def scene_batch(scenes: list[Scene], size: int | None = None) -> dict[str, Tensor]:
    """The model's input for a list of scenes: ``{"points": (B, N, 4), "mask": (B, N)}``."""
    points, mask = pad_clouds([s.points for s in scenes], size)
    return {"points": points, "mask": mask}


def point_features(points: Tensor, mask: Tensor, grid: GridConfig) -> tuple[Tensor, Tensor]:
    """The 9 PFN features (B, N, 9) and each point's pillar index (B, N) (``cells**2``, a slot the scatter drops,
    for points outside the grid and for padding rows)."""
    b, n, _ = points.shape
    cells = grid.cells
    ix = torch.floor(points[..., 0] / grid.pillar).long()
    iy = torch.floor((points[..., 1] + grid.extent / 2) / grid.pillar).long()
    inside = (ix >= 0) & (ix < cells) & (iy >= 0) & (iy < cells) & mask  # padding rows go nowhere
    index = torch.where(inside, iy * cells + ix, torch.full_like(ix, cells * cells))
    counted = inside.to(points.dtype)
    sums = points.new_zeros(b, cells * cells + 1, 3).scatter_add_(1, index[..., None].expand(-1, -1, 3),
                                                                   points[..., :3] * counted[..., None])
    counts = points.new_zeros(b, cells * cells + 1).scatter_add_(1, index, counted)
    means = sums / counts.clamp_min(1.0)[..., None]
    cluster = points[..., :3] - means.gather(1, index[..., None].expand(-1, -1, 3))
    centre_x = (ix.to(points.dtype) + 0.5) * grid.pillar
    centre_y = (iy.to(points.dtype) + 0.5) * grid.pillar - grid.extent / 2
    centre = torch.stack([points[..., 0] - centre_x, points[..., 1] - centre_y], -1)
    return torch.cat([points, cluster, centre], -1), index


class PillarFeatureNet(nn.Module):
    """PointPillars' PFN layer, Linear-BN-ReLU per point, as a 1x1 Conv1d over the points (the same map; it
    folds with its BatchNorm1d by ``polyquant.surgery.fold_batchnorm``). The max per pillar is the scatter."""

    def __init__(self, in_features: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_features, channels, 1, bias=False)
        self.norm = nn.BatchNorm1d(channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # (B, 9, N) -> (B, C, N)
        return self.act(self.norm(self.linear(x)))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Neck(nn.Module):
    """Brings the three stage outputs to the output stride (2) and concatenates them."""

    def __init__(self, channels: tuple[int, int, int], out: int) -> None:
        super().__init__()
        self.up0 = nn.Sequential(nn.Conv2d(channels[0], out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(channels[1], out, 2, stride=2, bias=False), nn.BatchNorm2d(out),
                                 nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(channels[2], out, 4, stride=4, bias=False), nn.BatchNorm2d(out),
                                 nn.ReLU())

    def forward(self, x0: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat([self.up0(x0), self.up1(x1), self.up2(x2)], 1)


class CenterHead(nn.Module):
    """Shared 3x3 conv, then one 1x1 conv per output group; returns the concatenation (see ``HEAD_SLICES``)."""

    def __init__(self, cin: int, channels: int, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.shared = nn.Sequential(*_conv_bn(cin, channels))
        self.heatmap = nn.Conv2d(channels, num_classes, 1)
        self.regression = nn.Conv2d(channels, 8, 1)
        nn.init.constant_(self.heatmap.bias, -2.19)  # CenterNet's prior: sigmoid(-2.19) = 0.1

    def forward(self, x: Tensor) -> Tensor:
        y = self.shared(x)
        return torch.cat([self.heatmap(y), self.regression(y)], 1)


class CenterPointPillar(nn.Module):
    """The detector: ``model(points=(B, N, 4), mask=(B, N)) -> (B, 10, H/2, W/2)`` raw head outputs (no mask:
    every row is a point)."""

    def __init__(self, grid: GridConfig | None = None) -> None:
        super().__init__()
        self.grid = grid or GridConfig()
        g = self.grid
        self.pfn = PillarFeatureNet(9, g.pfn_channels)
        cins = (g.pfn_channels,) + g.channels[:2]
        self.backbone = nn.ModuleList(
            nn.Sequential(*_conv_bn(cin, cout, 2), *_conv_bn(cout, cout), *_conv_bn(cout, cout))
            for cin, cout in zip(cins, g.channels))
        self.neck = Neck(g.channels, g.neck_channels)
        self.head = CenterHead(3 * g.neck_channels, g.head_channels)

    def scatter(self, features: Tensor, index: Tensor) -> Tensor:
        """Max of the point features per pillar: (B, C, N) -> (B, C, H, W); empty pillars are 0."""
        b, c, _ = features.shape
        cells = self.grid.cells
        canvas = features.new_zeros(b, c, cells * cells + 1)
        canvas = canvas.scatter_reduce(2, index[:, None].expand(-1, c, -1), features, "amax", include_self=True)
        return canvas[:, :, :-1].reshape(b, c, cells, cells)

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones(points.shape[:2], dtype=torch.bool, device=points.device)
        features, index = point_features(points, mask, self.grid)
        x = self.scatter(self.pfn(features.transpose(1, 2)), index)
        outs = []
        for stage in self.backbone:
            x = stage(x)
            outs.append(x)
        # Stage 0 runs at stride 2 (the output stride); stages 1 and 2 at 4 and 8.
        return self.head(self.neck(*outs))


def occupancy(points: Tensor, mask: Tensor, grid: GridConfig) -> Tensor:
    """(B, 1, cells, cells) 1.0 where a pillar holds a point (the non-empty BEV cells), else 0.0."""
    _, index = point_features(points, mask, grid)
    b = points.shape[0]
    occ = points.new_zeros(b, grid.cells**2 + 1).scatter_(1, index, 1.0)
    return occ[:, :-1].reshape(b, 1, grid.cells, grid.cells)


def gaussian_radius(length: float, width: float, cell: float, min_overlap: float = 0.1) -> int:
    """CenterPoint's heatmap radius (in output cells) for a box of ``length`` x ``width`` metres (>= 1 cell)."""
    h, w = length / cell, width / cell
    a1, b1, c1 = 1.0, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 * b1 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 * b2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 * b3 - 4 * a3 * c3)) / 2
    return max(1, int(min(r1, r2, r3)))
