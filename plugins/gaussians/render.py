"""A small differentiable Gaussian splatting rasterizer in pure torch (the CPU path and the reference), and gsplat's
CUDA rasterizer in its place when CUDA and ``gsplat`` are present.

The maths is 3DGS's (Kerbl et al. 2023) with gsplat's conventions: 3D covariance R S S^T R^T from the activated
scale and the normalised quaternion; EWA projection with the Jacobian of the pinhole camera (x/z, y/z clamped to
1.3x the field of view) and a 0.3 px^2 low-pass dilation; a 3-sigma footprint; alpha = min(0.99, o exp(-q/2)), pairs
with alpha < 1/255 skipped; front-to-back compositing by depth, stopping where the transmittance would fall below
1e-4; colour from spherical harmonics of the view direction, + 0.5, clamped at 0. Pixel (i, j) is sampled at its
centre (j + 0.5, i + 0.5).

Instead of tiles, the torch path enumerates the (Gaussian, pixel) pairs inside each footprint, sorts them by pixel
then depth, and composites with a segmented cumulative sum of log(1 - alpha): memory and time follow the number of
pairs, and every step is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .scene import GaussianScene

__all__ = ["Camera", "look_at", "orbit_cameras", "eval_sh", "rasterize", "render", "gsplat_available",
           "quaternion_to_matrix"]

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
DILATION = 0.3
NEAR = 0.01

# real spherical-harmonic basis constants (3DGS's sh_utils)
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in OpenCV convention (x right, y down, z forward).

    Args:
        world_to_camera: (4, 4) rigid transform.
        fx, fy, cx, cy: intrinsics in pixels.
        width, height: image size in pixels.
    """

    world_to_camera: Tensor
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        if tuple(self.world_to_camera.shape) != (4, 4):
            raise ValueError(f"world_to_camera must be (4, 4), got {tuple(self.world_to_camera.shape)}")
        if not (1 <= self.width <= 8192 and 1 <= self.height <= 8192):
            raise ValueError(f"image size must be 1..8192 px, got {self.width} x {self.height}")
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(f"focal lengths must be positive, got {self.fx}, {self.fy}")

    @property
    def center(self) -> Tensor:
        """The camera centre in world coordinates (3,)."""
        r, t = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -(r.T @ t)

    def to_tensor(self) -> Tensor:
        """(22,): the flattened transform, then fx, fy, cx, cy, width, height (a model's input row)."""
        intr = torch.tensor([self.fx, self.fy, self.cx, self.cy, self.width, self.height], dtype=torch.float32)
        return torch.cat([self.world_to_camera.reshape(16).float().cpu(), intr])

    @staticmethod
    def from_tensor(row: Tensor) -> "Camera":
        if tuple(row.shape) != (22,):
            raise ValueError(f"a camera row has 22 values (4x4 transform, fx, fy, cx, cy, width, height), got shape "
                             f"{tuple(row.shape)}")
        v = row.detach().float()
        w, h = float(v[20]), float(v[21])
        if w != round(w) or h != round(h):
            raise ValueError(f"camera width / height must be whole pixels, got {w} x {h}")
        return Camera(v[:16].reshape(4, 4), float(v[16]), float(v[17]), float(v[18]), float(v[19]), int(w), int(h))


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """The (4, 4) world-to-camera transform of a camera at ``eye`` looking at ``target`` (OpenCV axes; ``up`` is
    world +z by default, and the image's y axis points against it)."""
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else up
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.linalg.cross(forward, up)
    if float(right.norm()) < 1e-6:  # looking along up: any perpendicular
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0]))
    right = torch.nn.functional.normalize(right, dim=0)
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    m = torch.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = -(rot @ eye)
    return m


