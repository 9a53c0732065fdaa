"""``polyquant demo diffusion``: FP4DiT W4A8 beside its baselines on the shipped digits DiT, then CacheQuant's
ablations on the shipped digits UNet (offline, ~1 min), each with a grid image of float vs quantized samples (same
labels and noise, one row per model)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["run_demo", "run_cachequant_demo", "save_grid"]


def save_grid(rows: dict[str, Tensor], path: str | Path, scale: int = 4) -> Path:
    """A PNG of image rows (label -> (N, 1, S, S) in [-1, 1]): one row per label, top to bottom, pixels scaled
    up ``scale`` times (nearest), 2-pixel gaps; the labels are the caller's to print (the image has no text)."""
    from PIL import Image

    blocks = []
    for images in rows.values():
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # (N, S, S)
        x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=255)
        blocks.append(torch.cat(list(x), dim=1))  # (S', N S')
    grid = torch.cat(blocks, dim=0).numpy()
    path = Path(path)
    Image.fromarray(grid, mode="L").save(path)
    return path


def run_demo(calib_images: int = 10, recon_iters: int = 100, out_dir: str | None = None,
             cachequant: bool = True) -> str:
    """Float vs fp4dit (RTN and scale-aware AdaRound), fp_fixed_bias, int_minmax, INT AdaRound and int8 at
    W4A8 on 10 samples (labels 0..9, PLMS-20, seed 1000): PSNR vs float, class accuracy, calibration seconds;
    the grid image goes to ``out_dir`` (default: a new temporary folder), its path in the report."""
    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .baselines import AdaRoundConfig, FixedBiasConfig, Int8Config, IntMinMaxConfig
    from .calib import timestep_batches
    from .fp4dit import FP4DiTConfig
    from .methods import build_model
    from .models import SHIPPED, class_accuracy, psnr, sample

    configs = {"fp4dit RTN": FP4DiTConfig(),
               f"fp4dit + scale-aware AdaRound ({recon_iters} it)": FP4DiTConfig(recon_iters=recon_iters,
                                                                                 recon_lr=1e-3),
               "fp_fixed_bias": FixedBiasConfig(), "int_minmax": IntMinMaxConfig(),
               f"adaround INT4 ({recon_iters} it)": AdaRoundConfig(recon_iters=recon_iters), "int8 (W8A8)": Int8Config()}
    labels = torch.arange(10)
    with demo_threads():
        model = build_model({"name": SHIPPED})
        calib = timestep_batches(model, torch.arange(calib_images) % 10, steps=20, scheduler="plms", seed=0)
        fp = sample(model.transformer, labels, steps=20, scheduler="plms", seed=1000)
        grid = {"float": fp}
        rows = [("float", "-", f"{class_accuracy(fp, labels):.0f}", "-")]
        for label, config in configs.items():
            t0 = time.perf_counter()
            q = pq.quantize(model, config, calib=calib, progress=False).model
            seconds = time.perf_counter() - t0
            img = sample(q.transformer, labels, steps=20, scheduler="plms", seed=1000)
            grid[label] = img
            rows.append((label, f"{psnr(fp, img):.2f}", f"{class_accuracy(img, labels):.0f}", f"{seconds:.1f}"))
    path = save_grid(grid, Path(out_dir or tempfile.mkdtemp(prefix="polyquant-diffusion-")) / "samples.png")
    title = (f"digits DiT (diffusers DiTTransformer2DModel, 8x8), W4A8 (int8: W8A8), {calib_images} calibration "
             "images x 21 PLMS calls; 10 samples, labels 0..9, PLMS-20, the same noise for every row")
    note = (f"Grid image (rows top to bottom: {', '.join(grid)}): {path}. benchmarks/diffusion.md has 3 seeds, "
            "W4A6 and longer reconstruction. Fake-quant simulation on the CPU.")
    text = text_table(title, ("model", "PSNR vs float (dB)", "class acc. %", "calib s"), rows, note)
    if cachequant:
        text += "\n\n" + run_cachequant_demo(calib_images=calib_images, out_dir=str(path.parent))
    return text


def run_cachequant_demo(calib_images: int = 10, steps: int = 20, interval: int = 4, out_dir: str | None = None) -> str:
    """CacheQuant W8A8 on the shipped digits UNet (DDIM ``steps``, cache interval ``interval``): cache only, quant
    only, the naive combination and the full method, on 10 samples (labels 0..9, seed 1000): PSNR vs the float
    model without cache, class accuracy, the counted theoretical speedup; grid image ``samples_unet.png``."""
    import polyquant as pq
    from polyquant.demo import demo_threads, text_table

    from .cache import FeatureCache, uniform_schedule
    from .cachequant import CacheQuantConfig, cached_sample, schedule_macs
    from .calib import timestep_batches
    from .methods import build_model
    from .models import class_accuracy, psnr, sample, zero_batch
    from .unet import UNET_SHIPPED

    labels = torch.arange(10)
    configs = {"quant only (W8A8, no cache)": CacheQuantConfig(steps=steps, interval=1, dec_cache=False,
                                                               dec_quant=False),
               "naive quant + cache": CacheQuantConfig(steps=steps, interval=interval, schedule="uniform",
                                                       dec_cache=False, dec_quant=False, calib_cached=False),
               "CacheQuant (DPS + DEC)": CacheQuantConfig(steps=steps, interval=interval)}
    with demo_threads():
        model = build_model({"name": UNET_SHIPPED})
        calib = timestep_batches(model, torch.arange(calib_images) % 10, steps=steps, scheduler="ddim", seed=0)
        fp = sample(model.unet, labels, steps=steps, scheduler="ddim", seed=1000)
        uniform = uniform_schedule(steps, interval)
        with FeatureCache(model, uniform):
            cached = sample(model.unet, labels, steps=steps, scheduler="ddim", seed=1000)
        grid = {"float": fp, "cache only": cached}
        rows = [("float", "-", f"{class_accuracy(fp, labels):.0f}", "1.00x", "-"),
                ("cache only (float, uniform)", f"{psnr(fp, cached):.2f}", f"{class_accuracy(cached, labels):.0f}",
                 f"{schedule_macs(model, uniform, zero_batch(model))['speedup']:.2f}x", "-")]
        for label, config in configs.items():
            t0 = time.perf_counter()
            q = pq.quantize(model, config, calib=calib, progress=False).model
            seconds = time.perf_counter() - t0
            img = cached_sample(q, labels, seed=1000)
            grid[label] = img
            rows.append((label, f"{psnr(fp, img):.2f}", f"{class_accuracy(img, labels):.0f}",
                         f"{schedule_macs(model, q.schedule, zero_batch(model))['speedup']:.2f}x", f"{seconds:.1f}"))
    path = save_grid(grid, Path(out_dir or tempfile.mkdtemp(prefix="polyquant-diffusion-")) / "samples_unet.png")
    title = (f"CacheQuant: digits UNet (diffusers UNet2DModel, 8x8), DDIM-{steps}, cache interval {interval}, "
             f"{calib_images} calibration images; 10 samples, labels 0..9, the same noise for every row")
    note = (f"Grid image (rows top to bottom: {', '.join(grid)}): {path}. Speedup: full-step over mean per-step "
            "MACs (convolutions and linear layers), counted, not timed. benchmarks/diffusion_cachequant.md has "
            "DDIM-50, 3 seeds, W4A8 and every ablation.")
    return text_table(title, ("model", "PSNR vs float (dB)", "class acc. %", "speedup", "quantize s"), rows, note)


if __name__ == "__main__":
    print(run_demo())
