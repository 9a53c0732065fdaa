"""``polyquant demo gaussians``: the shipped fitted 3DGS scene compressed by every method (offline, ~1 min): file
bytes per Gaussian and per component, ratio against the float .ply, render PSNR / SSIM against the float scene on
held-out views; a side-by-side render (float, then each method) written as a PNG."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["run_demo", "save_side_by_side"]


def save_side_by_side(images: dict[str, Tensor], path: str | Path) -> Path:
    """A PNG of (3, H, W) images in [0, 1] side by side, each titled with its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.7), squeeze=False)
    for ax, (label, img) in zip(axes[0], images.items()):
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_demo(views: int = 4, size: int = 64, omg_steps: int = 400, out_dir: str | None = None) -> str:
    """Every method on the shipped scene ``fitted-s0``; ``views`` held-out orbit views of ``size`` px; OMG's MLPs
    distilled for ``omg_steps`` steps. The side-by-side PNG goes to ``out_dir`` (default: a new temporary folder)."""
    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .container import size_report
    from .methods import orbit_views, build_model, camera_rows, evaluate
    from .omg import OMGConfig
    from .ply import ply_bytes
    from .render import render
    from .svq import SVQConfig
    from .uniform import Uniform8Config
    from .vq import VQConfig

    folder = Path(out_dir or tempfile.mkdtemp(prefix="polyquant-gaussians-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with demo_threads():
        model = build_model({"name": "fitted-s0"})
        scene = model.scene().detach()
        cams = orbit_views(scene, views, size, None, seed=2)
        calib = [camera_rows(orbit_views(scene, 8, size, None, seed=1))]
        float_bytes = ply_bytes(scene)
        shown_cam = orbit_views(scene, 1, 160, None, seed=0)[0]
        with torch.no_grad():
            shown = {f"float .ply ({float_bytes / 1024:.0f} KiB)": render(scene, shown_cam)}
        methods = {"svq": SVQConfig(), "vq (equal entries)": VQConfig(), "uniform8": Uniform8Config(),
                   "omg": OMGConfig(distill_steps=omg_steps, post_steps=20)}
        for label, config in methods.items():
            t0 = time.perf_counter()
            qm = pq.quantize(model, config, calib=calib, progress=False)
            seconds = time.perf_counter() - t0
            path = pq.save(qm, folder / f"{label.split()[0]}.pqs")
            sizes = size_report(path)
            total = path.stat().st_size
            with torch.no_grad():
                decoded = pq.load(path).model.scene()
                fit = evaluate(scene, decoded, cams)
                shown[f"{label} ({total / 1024:.0f} KiB)"] = render(decoded, shown_cam)
            n = scene.num_gaussians
            rows.append((label, f"{qm.model.index_bits()}", f"{8 * sizes['indices'] / n:.1f}", f"{total / n:.1f}",
                         f"{float_bytes / total:.1f}x", f"{fit['psnr']:.2f}", f"{fit['ssim']:.4f}", f"{seconds:.1f}"))
    image = save_side_by_side(shown, folder / "renders.png")
    title = (f"shipped 3DGS scene fitted-s0 ({scene.num_gaussians:,} Gaussians, SH degree 3, float .ply "
             f"{float_bytes:,} bytes); PSNR / SSIM against the float scene on {views} held-out {size} px views")
    note = (f"Side by side (float, then each method, decoded from its file): {image}. Files in {folder}; positions "
            "are fp16, coded losslessly (non-G-PCC). benchmarks/gaussians.md has 3 fitted scenes with PSNR against "
            "the ground truth.")
    return text_table(title, ("method", "index bits/G", "coded bits/G", "file B/G", "vs .ply", "PSNR dB", "SSIM",
                              "s"), rows, note)


if __name__ == "__main__":
    print(run_demo())