def orbit_cameras(count: int, *, radius: float = 4.0, size: int = 64, fov_deg: float = 50.0,
                  elevation_deg: tuple[float, float] = (10.0, 45.0), target: Tensor | None = None,
                  seed: int = 0, jitter: bool = True) -> list[Camera]:
    """``count`` cameras on a sphere around ``target`` looking at it: azimuths evenly spread (jittered with
    ``jitter``), elevations drawn in the range, square ``size`` px images of the field of view."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(3) if target is None else target.float()
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    cams = []
    for i in range(count):
        az = 2 * math.pi * (i + (float(torch.rand((), generator=g)) if jitter else 0.0)) / count
        lo, hi = elevation_deg
        el = math.radians(lo + (hi - lo) * float(torch.rand((), generator=g)))
        eye = target + radius * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        cams.append(Camera(look_at(eye, target), focal, focal, size / 2, size / 2, size, size))
    return cams


def eval_sh(sh_dc: Tensor, sh_rest: Tensor, dirs: Tensor) -> Tensor:
    """RGB (N, 3) of SH coefficients (dc (N, 3), rest (N, B, 3)) seen along unit ``dirs`` (N, 3): the basis sum,
    + 0.5, clamped at 0 (3DGS's ``eval_sh`` then its offset)."""
    x, y, z = dirs.unbind(-1)
    out = SH_C0 * sh_dc
    bands = sh_rest.shape[1]
    if bands >= 3:
        out = out - SH_C1 * y[:, None] * sh_rest[:, 0] + SH_C1 * z[:, None] * sh_rest[:, 1] \
            - SH_C1 * x[:, None] * sh_rest[:, 2]
    if bands >= 8:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        basis2 = (SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * xz, SH_C2[4] * (xx - yy))
        for i, b in enumerate(basis2):
            out = out + b[:, None] * sh_rest[:, 3 + i]
    if bands >= 15:
        basis3 = (SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4 * zz - xx - yy),
                  SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                  SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy))
        for i, b in enumerate(basis3):
            out = out + b[:, None] * sh_rest[:, 8 + i]
    return (out + 0.5).clamp(min=0.0)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """(N, 4) quaternions (w, x, y, z), normalised here -> (N, 3, 3) rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)


def _project(means: Tensor, scales: Tensor, quats: Tensor, cam: Camera) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Camera-space depth (N,), pixel means (N, 2), conics (N, 3) = (a, b, c) of the inverse 2D covariance
    [[a, b], [b, c]], and 3-sigma radii (N,) in pixels (0 for a Gaussian behind the near plane)."""
    w2c = cam.world_to_camera.to(means)
    rot_c, t_c = w2c[:3, :3], w2c[:3, 3]
    pc = means @ rot_c.T + t_c  # (N, 3)
    z = pc[:, 2]
    zs = z.clamp(min=NEAR)
    lim_x, lim_y = 1.3 * 0.5 * cam.width / cam.fx, 1.3 * 0.5 * cam.height / cam.fy
    tx = (pc[:, 0] / zs).clamp(-lim_x, lim_x) * zs
    ty = (pc[:, 1] / zs).clamp(-lim_y, lim_y) * zs
    zero = torch.zeros_like(zs)
    jac = torch.stack([cam.fx / zs, zero, -cam.fx * tx / zs**2,
                       zero, cam.fy / zs, -cam.fy * ty / zs**2], dim=-1).reshape(-1, 2, 3)
    m = quaternion_to_matrix(quats) * scales[:, None, :]  # R S
    cov_world = m @ m.transpose(1, 2)
    t = jac @ rot_c  # (N, 2, 3)
    cov2 = t @ cov_world @ t.transpose(1, 2)
    a = cov2[:, 0, 0] + DILATION
    b = cov2[:, 0, 1]
    c = cov2[:, 1, 1] + DILATION
    det = (a * c - b * b).clamp(min=1e-12)
    conic = torch.stack([c / det, -b / det, a / det], dim=-1)
    mid = 0.5 * (a + c)
    lam = mid + (mid * mid - det).clamp(min=0.1).sqrt()
    radius = torch.ceil(3.0 * lam.sqrt()).detach()
    radius = torch.where(z > NEAR, radius, torch.zeros_like(radius))
    uv = torch.stack([cam.fx * pc[:, 0] / zs + cam.cx, cam.fy * pc[:, 1] / zs + cam.cy], dim=-1)
    return z, uv, conic, radius


