"""Training against multi-view renders: fitting a 3DGS scene to views of a target (so that its attribute statistics
look trained, not generated), and the render-loss loop the methods reuse to fine-tune what they keep trainable.

``fit_scene`` follows 3DGS's optimiser (Kerbl et al. 2023, ``arguments/__init__.py``): Adam with per-attribute
learning rates (positions 1.6e-4 x the scene extent, SH-DC 2.5e-3, higher SH 2.5e-3 / 20, opacity 0.05, scale 5e-3,
rotation 1e-3), loss 0.8 L1 + 0.2 (1 - SSIM), the SH degree raised one band every ``steps / 4`` steps, one random
training view per step, initialised as from SfM points (noisy surface samples with their colours, isotropic scales
from the nearest-neighbour spacing, identity rotations, opacity 0.1). It keeps the number of Gaussians fixed:
no densification or pruning (a small CPU reproduction, said so in the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from polyquant.metrics import ssim_map

from .render import Camera, orbit_cameras, render
from .scene import GaussianScene, rest_bands

__all__ = ["render_views", "photometric_loss", "train_views", "init_from_points", "fit_scene", "View"]

View = tuple[Camera, Tensor]  # a camera and its target image (3, H, W)


@torch.no_grad()
def render_views(scene: GaussianScene, cameras: Sequence[Camera]) -> list[View]:
    """The scene's image from each camera, as training / evaluation views."""
    return [(cam, render(scene, cam)) for cam in cameras]


def photometric_loss(image: Tensor, target: Tensor, ssim_weight: float = 0.2) -> Tensor:
    """3DGS's loss: (1 - w) L1 + w (1 - SSIM)."""
    l1 = (image - target).abs().mean()
    if ssim_weight == 0 or min(image.shape[-2:]) < 11:
        return l1
    return (1 - ssim_weight) * l1 + ssim_weight * (1 - ssim_map(image, target).mean())


def train_views(params: dict[str, tuple[Tensor, float]], scene_fn: Callable[[], GaussianScene], views: Sequence[View],
                *, steps: int, seed: int, progress: bool = False, desc: str = "render loss",
                ssim_weight: float = 0.2,
                schedule: Callable[[int], None] | None = None) -> list[float]:
    """Adam on ``params`` (name -> (leaf tensor, learning rate)) for ``steps`` steps, one seeded random view per
    step, loss ``photometric_loss(render(scene_fn()), view)``; ``schedule(step)`` runs before each step. Returns
    the loss of every step."""
    from tqdm.auto import tqdm

    if not views:
        raise ValueError("no training views")
    opt = torch.optim.Adam([{"params": [t], "lr": lr, "name": k} for k, (t, lr) in params.items()], eps=1e-15)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if schedule is not None:
            schedule(step)
        cam, target = views[int(torch.randint(len(views), (), generator=g))]
        loss = photometric_loss(render(scene_fn(), cam), target, ssim_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def init_from_points(points: Tensor, colors: Tensor, sh_degree: int) -> GaussianScene:
    """A scene initialised as 3DGS does from SfM points: isotropic log scales from the mean distance to the 3
    nearest neighbours, identity rotations, opacity 0.1, SH-DC from the colours, higher bands zero."""
    n = points.shape[0]
    d2 = torch.zeros(n)
    for start in range(0, n, 2048):
        block = torch.cdist(points[start:start + 2048], points)
        d2[start:start + 2048] = block.topk(4, largest=False).values[:, 1:].pow(2).mean(1)
    rot = torch.zeros(n, 4)
    rot[:, 0] = 1
    return GaussianScene(
        xyz=points.clone(),
        scale=(0.5 * d2.clamp(min=1e-7).log())[:, None].expand(n, 3).clone(),
        rotation=rot,
        opacity=torch.full((n, 1), math.log(0.1 / 0.9)),
        sh_dc=(colors - 0.5) / 0.28209479177387814,
        sh_rest=torch.zeros(n, rest_bands(sh_degree), 3),
    )


def fit_scene(target: GaussianScene, *, num_gaussians: int, steps: int, seed: int, views: int = 32, size: int = 64,
              sh_degree: int = 3, progress: bool = False) -> tuple[GaussianScene, list[View]]:
    """Fit a scene of ``num_gaussians`` to ``views`` orbit renders of ``target`` (``size`` px); returns the fitted
    scene and its training views."""
    g = torch.Generator().manual_seed(seed)
    cams = orbit_cameras(views, size=size, seed=seed)
    train = render_views(target, cams)
    pick = torch.randperm(target.num_gaussians, generator=g)[:num_gaussians]
    if pick.numel() < num_gaussians:
        raise ValueError(f"the target has {target.num_gaussians} Gaussians, fewer than the {num_gaussians} asked")
    from .render import eval_sh

    pts = target.xyz[pick] + 0.02 * torch.randn(num_gaussians, 3, generator=g)
    rgb = eval_sh(target.sh_dc[pick], target.sh_rest[pick][:, :0], torch.zeros(num_gaussians, 3))
    rgb = (rgb + 0.05 * torch.randn(num_gaussians, 3, generator=g)).clamp(0, 1)
    scene = init_from_points(pts, rgb, sh_degree).map(lambda t: t.clone().requires_grad_(True))
    extent = float((target.xyz - target.xyz.mean(0)).norm(dim=1).max())
    lrs = {"xyz": 1.6e-4 * extent, "sh_dc": 2.5e-3, "sh_rest": 2.5e-3 / 20, "opacity": 0.05, "scale": 5e-3,
           "rotation": 1e-3}
    params = {k: (getattr(scene, k), lr) for k, lr in lrs.items()}
    active = [0]  # SH bands in use: degree d uses the first (d + 1)^2 - 1 rest coefficients

    def schedule(step: int) -> None:
        active[0] = min(sh_degree, step * 4 // max(1, steps))

    def current() -> GaussianScene:
        b = rest_bands(active[0])
        mask = torch.zeros(1, scene.sh_rest.shape[1], 1)
        mask[:, :b] = 1
        return GaussianScene(scene.xyz, scene.scale, scene.rotation, scene.opacity, scene.sh_dc, scene.sh_rest * mask)

    train_views(params, current, train, steps=steps, seed=seed, progress=progress, desc="fit 3DGS scene",
                schedule=schedule)
    return scene.detach(), train


def main(argv: list[str] | None = None) -> int:
    """``python -m polyquant.plugins.gaussians.fitting --seed 3 --out scene.ply``: a fitted scene of a procedural
    target, written as a standard 3DGS .ply (a test scene for the methods and for viewers)."""
    import argparse

    from polyquant.api import progress_default

    from .ply import write_ply
    from .procedural import procedural_scene

    parser = argparse.ArgumentParser(description="Fit a 3DGS scene to renders of a seeded procedural target.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gaussians", type=int, default=8192, help="Gaussians of the fitted scene")
    parser.add_argument("--target-gaussians", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sh-degree", type=int, default=3, choices=range(4))
    parser.add_argument("--out", required=True, help="the .ply to write")
    args = parser.parse_args(argv)
    if not 16 <= args.gaussians <= args.target_gaussians:
        parser.error(f"--gaussians must be in [16, --target-gaussians={args.target_gaussians}]")
    target = procedural_scene(args.seed, args.target_gaussians, args.sh_degree)
    scene, _ = fit_scene(target, num_gaussians=args.gaussians, steps=args.steps, seed=args.seed, views=args.views,
                         size=args.size, sh_degree=args.sh_degree, progress=progress_default())
    path = write_ply(scene, args.out)
    print(f"fitted {args.gaussians:,} Gaussians -> {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
