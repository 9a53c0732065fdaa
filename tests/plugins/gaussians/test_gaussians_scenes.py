"""Procedural scenes and the 3DGS fitting loop: determinism, surface-aligned Gaussians, a fit that learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyquant.metrics import psnr
from polyquant.plugins.gaussians.fitting import fit_scene, init_from_points, main, render_views
from polyquant.plugins.gaussians.ply import read_ply
from polyquant.plugins.gaussians.procedural import normal_to_quaternion, procedural_scene
from polyquant.plugins.gaussians.render import orbit_cameras, quaternion_to_matrix, render
from polyquant.plugins.gaussians.scene import GaussianScene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_procedural_scenes_are_seeded_and_look_like_scenes() -> None:
    a, b, c = procedural_scene(4, 3000, 3), procedural_scene(4, 3000, 3), procedural_scene(5, 3000, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
    assert not torch.equal(a.xyz, c.xyz)
    assert a.num_gaussians == 3000 and a.sh_degree == 3
    a.check_finite()
    assert bool((a.xyz.abs() <= 1.6 + 1e-4).all())
    # flat Gaussians: the third axis 10x thinner (in log space: log 10 apart), opacities mostly high
    surface = a.opacity[:, 0] > 0
    assert float((a.scale[surface, 0] - a.scale[surface, 2]).mean()) == pytest.approx(2.303, abs=0.1)
    assert float(torch.sigmoid(a.opacity).mean()) > 0.8
    # some view dependence: non-zero higher SH bands on the glossy shapes
    assert float(a.sh_rest.abs().sum()) > 0


def test_normal_to_quaternion_rotates_z_onto_the_normal() -> None:
    g = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(50, 3, generator=g), dim=1)
    normals[0] = torch.tensor([0.0, 0.0, 1.0])
    normals[1] = torch.tensor([0.0, 0.0, -1.0])
    rot = quaternion_to_matrix(normal_to_quaternion(normals, torch.rand(50, generator=g) * 6.28))
    torch.testing.assert_close(rot[:, :, 2], normals, atol=1e-5, rtol=0)  # the z column is the normal


def test_fitting_learns_the_target_views(tmp_path: Path) -> None:
    target = procedural_scene(2, 1500, 1)
    fitted, views = fit_scene(target, num_gaussians=400, steps=60, seed=2, views=6, size=24, sh_degree=1)
    assert fitted.num_gaussians == 400 and len(views) == 6
    g = torch.Generator().manual_seed(2)
    pick = torch.randperm(1500, generator=g)[:400]
    start = init_from_points(target.xyz[pick], torch.full((400, 3), 0.5), 1)
    cams = [cam for cam, _ in views]
    truth = [img.clamp(0, 1) for _, img in views]

    def score(scene: GaussianScene) -> float:
        with torch.no_grad():
            return sum(psnr(t, render(scene, c).clamp(0, 1)) for t, c in zip(truth, cams)) / len(cams)

    assert score(fitted) > score(start) + 3.0
    # held-out views improve too
    held = render_views(target, orbit_cameras(3, size=24, seed=77))
    with torch.no_grad():
        got = sum(psnr(img.clamp(0, 1), render(fitted, c).clamp(0, 1)) for c, img in held) / 3
        base = sum(psnr(img.clamp(0, 1), render(start, c).clamp(0, 1)) for c, img in held) / 3
    assert got > base + 2.0
    # the script writes a standard .ply
    out = tmp_path / "fitted.ply"
    assert main(["--seed", "1", "--gaussians", "64", "--target-gaussians", "200", "--steps", "2", "--views", "2",
                 "--size", "16", "--sh-degree", "0", "--out", str(out)]) == 0
    assert read_ply(out).num_gaussians == 64
