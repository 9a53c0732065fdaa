"""``polyquant demo lidar``: the shipped CenterPoint-Pillar at W8A8 under max-min, entropy and LiDAR-PTQ (offline;
about a minute on 2 cores, most of it LiDAR-PTQ's block reconstruction). Returns a report section: BEV mAP near /
mid / far of the fake-quant models on held-out synthetic scenes; simulated vs real: the fake-quant mAP beside the
mAP of each model saved and loaded back packed (int8 conv codes), on fewer scenes; the artifact bytes; the time
per batch of scenes of the float and the packed models; and a BEV plot of one scene's points with the float and
each packed model's detections beside the ground truth."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from polyquant.report import Figure, Section, Table, figure_png, pyplot

__all__ = ["bev_figure", "run_demo"]


def _box_outline(box: torch.Tensor) -> torch.Tensor:
    cx, cy, _, length, width, _, yaw = box.tolist()
    c, s = math.cos(yaw), math.sin(yaw)
    local = torch.tensor([[length / 2, width / 2], [-length / 2, width / 2], [-length / 2, -width / 2],
                          [length / 2, -width / 2], [length / 2, width / 2]])
    return local @ torch.tensor([[c, -s], [s, c]]).T + torch.tensor([cx, cy])  # (5, 2): x, y


def bev_figure(scene: Any, detections: dict[str, Any], extent: float = 40.0, caption: str = "") -> Figure:
    """The BEV plot as a report ``Figure``: one panel per entry of ``detections`` (title -> ``targets.Detections``),
    each with the scene's points (bird's-eye view: lateral y across, forward x up, metres), its ground-truth boxes
    (green) and the detections scoring above 0.3 (red, dashed)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(detections), figsize=(3.0 * len(detections), 3.7), squeeze=False)
    pts = scene.points
    for ax, (label, dets) in zip(axes[0], detections.items()):
        ax.scatter(pts[:, 1].numpy(), pts[:, 0].numpy(), s=0.3, c="0.5", label="points")
        for j, box in enumerate(scene.boxes):
            o = _box_outline(box)
            ax.plot(o[:, 1].numpy(), o[:, 0].numpy(), color="tab:green", lw=1.2,
                    label="ground truth" if j == 0 else None)
        shown = [box for box, score in zip(dets.boxes, dets.scores) if float(score) > 0.3]
        for j, box in enumerate(shown):
            o = _box_outline(box)
            ax.plot(o[:, 1].numpy(), o[:, 0].numpy(), color="tab:red", lw=0.8, ls="--",
                    label="detection (score > 0.3)" if j == 0 else None)
        ax.set_xlim(-extent / 2, extent / 2)
        ax.set_ylim(0, extent)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("y, lateral (m)", fontsize=7)
        ax.set_ylabel("x, forward (m)", fontsize=7)
        ax.tick_params(labelsize=6)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, markerscale=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return figure_png(fig, "BEV detections", caption)


