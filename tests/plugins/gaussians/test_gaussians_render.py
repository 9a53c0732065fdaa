"""The torch splatting rasterizer: against a per-pixel loop written from the 3DGS equations, hand-computed pixels,
depth order, gradients, SH evaluation, cameras; and against gsplat on a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from polyquant.plugins.gaussians.render import (
    ALPHA_MAX, ALPHA_MIN, DILATION, SH_C0, SH_C1, T_MIN, Camera, eval_sh, gsplat_available, look_at, orbit_cameras,
    quaternion_to_matrix, rasterize, render,
)
from polyquant.plugins.gaussians.scene import GaussianScene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _camera(size: int = 16, distance: float = 3.0, focal: float = 20.0) -> Camera:
    eye = torch.tensor([0.0, -distance, 0.0])
    return Camera(look_at(eye, torch.zeros(3)), focal, focal, size / 2, size / 2, size, size)


def _naive(means: Tensor, scales: Tensor, quats: Tensor, opac: Tensor, colors: Tensor, cam: Camera) -> Tensor:
    """Pixel by pixel, Gaussian by Gaussian in depth order: 3DGS's forward pass, in float64, no pair enumeration."""
    w2c = cam.world_to_camera.double()
    img = torch.zeros(3, cam.height, cam.width, dtype=torch.float64)
    pc = means.double() @ w2c[:3, :3].T + w2c[:3, 3]
    order = torch.argsort(pc[:, 2], stable=True)
    rot = quaternion_to_matrix(quats.double())
    for i in range(cam.height):
        for j in range(cam.width):
            t = 1.0
            for g in order.tolist():
                x, y, z = pc[g].tolist()
                if z <= 0.01:
                    continue
                lx, ly = 1.3 * 0.5 * cam.width / cam.fx, 1.3 * 0.5 * cam.height / cam.fy
                tx, ty = max(-lx, min(lx, x / z)) * z, max(-ly, min(ly, y / z)) * z
                jac = torch.tensor([[cam.fx / z, 0, -cam.fx * tx / z**2], [0, cam.fy / z, -cam.fy * ty / z**2]],
                                   dtype=torch.float64)
                m = rot[g] * scales[g].double()
                cov = jac @ w2c[:3, :3] @ (m @ m.T) @ w2c[:3, :3].T @ jac.T + DILATION * torch.eye(2, dtype=torch.float64)
                u, v = cam.fx * x / z + cam.cx, cam.fy * y / z + cam.cy
                d = torch.tensor([j + 0.5 - u, i + 0.5 - v], dtype=torch.float64)
                power = -0.5 * float(d @ torch.linalg.inv(cov) @ d)
                mid = 0.5 * (cov[0, 0] + cov[1, 1])
                det = float(torch.linalg.det(cov))
                radius = math.ceil(3 * math.sqrt(float(mid) + math.sqrt(max(0.1, float(mid) ** 2 - det))))
                if abs(d[0]) > radius + 1 or abs(d[1]) > radius + 1 or power > 0:
                    continue
                alpha = min(ALPHA_MAX, float(opac[g]) * math.exp(power))
                if alpha < ALPHA_MIN:
                    continue
                if t * (1 - alpha) <= T_MIN:
                    break
                img[:, i, j] += alpha * t * colors[g].double()
                t *= 1 - alpha
    return img


def _random_gaussians(n: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.4
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.3 - 2.5)
    quats = torch.randn(n, 4, generator=g)
    opac = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    return means, scales, quats, opac, colors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rasterizer_matches_the_per_pixel_loop(seed: int) -> None:
    cam = _camera(size=12)
    args = _random_gaussians(12, seed)
    got = rasterize(*args, cam)
    want = _naive(*args, cam)
    # the footprint bound: the loop tests 3 sigma + 1 px, the rasterizer the exact 3-sigma box; pixels outside 3
    # sigma carry alpha < o * exp(-4.5) ~ 0.011, so both skip or both include them except at the box's edge
    assert (got.double() - want).abs().max() < 2e-3
    assert (got.double() - want).abs().mean() < 1e-4


def test_one_gaussian_by_hand() -> None:
    # an isotropic Gaussian of std s at distance 3 facing the camera: its 2D variance is (f s / 3)^2 + 0.3 px^2, its
    # centre at the principal point (8, 8), so pixel (8, 8) (centre (8.5, 8.5)) is half a pixel off on both axes
    cam = _camera(size=16, distance=3.0, focal=20.0)
    s, o = 0.1, 0.8
    img = rasterize(torch.zeros(1, 3), torch.full((1, 3), s), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([o]),
                    torch.tensor([[1.0, 0.5, 0.25]]), cam)
    var = (20.0 * s / 3.0) ** 2 + DILATION
    alpha = o * math.exp(-0.5 * (0.25 + 0.25) / var)
    assert img[:, 8, 8].tolist() == pytest.approx([alpha, alpha * 0.5, alpha * 0.25], rel=1e-5)
    far = 3 * math.sqrt(var) + 2  # beyond 3 sigma: background (black)
    assert float(img[:, 8, int(8 + far)].abs().max()) == 0.0


