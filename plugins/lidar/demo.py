"""``polyquant demo lidar``: the shipped CenterPoint-Pillar at INT8 under max-min, entropy and LiDAR-PTQ
(offline, about a minute): BEV AP near / mid / far on held-out synthetic scenes, and a BEV plot of one scene's
points with the float and each method's detections beside the ground truth, written as a PNG."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_demo", "save_bev_plot"]


def _box_outline(box: torch.Tensor) -> torch.Tensor:
    cx, cy, _, length, width, _, yaw = box.tolist()
    c, s = math.cos(yaw), math.sin(yaw)
    local = torch.tensor([[length / 2, width / 2], [-length / 2, width / 2], [-length / 2, -width / 2],
                          [length / 2, -width / 2], [length / 2, width / 2]])
    return local @ torch.tensor([[c, -s], [s, c]]).T + torch.tensor([cx, cy])


def save_bev_plot(scene: Any, detections: dict[str, Any], path: str | Path, extent: float = 40.0) -> Path:
    """A PNG: one panel per entry of ``detections`` (label -> ``targets.Detections``), each with the scene's
    points (bird's-eye view), its ground-truth boxes (green) and the detections (red, score > 0.3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(detections), figsize=(3.2 * len(detections), 3.4), squeeze=False)
    pts = scene.points
    for ax, (label, dets) in zip(axes[0], detections.items()):
        ax.scatter(pts[:, 1].numpy(), pts[:, 0].numpy(), s=0.3, c="0.5")
        for box in scene.boxes:
            o = _box_outline(box)
            ax.plot(o[:, 1].numpy(), o[:, 0].numpy(), color="tab:green", lw=1.2)
        for box, score in zip(dets.boxes, dets.scores):
            if float(score) > 0.3:
                o = _box_outline(box)
                ax.plot(o[:, 1].numpy(), o[:, 0].numpy(), color="tab:red", lw=0.8, ls="--")
        ax.set_xlim(-extent / 2, extent / 2)
        ax.set_ylim(0, extent)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_demo(calib_scenes: int = 32, eval_scenes: int = 100, iters: int = 100, out_dir: str | None = None) -> str:
    """Max-min, entropy and LiDAR-PTQ (``iters`` reconstruction steps per block) at W8A8 on ``calib_scenes``
    calibration scenes; AP on ``eval_scenes`` held-out scenes. The BEV PNG goes to ``out_dir`` (default: a new
    temporary folder)."""
    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .baselines import EntropyConfig, MinMaxConfig
    from .data import calib_scenes as pool, held_out_scenes
    from .lidarptq import LidarPTQConfig
    from .methods import build_model, evaluate_detector
    from .model import scene_batch
    from .targets import decode

    folder = Path(out_dir or tempfile.mkdtemp(prefix="polyquant-lidar-"))
    folder.mkdir(parents=True, exist_ok=True)
    with demo_threads():
        model = build_model()
        calib = [scene_batch(pool(calib_scenes, seed=0)[i:i + 8]) for i in range(0, calib_scenes, 8)]
        scenes = held_out_scenes(eval_scenes)
        shown = scenes[1]
        models: dict[str, Any] = {"float": (model, 0.0)}
        for label, config in {"minmax": MinMaxConfig(), "entropy": EntropyConfig(),
                              "lidarptq": LidarPTQConfig(iters=iters)}.items():
            t0 = time.perf_counter()
            qm = pq.quantize(model, config, calib=calib, progress=False)
            models[label] = (qm.model, time.perf_counter() - t0)
        rows, panels = [], {}
        for label, (m, seconds) in models.items():
            r = evaluate_detector(m, scenes)
            rng = r["range"]
            rows.append((label, f"{r['mAP']:.3f}", f"{rng['near']['mAP']:.3f}", f"{rng['mid']['mAP']:.3f}",
                         f"{rng['far']['mAP']:.3f}", f"{r['mAPH']:.3f}", f"{seconds:.1f}" if seconds else "-"))
            with torch.no_grad():
                panels[f"{label} (mAP {r['mAP']:.3f})"] = decode(m(**scene_batch([shown])), m.grid)[0]
    image = save_bev_plot(shown, panels, folder / "bev.png")
    title = (f"CenterPoint-Pillar on synthetic LiDAR scenes (40 x 40 m, 64 x 64 pillars, ~90% empty), W8A8, "
             f"{calib_scenes} calibration scenes, {eval_scenes} held-out scenes")
    note = (f"BEV AP over centre distances 0.5 / 1 / 2 / 4 m; near < 10 m, mid 10-20 m, far >= 20 m. "
            f"BEV plot: {image}. benchmarks/lidar.md has 3 calibration seeds, BRECQ, QDrop and the ablation ladder.")
    return text_table(title, ("method", "mAP", "near", "mid", "far", "mAPH", "calib s"), rows, note)


if __name__ == "__main__":
    print(run_demo())