def run_demo(calib_scenes: int = 32, eval_scenes: int = 100, packed_scenes: int = 40, iters: int = 20,
             grid: int = 25, search_scenes: int = 8) -> Section:
    """Max-min, entropy and LiDAR-PTQ (``iters`` reconstruction steps per block, a ``grid``-ratio activation search
    on ``search_scenes`` scenes) at W8A8 on ``calib_scenes`` calibration scenes; fake-quant AP on ``eval_scenes``
    held-out scenes, fake-quant and packed AP on the first ``packed_scenes`` of them. Artifacts go to a temporary
    folder that is removed."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, demo_progress, demo_threads, median_seconds, packed_copy

    from .baselines import EntropyConfig, MinMaxConfig
    from .data import calib_scenes as pool, held_out_scenes
    from .lidarptq import LidarPTQConfig
    from .methods import build_model, detect
    from .metrics import evaluate
    from .model import scene_batch

    if not 2 <= packed_scenes <= eval_scenes:
        raise ValueError(f"packed_scenes must be in [2, eval_scenes = {eval_scenes}], got {packed_scenes}")
    steps = demo_progress(total=5)
    configs = {"minmax": MinMaxConfig(), "entropy": EntropyConfig(),
               "lidarptq": LidarPTQConfig(iters=iters, grid=grid, search_scenes=min(search_scenes, calib_scenes))}
    rows: list[list[str]] = []
    panels: dict[str, Any] = {}
    fake_vs_packed: dict[str, tuple[float, float]] = {}
    sizes: dict[str, int] = {}
    with demo_threads(), tempfile.TemporaryDirectory(prefix="polyquant-lidar-") as tmp:
        model = build_model().eval()
        calib = [scene_batch(pool(calib_scenes, seed=0)[i:i + 8]) for i in range(0, calib_scenes, 8)]
        scenes = held_out_scenes(eval_scenes)
        subset = scenes[:packed_scenes]
        shown = 1  # the BEV plot's scene (inside the packed subset)
        timed = scene_batch(scenes[:8])  # the same batch for every timing

        def forward_ms(m: torch.nn.Module) -> float:
            with torch.no_grad():
                return 1e3 * median_seconds(lambda: m(**timed))

        def row(label: str, m: torch.nn.Module, real: torch.nn.Module, size: int, seconds: str) -> float:
            dets = detect(m, scenes)
            r = evaluate(dets, scenes)
            fake_sub = r if packed_scenes == eval_scenes else evaluate(dets[:packed_scenes], subset)
            real_dets = dets[:packed_scenes] if real is m else detect(real, subset)
            real_sub = fake_sub if real is m else evaluate(real_dets, subset)
            rng = r["range"]
            rows.append([label, f"{r['mAP']:.3f}", f"{rng['near']['mAP']:.3f}", f"{rng['mid']['mAP']:.3f}",
                         f"{rng['far']['mAP']:.3f}", f"{r['mAPH']:.3f}", f"{fake_sub['mAP']:.3f}",
                         f"{real_sub['mAP']:.3f}", f"{size:,}", f"{forward_ms(real):.1f}", seconds])
            fake_vs_packed[label] = (fake_sub["mAP"], real_sub["mAP"])
            sizes[label] = size
            panels[f"{label}{'' if real is m else ' packed'} (mAP {real_sub['mAP']:.3f})"] = real_dets[shown]
            return float(r["mAP"])

        maps = {"float": row("float", model, model, checkpoint_bytes(model.state_dict(), tmp, "float"), "-")}
        steps.update(1, step="float")
        for label, config in configs.items():
            t0 = time.perf_counter()
            qm = pq.quantize(model, config, calib=calib, progress=False)
            seconds = time.perf_counter() - t0
            packed, size = packed_copy(qm, tmp, label)
            maps[label] = row(label, qm.model, packed, size, f"{seconds:.1f}")
            steps.update(1, step=label)
        fp_bytes = sizes["float"]
        caption = (f"held-out scene {shown} of {eval_scenes}: the float model's and each packed model's detections "
                   "(red, dashed, score > 0.3) beside the ground-truth boxes (green); titles: mAP on the "
                   f"{packed_scenes} scenes the packed models were evaluated on")
        figure = bev_figure(scenes[shown], panels, caption=caption)
        steps.update(1, step="figure")
        threads = torch.get_num_threads()

    subset_text = "the same" if packed_scenes == eval_scenes else f"the first {packed_scenes}"
    table = Table(
        f"W8A8 on {eval_scenes} held-out scenes; simulated (fake-quant) vs real (packed) on {subset_text} scenes",
        ["method", "mAP", "near", "mid", "far", "mAPH", f"mAP fake-quant ({packed_scenes} scenes)",
         f"mAP packed ({packed_scenes} scenes)", "artifact bytes", "ms / batch of 8 scenes", "quantize s (one run)"],
        rows,
        note=("mAP / near / mid / far / mAPH: the fake-quant models (float weights on the int8 grid, activations "
              "quantize-dequantize) on all held-out scenes; BEV AP over centre distances 0.5 / 1 / 2 / 4 m, near "
              "< 10 m, mid 10-20 m, far >= 20 m. Packed: the artifact saved and loaded back with "
              "polyquant.load(mode='packed') (packed_copy): the convs hold int8 weight codes (PackedConv), decoded "
              "to fp32 at every call before torch's float convolution (no integer conv kernel on CPU), activations "
              "still quantize-dequantize, so packed and fake-quant compute the same function up to fp32 rounding. "
              f"Packed on {packed_scenes} of the {eval_scenes} scenes to keep the demo short, fake-quant on the same "
              "scenes beside it. Artifact bytes: the saved file; float row: the float model's state_dict as fp32 "
              "safetensors, the float model in both mAP columns. ms / batch: median of 5 forwards after a warm-up, "
              f"8 scenes, {threads} torch thread(s); float row: the float fp32 model; method rows: the packed model "
              "(weight decode and activation quantize-dequantize on top of the float convs)."))
    gap = max(abs(f - p) for f, p in fake_vs_packed.values())
    headline = (f"LiDAR-PTQ W8A8 mAP {maps['lidarptq']:.3f} vs max-min {maps['minmax']:.3f}, entropy "
                f"{maps['entropy']:.3f} (float {maps['float']:.3f}); packed artifact "
                f"{fp_bytes / sizes['lidarptq']:.1f}x smaller than fp32, packed mAP "
                + ("equal to fake-quant to 3 decimals" if gap < 5e-4 else f"within {gap:.3f} of fake-quant")
                + f" on {packed_scenes} scenes")
    return Section(
        domain="lidar",
        title=(f"CenterPoint-Pillar on synthetic LiDAR scenes (40 x 40 m, 64 x 64 pillars, ~90% empty), W8A8: "
               f"max-min, entropy and LiDAR-PTQ calibrated on {calib_scenes} scenes"),
        headline=headline,
        reduced=(f"LiDAR-PTQ with {iters} reconstruction steps per block and a {grid}-ratio activation search on "
                 f"{min(search_scenes, calib_scenes)} scenes, one calibration seed, {eval_scenes} held-out scenes "
                 f"({packed_scenes} for the packed models) (benchmarks/lidar.py: 100 steps, 100 ratios on 32 scenes, "
                 "3 seeds, 160 scenes, also percentile, BRECQ, QDrop and W4A8 / W6A6)."),
        tables=[table],
        figures=[figure],
        notes=["benchmarks/lidar.md has 3 calibration seeds on 160 held-out scenes, BRECQ, QDrop, percentile, the "
               "LiDAR-PTQ ablation ladder (grid search, TGPL, adaptive rounding) and W4A8 / W6A6 with the first PFN "
               "layer float."],
    )


if __name__ == "__main__":
    print(run_demo())
