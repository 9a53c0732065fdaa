"""Seeded procedural 3DGS scenes, offline: the targets that ``fitting.fit_scene`` trains real-looking scenes on.

A scene is a textured ground plane and a few coloured shapes (spheres, boxes, tori) inside [-1.5, 1.5]^3, covered
by flat Gaussians lying on their surfaces (two axes along the surface at the local sample spacing, the third 10x
thinner, rotated to the surface normal), with:
- smooth attributes: texture colours (checkers, stripes, gradients, value noise), spacing-driven scales;
- noisy attributes: colour and log-scale jitter, random spins about the normal, a few percent of loose
  semi-transparent "floater" Gaussians;
- view dependence: glossy shapes carry degree-1 SH lobes (and small higher-band terms), matte ones do not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .render import SH_C0
from .scene import GaussianScene, rest_bands

__all__ = ["procedural_scene", "normal_to_quaternion"]

FLOATERS = 0.03


def normal_to_quaternion(normals: Tensor, spin: Tensor) -> Tensor:
    """(N, 4) quaternions (w, x, y, z) rotating +z onto each unit normal, after a spin (N,) radians about +z."""
    z = torch.tensor([0.0, 0.0, 1.0]).expand_as(normals)
    axis = torch.linalg.cross(z, normals)
    sin = axis.norm(dim=1).clamp(max=1.0)
    cos = (normals * z).sum(1)
    angle = torch.atan2(sin, cos)
    axis = torch.where(sin[:, None] > 1e-6, axis / sin.clamp(min=1e-12)[:, None], torch.tensor([1.0, 0.0, 0.0]))
    q_align = torch.cat([torch.cos(angle / 2)[:, None], axis * torch.sin(angle / 2)[:, None]], 1)
    q_spin = torch.stack([torch.cos(spin / 2), torch.zeros_like(spin), torch.zeros_like(spin), torch.sin(spin / 2)], 1)
    w1, x1, y1, z1 = q_align.unbind(1)
    w2, x2, y2, z2 = q_spin.unbind(1)
    return torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], 1)


def _value_noise(p: Tensor, freq: float, g: torch.Generator) -> Tensor:
    """Smooth pseudo-random values in [0, 1] at points (N, 3): a sum of random sinusoids."""
    out = torch.zeros(p.shape[0])
    for _ in range(4):
        d = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        out = out + torch.sin(freq * (p @ d) + phase)
    return 0.5 + out / 8


def _texture(p: Tensor, kind: int, c1: Tensor, c2: Tensor, g: torch.Generator) -> Tensor:
    """RGB (N, 3) of a texture at points (N, 3): 0 checker, 1 stripes, 2 gradient, 3 noise."""
    if kind == 0:
        t = ((torch.floor(p[:, 0] * 4) + torch.floor(p[:, 1] * 4) + torch.floor(p[:, 2] * 4)) % 2)
    elif kind == 1:
        t = 0.5 + 0.5 * torch.sin(p[:, 2] * 18.0)
    elif kind == 2:
        t = (p[:, 2] - p[:, 2].min()) / (p[:, 2].max() - p[:, 2].min()).clamp(min=1e-6)
    else:
        t = _value_noise(p, 6.0, g)
    return c1 * (1 - t[:, None]) + c2 * t[:, None]


def _sphere(n: int, center: Tensor, radius: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    nrm = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return center + radius * nrm, nrm


def _box(n: int, center: Tensor, half: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    areas = torch.stack([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
    face = torch.multinomial(areas, n, replacement=True, generator=g)
    uv = torch.rand(n, 3, generator=g) * 2 - 1
    axis = face % 3
    sign = torch.where(face < 3, 1.0, -1.0)
    uv[torch.arange(n), axis] = sign
    nrm = torch.zeros(n, 3)
    nrm[torch.arange(n), axis] = sign
    return center + uv * half, nrm


def _torus(n: int, center: Tensor, big: float, small: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    u = torch.rand(n, generator=g) * 2 * math.pi
    v = torch.rand(n, generator=g) * 2 * math.pi
    ring = torch.stack([torch.cos(u), torch.sin(u), torch.zeros(n)], 1)
    nrm = ring * torch.cos(v)[:, None] + torch.tensor([0.0, 0.0, 1.0]) * torch.sin(v)[:, None]
    return center + big * ring + small * nrm, nrm


def procedural_scene(seed: int, num_gaussians: int = 20_000, sh_degree: int = 3) -> GaussianScene:
    """A seeded target scene of ``num_gaussians`` Gaussians (see the module docstring)."""
    if num_gaussians < 16:
        raise ValueError(f"num_gaussians must be >= 16, got {num_gaussians}")
    g = torch.Generator().manual_seed(seed)
    n_float = int(num_gaussians * FLOATERS)
    n_ground = int((num_gaussians - n_float) * 0.35)
    n_shapes = 3 + int(torch.randint(0, 3, (), generator=g))
    share = torch.rand(n_shapes, generator=g) + 0.5
    counts = (share / share.sum() * (num_gaussians - n_float - n_ground)).long()
    counts[-1] = num_gaussians - n_float - n_ground - counts[:-1].sum()

    parts: list[tuple[Tensor, Tensor, Tensor, float, float]] = []  # points, normals, rgb, gloss, spacing
    # ground: z = -1, [-1.6, 1.6]^2
    xy = torch.rand(n_ground, 2, generator=g) * 3.2 - 1.6
    pts = torch.cat([xy, torch.full((n_ground, 1), -1.0)], 1)
    rgb = _texture(pts, int(torch.randint(0, 4, (), generator=g)), torch.rand(3, generator=g) * 0.5,
                   0.5 + torch.rand(3, generator=g) * 0.5, g)
    parts.append((pts, torch.tensor([0.0, 0.0, 1.0]).expand(n_ground, 3), rgb, 0.0, math.sqrt(3.2**2 / n_ground)))
    for i in range(n_shapes):
        n = int(counts[i])
        kind = int(torch.randint(0, 3, (), generator=g))
        center = torch.cat([torch.rand(2, generator=g) * 1.8 - 0.9, torch.rand(1, generator=g) * 0.6 - 0.4])
        if kind == 0:
            r = 0.25 + 0.3 * float(torch.rand((), generator=g))
            pts, nrm = _sphere(n, center, r, g)
            area = 4 * math.pi * r * r
        elif kind == 1:
            half = 0.15 + 0.3 * torch.rand(3, generator=g)
            pts, nrm = _box(n, center, half, g)
            area = 8 * float(half[0] * half[1] + half[1] * half[2] + half[0] * half[2])
        else:
            big, small = 0.3 + 0.2 * float(torch.rand((), generator=g)), 0.08 + 0.07 * float(torch.rand((), generator=g))
            pts, nrm = _torus(n, center, big, small, g)
            area = 4 * math.pi**2 * big * small
        rgb = _texture(pts - center, int(torch.randint(0, 4, (), generator=g)), torch.rand(3, generator=g),
                       torch.rand(3, generator=g), g)
        gloss = float(torch.rand((), generator=g)) if i % 2 == 0 else 0.0
        parts.append((pts, nrm, rgb, gloss, math.sqrt(area / n)))

    xyz, normals, colors, scales, rest = [], [], [], [], []
    bands = rest_bands(sh_degree)
    for pts, nrm, rgb, gloss, spacing in parts:
        n = pts.shape[0]
        xyz.append(pts)
        normals.append(nrm)
        colors.append((rgb + 0.03 * torch.randn(n, 3, generator=g)).clamp(0, 1))
        s = math.log(0.7 * spacing) + 0.15 * torch.randn(n, 2, generator=g)
        scales.append(torch.cat([s, s[:, :1] - math.log(10.0)], 1))
        sh = torch.zeros(n, bands, 3)
        if bands and gloss > 0:
            # a degree-1 lobe towards a light direction: colour brighter when seen from it
            light = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
            lobe = gloss * 0.6 * torch.stack([-light[1], light[2], -light[0]])  # SH_C1 basis order (y, z, x)
            sh[:, :3] = lobe[None, :, None] * (0.6 + 0.4 * rgb[:, None, :])
            if bands > 3:
                sh[:, 3:] = 0.05 * gloss * torch.randn(n, bands - 3, 3, generator=g)
        rest.append(sh)
    xyz_t, nrm_t = torch.cat(xyz), torch.cat(normals)
    n_surf = xyz_t.shape[0]
    spin = torch.rand(n_surf, generator=g) * 2 * math.pi
    rot = normal_to_quaternion(nrm_t, spin) * (1 + 0.05 * torch.randn(n_surf, 1, generator=g))
    opacity = 2.5 + 0.8 * torch.randn(n_surf, 1, generator=g)
    # floaters: loose, round, faint
    fxyz = torch.rand(n_float, 3, generator=g) * 3 - 1.5
    frot = torch.nn.functional.normalize(torch.randn(n_float, 4, generator=g), dim=1)
    fscale = (math.log(0.03) + 0.4 * torch.randn(n_float, 1, generator=g)).expand(n_float, 3)
    fcol = torch.rand(n_float, 3, generator=g)
    fopa = -2.0 + 0.5 * torch.randn(n_float, 1, generator=g)
    rgb_all = torch.cat(colors + [fcol])
    return GaussianScene(
        xyz=torch.cat([xyz_t, fxyz]),
        scale=torch.cat(scales + [fscale]),
        rotation=torch.cat([rot, frot]),
        opacity=torch.cat([opacity, fopa]),
        sh_dc=(rgb_all - 0.5) / SH_C0,
        sh_rest=torch.cat(rest + [torch.zeros(n_float, bands, 3)]),
    )
