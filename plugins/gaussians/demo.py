"""``polyquant demo gaussians``: the shipped fitted 3DGS scene (4,096 Gaussians, SH degree 3) compressed by svq,
full-vector vq, uniform8 and omg (offline; about half a minute on 2 cores at the reduced defaults, most of it
k-means and OMG's MLP distillation). Returns a report section: index bits per Gaussian before and after entropy
coding, file bytes and the ratio against the float .ply; simulated vs real: render PSNR against the float scene of
the quantized model in memory beside that of the scene decoded from its saved file, SSIM, and the render time of the
float and the decoded scene; and a figure of one view rendered by the float scene and each decoded file."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from polyquant.report import Figure, Section, Table, figure_png, pyplot

__all__ = ["renders_figure", "run_demo"]


def renders_figure(images: dict[str, Tensor], caption: str = "") -> Figure:
    """The report ``Figure`` "renders side by side": (3, H, W) images in [0, 1], one image panel each (axes
    hidden), titled with its key."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6), squeeze=False)
    for ax, (label, img) in zip(axes[0], images.items()):
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return figure_png(fig, "renders side by side", caption)


def run_demo(views: int = 2, size: int = 48, omg_steps: int = 100, kmeans_iters: int = 10,
             shown_size: int = 96) -> Section:
    """Every method on the shipped scene ``fitted-s0``: k-means with ``kmeans_iters`` Lloyd iterations, OMG's MLPs
    distilled for ``omg_steps`` steps; PSNR / SSIM against the float scene on ``views`` held-out orbit views of
    ``size`` px; the figure shows one more view at ``shown_size`` px. Artifacts go to a temporary folder that is
    removed."""
    import polyquant as pq
    from polyquant.demo import demo_progress, demo_threads, median_seconds, packed_copy
    from polyquant.metrics import psnr, ssim

    from .container import size_report
    from .methods import build_model, camera_rows, orbit_views
    from .omg import OMGConfig
    from .ply import ply_bytes
    from .render import render
    from .scene import GaussianScene
    from .svq import SVQConfig
    from .uniform import Uniform8Config
    from .vq import VQConfig

    steps = demo_progress(total=6)
    methods = {"svq": SVQConfig(kmeans_iters=kmeans_iters), "vq (equal entries)": VQConfig(kmeans_iters=kmeans_iters),
               "uniform8": Uniform8Config(),
               "omg": OMGConfig(distill_steps=omg_steps, post_steps=10, kmeans_iters=kmeans_iters)}
    with demo_threads(), tempfile.TemporaryDirectory(prefix="polyquant-gaussians-") as tmp, torch.no_grad():
        model = build_model({"name": "fitted-s0"})
        scene = model.scene().detach()
        n = scene.num_gaussians
        cams = orbit_views(scene, views, size, None, seed=2)
        calib = [camera_rows(orbit_views(scene, 4, size, None, seed=1))]
        timed = cams[0].to_tensor()  # the camera row every render time is measured on
        shown_cam = orbit_views(scene, 1, shown_size, None, seed=0)[0]
        reference = [render(scene, c).clamp(0, 1) for c in cams]
        shown_ref = render(scene, shown_cam).clamp(0, 1)

        def images(s: GaussianScene) -> list[Tensor]:
            return [render(s, c).clamp(0, 1) for c in cams]

        def render_ms(m: torch.nn.Module) -> float:
            return 1e3 * median_seconds(lambda: m(timed))

        float_bytes = ply_bytes(scene)
        rows = [["float", "-", "-", f"{float_bytes:,}", "1.0x", "- (reference)", "- (reference)", "-",
                 f"{render_ms(model):.1f}", "-"]]
        shown = {"float (reference)": shown_ref}
        results: dict[str, dict[str, float]] = {}
        steps.update(1, step="float renders")
        for label, config in methods.items():
            t0 = time.perf_counter()
            with torch.enable_grad():
                qm = pq.quantize(model, config, calib=calib, progress=False)
            seconds = time.perf_counter() - t0
            name = label.split()[0]
            decoded_model, file_bytes = packed_copy(qm, tmp, name)
            sizes = size_report(Path(tmp) / f"{name}.safetensors")  # packed_copy's file
            simulated = images(qm.model.scene())
            decoded = decoded_model.scene()
            real = images(decoded)
            sim_psnr = sum(psnr(a, b) for a, b in zip(reference, simulated)) / views
            real_psnr = sum(psnr(a, b) for a, b in zip(reference, real)) / views
            real_ssim = sum(ssim(a, b) for a, b in zip(reference, real)) / views
            img = render(decoded, shown_cam).clamp(0, 1)
            shown[f"{label}: {psnr(shown_ref, img):.1f} dB"] = img
            results[label] = {"psnr": real_psnr, "sim": sim_psnr, "ratio": float_bytes / file_bytes}
            rows.append([label, f"{qm.model.index_bits()}", f"{8 * sizes['indices'] / n:.1f}", f"{file_bytes:,}",
                         f"{float_bytes / file_bytes:.1f}x", f"{sim_psnr:.2f}", f"{real_psnr:.2f}",
                         f"{real_ssim:.4f}", f"{render_ms(decoded_model):.1f}", f"{seconds:.1f}"])
            steps.update(1, step=label)
        figure = renders_figure(shown, caption=(
            f"one orbit view ({shown_size} px, not among the table's views) rendered by the float scene and by each "
            "method's scene decoded from its saved file; titles: PSNR of this view against the float render"))
        steps.update(1, step="figure")
        threads = torch.get_num_threads()

    same = all(r["psnr"] == r["sim"] for r in results.values())
    table = Table(
        f"every method on fitted-s0 ({n:,} Gaussians): simulated (in memory) vs real (decoded from the file), PSNR "
        f"/ SSIM against the float scene on {views} held-out {size} px views",
        ["method", "index bits / G", "coded bits / G", "file bytes", "vs .ply", "PSNR dB simulated",
         "PSNR dB real", "SSIM real", "render ms", "quantize s (one run)"],
        rows,
        note=("Index bits / G: the fixed-length codes per Gaussian; coded: the range-coded index streams of the "
              "file per Gaussian. File bytes: the written artifact (positions fp16, coded losslessly with delta + "
              "LZMA, non-G-PCC; indices; fp16 codebooks / MLPs); float row: the float scene as a standard 3DGS .ply "
              "(fp32 attributes and zero normals). Simulated: the quantized model the method returned, in memory; "
              "real: the artifact saved and loaded back (packed_copy; the gaussians models hold their codes and "
              "decode them by lookup at every render, there is no weight GEMM to pack). Render ms: median of 5 "
              f"renders after a warm-up of one {size} px view, {threads} torch thread(s), the pure-torch CPU "
              "rasterizer; float row: the float scene, method rows: the decoded model (attribute decode: codebook "
              "lookup, 8-bit dequantize or OMG's MLPs, then the same rasterizer)."))
    headline = (f"svq {results['svq']['psnr']:.1f} dB at {results['svq']['ratio']:.1f}x smaller than the .ply vs "
                f"full-vector vq (equal entries) {results['vq (equal entries)']['psnr']:.1f} dB at "
                f"{results['vq (equal entries)']['ratio']:.1f}x; omg {results['omg']['ratio']:.1f}x at "
                f"{results['omg']['psnr']:.1f} dB; uniform8 {results['uniform8']['ratio']:.1f}x at "
                f"{results['uniform8']['psnr']:.1f} dB (PSNR against the float scene); "
                + ("the decoded files render exactly as the in-memory models" if same else
                   "decoded files differ from the in-memory models (see the table)"))
    return Section(
        domain="gaussians",
        title=(f"shipped 3DGS scene fitted-s0 ({n:,} Gaussians, SH degree 3, float .ply {float_bytes:,} bytes) "
               "compressed by svq (OMG sub-vector VQ), vq (full vectors, equal entries), uniform8 and omg (MLPs + "
               "SVQ)"),
        headline=headline,
        reduced=(f"{views} held-out {size} px views against the float scene, k-means {kmeans_iters} Lloyd iterations, "
                 f"OMG distilled {omg_steps} steps with 10 render steps after SVQ on 4 calibration views, no codebook "
                 "fine-tuning row (benchmarks/gaussians.py: 3 fitted scenes of 8,192 Gaussians, 16 views of 64 px "
                 "against the ground truth, k-means 100 iterations, OMG 1500 + 100 steps)."),
        tables=[table],
        figures=[figure],
        notes=["benchmarks/gaussians.md has 3 fitted scenes (8,192 Gaussians each) with PSNR / SSIM against the "
               "ground truth and the drop from the float scene, svq with codebook fine-tuning, OMG's MLPs before "
               "SVQ, bytes per file component and per-attribute SQNR."],
    )


if __name__ == "__main__":
    print(run_demo())
