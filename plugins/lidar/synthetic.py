"""Seeded synthetic LiDAR scenes: the sparsity and range that make standard PTQ fail on point-cloud detectors.

A forward-looking sensor at the origin, 1.8 m above a flat ground, sees a 40 x 40 m area (x in [0, 40], y in
[-20, 20]; ``SceneConfig(extent=...)`` widens it). Each scene holds 0..``max_objects`` oriented boxes, cars
(about 4.2 x 1.8 x 1.5 m) and pedestrians (about 0.8 x 0.8 x 1.7 m), that do not overlap. Points fall on:

- the ground, with density ~ 1/r^2 (range r drawn with density proportional to 1/r over the area, i.e. points
  per square metre ~ 1/r^2), intensity 0.05..0.3;
- each object's sensor-facing vertical faces, ``points_per_m2 * projected area / r^2`` of them, uniformly on the
  face, Gaussian noise of ``noise`` m, intensity by class (cars brighter, their front face brightest) plus noise.
  A car also gets its hood: 60% of its height over the front 35% of its length.

There is no ray-cast occlusion: a box behind another is still seen (the detector's task gets easier, the
quantization argument is unchanged). With the default 64 x 64 pillar grid over 40 x 40 m, about 85-90% of the
BEV cells are empty and raw x reaches 40 m: the two facts LiDAR-PTQ's sparsity-based calibration answers.

A scene is ``Scene(points (N, 4) float32: x, y, z, intensity; boxes (M, 7): cx, cy, cz, length, width, height,
yaw; labels (M,) int64: 0 car, 1 pedestrian)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CLASSES", "SceneConfig", "Scene", "make_scene", "make_scenes", "empty_fraction"]

CLASSES = ("car", "pedestrian")
SENSOR_HEIGHT = 1.8  # metres above the ground; z is measured from the ground
_SIZES = {0: (4.2, 1.8, 1.5), 1: (0.8, 0.8, 1.7)}  # (length, width, height) means
_INTENSITY = {0: 0.6, 1: 0.35}


@dataclass(frozen=True)
class SceneConfig:
    """What a synthetic scene looks like.

    Args:
        extent: side of the square area in metres (x in [0, extent], y in [-extent/2, extent/2]).
        max_objects: objects per scene are drawn uniformly from 0..max_objects.
        pedestrian_fraction: probability that an object is a pedestrian.
        ground_points: ground points per scene.
        points_per_m2: object point density at 1 m (points per square metre of projected face area x 1/r^2).
        noise: standard deviation of the point position noise, metres.
        min_range: no object centre is closer than this to the sensor, metres.
    """

    extent: float = 40.0
    max_objects: int = 15
    pedestrian_fraction: float = 0.35
    ground_points: int = 600
    points_per_m2: float = 1500.0
    noise: float = 0.03
    min_range: float = 3.0

    def __post_init__(self) -> None:
        if not 8.0 <= self.extent <= 400.0:
            raise ValueError(f"extent must be in [8, 400] metres, got {self.extent}")
        if not 0 <= self.max_objects <= 200:
            raise ValueError(f"max_objects must be in [0, 200], got {self.max_objects}")
        if not 0.0 <= self.pedestrian_fraction <= 1.0:
            raise ValueError(f"pedestrian_fraction is a probability, got {self.pedestrian_fraction}")
        if self.ground_points < 1 or self.points_per_m2 <= 0 or self.noise < 0 or self.min_range < 0:
            raise ValueError("ground_points >= 1, points_per_m2 > 0, noise >= 0 and min_range >= 0 are required")


@dataclass
class Scene:
    """One LiDAR sweep and its ground truth (see the module docstring for the columns)."""

    points: Tensor  # (N, 4) float32
    boxes: Tensor  # (M, 7) float32
    labels: Tensor  # (M,) int64


def _corners(box: Tensor) -> Tensor:
    """The 4 BEV corners (4, 2) of a box (cx, cy, cz, l, w, h, yaw), counter-clockwise from front-left."""
    cx, cy, _, length, width, _, yaw = box.tolist()
    c, s = math.cos(yaw), math.sin(yaw)
    local = torch.tensor([[length / 2, width / 2], [-length / 2, width / 2], [-length / 2, -width / 2],
                          [length / 2, -width / 2]])
    rot = torch.tensor([[c, -s], [s, c]])
    return local @ rot.T + torch.tensor([cx, cy])


def _overlaps(box: Tensor, others: list[Tensor]) -> bool:
    r = 0.5 * math.hypot(float(box[3]), float(box[4]))
    return any(math.hypot(float(box[0] - o[0]), float(box[1] - o[1])) < r + 0.5 * math.hypot(float(o[3]),
                                                                                             float(o[4])) + 0.3
               for o in others)


def _face_points(p0: Tensor, p1: Tensor, z0: float, z1: float, n: int, g: torch.Generator) -> Tensor:
    """``n`` points uniform on the vertical rectangle over the segment p0 -> p1, heights z0..z1: (n, 3)."""
    u = torch.rand(n, 1, generator=g)
    xy = p0 + u * (p1 - p0)
    z = z0 + torch.rand(n, 1, generator=g) * (z1 - z0)
    return torch.cat([xy, z], 1)


def _object_points(box: Tensor, label: int, config: SceneConfig, g: torch.Generator) -> Tensor:
    """Points (N, 4) on the sensor-facing faces of one box."""
    corners = _corners(box)
    centre = box[:2]
    height = float(box[5])
    faces: list[tuple[Tensor, Tensor, float, float, float]] = []  # p0, p1, z0, z1, intensity
    for i in range(4):
        p0, p1 = corners[i], corners[(i + 1) % 4]
        faces.append((p0, p1, 0.0, height, _INTENSITY[label] + (0.25 if label == 0 and i == 3 else 0.0)))
    if label == 0:  # the hood: a lower face over the front 35% of the car (the cabin above the rest)
        cab = corners.clone()
        cab[0] = corners[0] + 0.35 * (corners[1] - corners[0])
        cab[3] = corners[3] + 0.35 * (corners[2] - corners[3])
        faces = [(a, b, z0, 0.6 * z1 if k in (0, 2, 3) else z1, inten) for k, (a, b, z0, z1, inten) in
                 enumerate(faces)]
        faces.append((cab[3], cab[0], 0.6 * height, height, _INTENSITY[0]))  # the windscreen
        faces.append((cab[0], corners[1], 0.6 * height, height, _INTENSITY[0]))
        faces.append((corners[2], cab[3], 0.6 * height, height, _INTENSITY[0]))
    parts = []
    for p0, p1, z0, z1, inten in faces:
        mid = 0.5 * (p0 + p1)
        edge = p1 - p0
        normal = torch.tensor([float(edge[1]), -float(edge[0])])
        if float(normal @ (mid - centre)) < 0:
            normal = -normal
        length = float(edge.norm())
        if length < 1e-6:
            continue
        normal = normal / length
        view = mid / mid.norm().clamp_min(1e-6)
        facing = -float(normal @ view)  # > 0: the face looks at the sensor
        if facing <= 0.05:
            continue
        r = float(mid.norm())
        expected = config.points_per_m2 * length * (z1 - z0) * facing / max(r, 1.0) ** 2
        n = int(torch.poisson(torch.tensor(expected), generator=g))
        if n == 0:
            continue
        xyz = _face_points(p0, p1, z0, z1, n, g) + config.noise * torch.randn(n, 3, generator=g)
        intensity = (inten + 0.05 * torch.randn(n, 1, generator=g)).clamp(0.0, 1.0)
        parts.append(torch.cat([xyz, intensity], 1))
    return torch.cat(parts, 0) if parts else torch.zeros(0, 4)


def _ground(config: SceneConfig, g: torch.Generator) -> Tensor:
    e = config.extent
    n = config.ground_points
    # Range with density ~ 1/r over [1, r_max] (points per square metre ~ 1/r^2), angle within the area.
    r_max = math.hypot(e, e / 2)
    r = torch.exp(torch.rand(n * 3, generator=g) * math.log(r_max))
    phi = (torch.rand(n * 3, generator=g) - 0.5) * math.pi
    x, y = r * torch.cos(phi), r * torch.sin(phi)
    keep = (x <= e) & (y.abs() <= e / 2)
    x, y = x[keep][:n], y[keep][:n]
    z = config.noise * torch.randn(x.shape[0], generator=g)
    intensity = 0.05 + 0.25 * torch.rand(x.shape[0], generator=g)
    return torch.stack([x, y, z, intensity], 1)


def make_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """The scene of ``seed`` (same seed, same scene on every machine: one CPU generator, float32)."""
    config = config or SceneConfig()
    g = torch.Generator().manual_seed(int(seed))
    e = config.extent
    count = int(torch.randint(0, config.max_objects + 1, (1,), generator=g))
    boxes: list[Tensor] = []
    labels: list[int] = []
    for _ in range(count * 4):  # rejection sampling; a crowded scene keeps fewer objects
        if len(boxes) == count:
            break
        label = int(float(torch.rand(1, generator=g)) < config.pedestrian_fraction)
        length, width, height = (s * (1 + 0.08 * float(torch.randn(1, generator=g))) for s in _SIZES[label])
        margin = 0.5 * math.hypot(length, width)
        cx = margin + float(torch.rand(1, generator=g)) * (e - 2 * margin)
        cy = -e / 2 + margin + float(torch.rand(1, generator=g)) * (e - 2 * margin)
        yaw = (float(torch.rand(1, generator=g)) * 2 - 1) * math.pi
        box = torch.tensor([cx, cy, height / 2, length, width, height, yaw])
        if math.hypot(cx, cy) < config.min_range or _overlaps(box, boxes):
            continue
        boxes.append(box)
        labels.append(label)
    parts = [_ground(config, g)] + [_object_points(b, lab, config, g) for b, lab in zip(boxes, labels)]
    points = torch.cat(parts, 0).float()
    points = points[torch.randperm(points.shape[0], generator=g)]
    box_t = torch.stack(boxes).float() if boxes else torch.zeros(0, 7)
    return Scene(points, box_t, torch.tensor(labels, dtype=torch.int64))


def make_scenes(seeds: range | list[int], config: SceneConfig | None = None) -> list[Scene]:
    """``make_scene`` for each seed."""
    return [make_scene(s, config) for s in seeds]


def empty_fraction(scenes: list[Scene], extent: float, cells: int) -> float:
    """Mean fraction of the ``cells`` x ``cells`` BEV grid over the area that holds no point."""
    fractions = []
    for s in scenes:
        x, y = s.points[:, 0], s.points[:, 1] + extent / 2
        ix = (x / extent * cells).long().clamp(0, cells - 1)
        iy = (y / extent * cells).long().clamp(0, cells - 1)
        occupied = torch.unique(iy * cells + ix).numel()
        fractions.append(1.0 - occupied / cells**2)
    return sum(fractions) / max(len(fractions), 1)