def rasterize(means: Tensor, scales: Tensor, quats: Tensor, opacities: Tensor, colors: Tensor, cam: Camera,
              background: Tensor | None = None) -> Tensor:
    """The (3, H, W) image of N Gaussians: ``means`` (N, 3), activated ``scales`` (N, 3), quaternions (N, 4),
    activated ``opacities`` (N,), ``colors`` (N, 3); differentiable in all of them. ``background`` (3,) defaults
    to black."""
    w, h = cam.width, cam.height
    bg = torch.zeros(3, dtype=means.dtype, device=means.device) if background is None else background.to(means)
    z, uv, conic, radius = _project(means, scales, quats, cam)
    radius = radius.clamp(max=float(max(w, h)))
    x0 = (uv[:, 0].detach() - radius).floor().clamp(0, w).long()
    x1 = (uv[:, 0].detach() + radius).ceil().clamp(0, w).long()
    y0 = (uv[:, 1].detach() - radius).floor().clamp(0, h).long()
    y1 = (uv[:, 1].detach() + radius).ceil().clamp(0, h).long()
    bw, bh = x1 - x0, y1 - y0
    visible = (radius > 0) & (bw > 0) & (bh > 0) & (opacities.detach() > ALPHA_MIN)
    idx = visible.nonzero().squeeze(1)
    image = bg[:, None].expand(3, h * w)
    if idx.numel() == 0:
        return image.reshape(3, h, w).clone()
    idx = idx[torch.argsort(z.detach()[idx], stable=True)]  # front to back
    counts = (bw * bh)[idx]
    rank = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), counts)  # pair -> depth rank
    gid = idx[rank]
    local = torch.arange(rank.numel(), device=idx.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                    counts)
    px = x0[gid] + local % bw[gid]
    py = y0[gid] + torch.div(local, bw[gid], rounding_mode="floor")
    dx = px.to(uv.dtype) + 0.5 - uv[gid, 0]
    dy = py.to(uv.dtype) + 0.5 - uv[gid, 1]
    ca, cb, cc = conic[gid].unbind(-1)
    power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
    alpha = (opacities[gid] * torch.exp(power.clamp(max=0.0))).clamp(max=ALPHA_MAX)
    keep = (alpha.detach() >= ALPHA_MIN) & (power.detach() <= 0)
    pix = (py * w + px)[keep]
    order = torch.argsort(pix * idx.numel() + rank[keep], stable=True)  # by pixel, then depth
    pix, alpha, gsel = pix[order], alpha[keep][order], gid[keep][order]
    log1m = torch.log1p(-alpha).double()
    incl = torch.cumsum(log1m, 0)
    excl = incl - log1m
    first = torch.ones_like(pix, dtype=torch.bool)
    first[1:] = pix[1:] != pix[:-1]
    seg_start = torch.cummax(torch.where(first, torch.arange(pix.numel(), device=pix.device), 0), 0).values
    log_t = (excl - excl[seg_start]).to(alpha.dtype)  # log transmittance in front of each pair
    trans = torch.exp(log_t)
    alive = (trans * (1 - alpha)).detach() > T_MIN
    weight = torch.where(alive, alpha * trans, torch.zeros_like(alpha))
    rgb = torch.zeros(h * w, 3, dtype=means.dtype, device=means.device).index_add(0, pix, weight[:, None] * colors[gsel])
    covered = torch.zeros(h * w, dtype=means.dtype, device=means.device).index_add(0, pix, weight)
    out = rgb.T + (1.0 - covered)[None] * bg[:, None]
    return out.reshape(3, h, w)


def gsplat_available() -> bool:
    """True when gsplat imports and CUDA is present (its rasterizer is CUDA-only)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _render_gsplat(scene: GaussianScene, cam: Camera, background: Tensor | None) -> Tensor:
    from gsplat import rasterization

    dev = scene.xyz.device
    k = torch.tensor([[cam.fx, 0.0, cam.cx], [0.0, cam.fy, cam.cy], [0.0, 0.0, 1.0]], device=dev)
    sh = torch.cat([scene.sh_dc[:, None], scene.sh_rest], dim=1)  # (N, K, 3)
    bg = None if background is None else background.to(dev)[None]
    img, _, _ = rasterization(scene.xyz, torch.nn.functional.normalize(scene.rotation, dim=-1), scene.scale.exp(),
                              torch.sigmoid(scene.opacity[:, 0]), sh, cam.world_to_camera.to(dev)[None], k[None],
                              cam.width, cam.height, sh_degree=scene.sh_degree, backgrounds=bg,
                              eps2d=DILATION, near_plane=NEAR)
    return img[0].permute(2, 0, 1)


def render(scene: GaussianScene, cam: Camera, background: Tensor | None = None, backend: str = "auto") -> Tensor:
    """The (3, H, W) image of a scene (raw parameters: log scales, logit opacities, SH) from ``cam``.

    ``backend``: "torch" (this module's rasterizer, any device), "gsplat" (CUDA only), or "auto" (the default:
    gsplat for a scene on CUDA when ``gsplat_available()``, else torch)."""
    if backend not in ("torch", "gsplat", "auto"):
        raise ValueError(f"backend must be torch, gsplat or auto, got {backend!r}")
    if backend == "gsplat" or (backend == "auto" and scene.xyz.is_cuda and gsplat_available()):
        if not gsplat_available():
            raise RuntimeError("backend 'gsplat' needs CUDA and the gsplat package (pip install gsplat)")
        return _render_gsplat(scene, cam, background)
    dirs = torch.nn.functional.normalize(scene.xyz - cam.center.to(scene.xyz), dim=-1)
    colors = eval_sh(scene.sh_dc, scene.sh_rest, dirs)
    return rasterize(scene.xyz, scene.scale.exp(), scene.rotation, torch.sigmoid(scene.opacity[:, 0]), colors, cam,
                     background)