def test_depth_order_and_background() -> None:
    cam = _camera(size=8)
    # a red Gaussian in front (closer to the camera at y = -3) of a green one, both nearly opaque and large
    means = torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    scales = torch.full((2, 3), 1.0)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    opac = torch.tensor([0.99, 0.99])
    colors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    # pixel (4, 4) samples (4.5, 4.5), half a pixel off both centres; std f s / z = 20 / 2 (red) and 20 / 4 px
    a_red = 0.99 * math.exp(-0.25 / ((20.0 / 2) ** 2 + DILATION))
    a_green = 0.99 * math.exp(-0.25 / ((20.0 / 4) ** 2 + DILATION))
    for perm in ([0, 1], [1, 0]):
        img = rasterize(means[perm], scales[perm], quats[perm], opac[perm], colors[perm], cam,
                        background=torch.tensor([0.0, 0.0, 1.0]))
        centre = img[:, 4, 4].tolist()
        assert centre == pytest.approx([a_red, (1 - a_red) * a_green, (1 - a_red) * (1 - a_green)], rel=1e-4)


def test_gradients_match_finite_differences() -> None:
    cam = _camera(size=10)
    means, scales, quats, opac, colors = (t.double() for t in _random_gaussians(4, 7))
    means = means * 0.3
    scales = scales * 3

    def f(m: Tensor, s: Tensor, o: Tensor, c: Tensor) -> Tensor:
        return rasterize(m, s, quats, o, c, cam)

    torch.autograd.gradcheck(f, (means.requires_grad_(), scales.requires_grad_(), opac.requires_grad_(),
                                 colors.requires_grad_()), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_eval_sh_by_hand() -> None:
    dc = torch.tensor([[1.0, -1.0, 0.0]])
    assert eval_sh(dc, torch.zeros(1, 0, 3), torch.tensor([[0.0, 0.0, 1.0]]))[0].tolist() == pytest.approx(
        [0.5 + SH_C0, max(0.0, 0.5 - SH_C0), 0.5])
    rest = torch.zeros(1, 3, 3)
    rest[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # the z-band coefficient of red
    up = eval_sh(torch.zeros(1, 3), rest, torch.tensor([[0.0, 0.0, 1.0]]))
    side = eval_sh(torch.zeros(1, 3), rest, torch.tensor([[1.0, 0.0, 0.0]]))
    assert up[0, 0] == pytest.approx(0.5 + SH_C1) and side[0, 0] == pytest.approx(0.5)
    # degree 3 of a unit direction stays finite and defined for every band
    full = eval_sh(torch.zeros(5, 3), torch.randn(5, 15, 3), torch.nn.functional.normalize(torch.randn(5, 3), dim=1))
    assert bool(torch.isfinite(full).all()) and bool((full >= 0).all())


def test_cameras() -> None:
    cam = orbit_cameras(3, size=32, seed=4)[1]
    assert Camera.from_tensor(cam.to_tensor()).to_tensor().tolist() == cam.to_tensor().tolist()
    # the orbit target projects to the image centre
    p = cam.world_to_camera @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert cam.fx * float(p[0] / p[2]) + cam.cx == pytest.approx(16.0, abs=1e-4)
    assert float(cam.center.norm()) == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError, match="22 values"):
        Camera.from_tensor(torch.zeros(21))


def test_render_is_differentiable_in_every_attribute() -> None:
    g = torch.Generator().manual_seed(0)
    n = 50
    scene = GaussianScene(torch.randn(n, 3, generator=g) * 0.4, torch.full((n, 3), -2.5), torch.randn(n, 4, generator=g),
                          torch.zeros(n, 1), torch.randn(n, 3, generator=g), 0.1 * torch.randn(n, 8, 3, generator=g))
    scene = scene.map(lambda t: t.requires_grad_(True))
    render(scene, orbit_cameras(1, size=24)[0]).sum().backward()
    for name, t in scene.tensors().items():
        assert t.grad is not None and float(t.grad.abs().sum()) > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not gsplat_available(), reason="needs CUDA and gsplat")
def test_gsplat_agrees_with_the_torch_rasterizer() -> None:
    from polyquant.plugins.gaussians.procedural import procedural_scene

    scene = procedural_scene(0, 5000, 3).to("cuda")
    for cam in orbit_cameras(4, size=128, seed=3):
        a = render(scene, cam, backend="torch")
        b = render(scene, cam, backend="gsplat")
        assert float((a - b).abs().mean()) < 2e-3
