"""``polyquant demo diffusion``: one report section on the shipped digits models (offline; about 45 s on 2 cores,
about 50 s on one; most of it the two 100-iteration AdaRound runs and CacheQuant's calibrations):

1. FP4DiT W4A8 (RTN and scale-aware AdaRound) beside fp_fixed_bias, int_minmax, INT4 AdaRound and int8 (W8A8) on
   the digits DiT: 10 samples (labels 0..9, PLMS-20, the same noise for every model) scored by PSNR vs the float
   samples and class accuracy, on the fake-quant model and on the artifact loaded back packed, with artifact bytes
   and the time of one denoiser call (float vs packed);
2. CacheQuant W8A8 on the digits UNet (DDIM-20, cache interval 4): cache only, quant only, the naive combination
   and the full method (DPS + DEC), the same columns and the counted speedup;
3. ZOODiP on the INT8 weight-only UNet: a new class learned from 16 images of the digit 3 (60 steps) beside plain
   zeroth-order training and backprop textual inversion, the loss of a fixed held set every 5 steps.

Figures: the sample grids (rows = models, columns = class labels), the cache schedules, the loss curves.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyquant.config import QuantConfig
from polyquant.report import Figure, Section, Table, figure_png, pyplot

from .cache import CacheSchedule

__all__ = ["run_demo"]

LABELS = torch.arange(10)  # one sample of each class, the same noise (seed 1000) for every model
SEED = 1000
CONCEPT = 3  # ZOODiP's new class: the digit whose training images are the references
EVAL_EVERY = 5  # ZOODiP: steps between evaluations of the held set


@dataclass
class _Rows:
    """One table's rows and the sample grid of its models (fake-quant samples)."""

    rows: list[list[str]] = field(default_factory=list)
    grid: dict[str, Tensor] = field(default_factory=dict)
    psnr: dict[str, float] = field(default_factory=dict)
    acc: dict[str, float] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)


def _denoiser_ms(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """Median milliseconds of one denoiser call on ``batch`` (``median_seconds``: one warm-up, median of 5)."""
    from polyquant.demo import median_seconds

    def call() -> None:
        with torch.no_grad():
            model(**batch)

    return median_seconds(call) * 1e3


def _timing_batch(model: nn.Module) -> dict[str, Tensor]:
    """10 noisy inputs (labels 0..9) at timestep 500: the batch every row's call is timed on."""
    s, c = int(model.config.sample_size), int(model.config.in_channels)
    x = torch.randn(len(LABELS), c, s, s, generator=torch.Generator().manual_seed(0))
    return {"x_t": x, "t": torch.full((len(LABELS),), 500), "labels": LABELS.clone()}


def _dit_rows(calib_images: int, recon_iters: int, steps: int, folder: Path, tick: Callable[[str], None]) -> _Rows:
    """Float, FP4DiT and the baselines on the digits DiT (W4A8; int8: W8A8)."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, packed_copy

    from .baselines import AdaRoundConfig, FixedBiasConfig, Int8Config, IntMinMaxConfig
    from .calib import timestep_batches
    from .fp4dit import FP4DiTConfig
    from .methods import build_model
    from .models import SHIPPED, class_accuracy, psnr, sample

    configs: dict[str, QuantConfig] = {
        "fp4dit RTN": FP4DiTConfig(),
        f"fp4dit + scale-aware AdaRound ({recon_iters} it)": FP4DiTConfig(recon_iters=recon_iters, recon_lr=1e-3),
        "fp_fixed_bias": FixedBiasConfig(), "int_minmax": IntMinMaxConfig(),
        f"adaround INT4 ({recon_iters} it)": AdaRoundConfig(recon_iters=recon_iters), "int8 (W8A8)": Int8Config()}
    out = _Rows()
    model = build_model({"name": SHIPPED})
    calib = timestep_batches(model, torch.arange(calib_images) % 10, steps=steps, scheduler="plms", seed=0)
    batch = _timing_batch(model)
    fp = sample(model.transformer, LABELS, steps=steps, scheduler="plms", seed=SEED)
    out.grid["float"], out.acc["float"] = fp, class_accuracy(fp, LABELS)
    out.nbytes["float"] = checkpoint_bytes(model.state_dict(), folder, "dit-float")
    out.ms["float"] = _denoiser_ms(model, batch)
    out.rows.append(["float (fp32)", "-", "-", f"{out.acc['float']:.0f}", "-", f"{out.nbytes['float']:,}",
                     f"{out.ms['float']:.2f}", "-"])
    tick("digits DiT: float")
    for i, (label, config) in enumerate(configs.items()):
        t0 = time.perf_counter()
        qm = pq.quantize(model, config, calib=calib, progress=False)
        seconds = time.perf_counter() - t0
        img = sample(qm.model.transformer, LABELS, steps=steps, scheduler="plms", seed=SEED)
        packed, nbytes = packed_copy(qm, folder, f"dit-{i}")
        p_img = sample(packed.transformer, LABELS, steps=steps, scheduler="plms", seed=SEED)
        out.grid[label], out.psnr[label], out.acc[label] = img, psnr(fp, img), class_accuracy(img, LABELS)
        out.nbytes[label], out.ms[label] = nbytes, _denoiser_ms(packed, batch)
        out.rows.append([label, f"{out.psnr[label]:.2f}", f"{psnr(fp, p_img):.2f}", f"{out.acc[label]:.0f}",
                         f"{class_accuracy(p_img, LABELS):.0f}", f"{nbytes:,}", f"{out.ms[label]:.2f}",
                         f"{seconds:.1f}"])
        tick(f"digits DiT: {label}")
    return out


@dataclass
class _CacheRun:
    rows: _Rows
    uniform: CacheSchedule
    dps: CacheSchedule  # CacheQuant's (the quantized model's ``schedule``)
    feature_change: list[float]  # mean |F_t - F_(t-1)| of the float cache feature, steps 1..T-1
    speedup: dict[str, float]


def _unet_rows(calib_images: int, steps: int, interval: int, folder: Path, tick: Callable[[str], None]) -> _CacheRun:
    """Float, cache only and CacheQuant's ablations (W8A8) on the digits UNet, DDIM-``steps``, interval N."""
    import polyquant as pq
    from polyquant.demo import checkpoint_bytes, packed_copy

    from .cache import FeatureCache, record_features, uniform_schedule
    from .cachequant import CacheQuantConfig, cached_sample, schedule_macs
    from .calib import timestep_batches
    from .methods import build_model
    from .models import class_accuracy, psnr, sample, zero_batch
    from .unet import UNET_SHIPPED

    configs = {"quant only (W8A8, no cache)": CacheQuantConfig(steps=steps, interval=1, dec_cache=False,
                                                               dec_quant=False),
               "naive quant + cache (uniform)": CacheQuantConfig(steps=steps, interval=interval, schedule="uniform",
                                                                 dec_cache=False, dec_quant=False,
                                                                 calib_cached=False),
               "CacheQuant (DPS + DEC)": CacheQuantConfig(steps=steps, interval=interval)}
    out = _Rows()
    model = build_model({"name": UNET_SHIPPED})
    calib = timestep_batches(model, torch.arange(calib_images) % 10, steps=steps, scheduler="ddim", seed=0)
    batch = _timing_batch(model)
    images: list[Tensor] = []
    feats = record_features(model, lambda: images.append(sample(model.unet, LABELS, steps=steps, scheduler="ddim",
                                                                 seed=SEED)))  # (T, 10, C, H, W)
    fp = images[0]
    change = [float((feats[t] - feats[t - 1]).abs().mean()) for t in range(1, len(feats))]
    uniform = uniform_schedule(steps, interval)
    with FeatureCache(model, uniform):
        cached = sample(model.unet, LABELS, steps=steps, scheduler="ddim", seed=SEED)
    speedup = {"cache only (float, uniform)": schedule_macs(model, uniform, zero_batch(model))["speedup"]}
    out.grid["float"], out.acc["float"] = fp, class_accuracy(fp, LABELS)
    out.nbytes["float"] = checkpoint_bytes(model.state_dict(), folder, "unet-float")
    out.ms["float"] = _denoiser_ms(model, batch)
    out.rows.append(["float (fp32, no cache)", "-", "-", f"{out.acc['float']:.0f}", "-", f"{out.nbytes['float']:,}",
                     f"{out.ms['float']:.2f}", "1.00x", "-"])
    name = "cache only (float, uniform)"
    out.grid["cache only"], out.psnr[name], out.acc[name] = cached, psnr(fp, cached), class_accuracy(cached, LABELS)
    out.rows.append([name, f"{out.psnr[name]:.2f}", "-", f"{out.acc[name]:.0f}", "-", "-", "-",
                     f"{speedup[name]:.2f}x", "-"])
    tick("digits UNet: float and cache only")
    dps = uniform
    for i, (label, config) in enumerate(configs.items()):
        t0 = time.perf_counter()
        qm = pq.quantize(model, config, calib=calib, progress=False)
        seconds = time.perf_counter() - t0
        q = qm.model
        img = cached_sample(q, LABELS, seed=SEED)
        packed, nbytes = packed_copy(qm, folder, f"unet-{i}")
        p_img = cached_sample(packed, LABELS, seed=SEED)
        speedup[label] = schedule_macs(model, q.schedule, zero_batch(model))["speedup"]
        if config.schedule == "dps" and config.interval > 1:
            dps = q.schedule
        out.grid[label], out.psnr[label], out.acc[label] = img, psnr(fp, img), class_accuracy(img, LABELS)
        out.nbytes[label], out.ms[label] = nbytes, _denoiser_ms(packed, batch)
        out.rows.append([label, f"{out.psnr[label]:.2f}", f"{psnr(fp, p_img):.2f}", f"{out.acc[label]:.0f}",
                         f"{class_accuracy(p_img, LABELS):.0f}", f"{nbytes:,}", f"{out.ms[label]:.2f}",
                         f"{speedup[label]:.2f}x", f"{seconds:.1f}"])
        tick(f"digits UNet: {label}")
    return _CacheRun(out, uniform, dps, change, speedup)


@dataclass
class _ZORun:
    curves: dict[str, dict[str, list[float]]]  # variant -> {"step", "all", "puts"}
    rows: list[list[str]]
    final: dict[str, tuple[float, float]]  # variant -> (held loss t uniform, t in 500..899)
    start: tuple[float, float]  # the same at theta's start (the null class's row), for every variant


ZOODIP = "ZOODiP (ZO n=2 + subspace + PUTS)"
PLAIN_ZO = "plain ZO (n=2, t uniform)"
BACKPROP = "backprop textual inversion (float)"


def _held_set(refs: Tensor, puts: bool) -> tuple[Tensor, Tensor, Tensor]:
    """64 fixed (x_t, t, eps) of the references (benchmarks/diffusion_zoodip.py's evaluation set): t uniform over
    0..999, or PUTS' 500..899."""
    from .models import make_scheduler

    gen = torch.Generator().manual_seed(12345)
    idx = torch.randint(0, len(refs), (64,), generator=gen)
    t = torch.randint(500, 900, (64,), generator=gen) if puts else torch.randint(0, 1000, (64,), generator=gen)
    eps = torch.randn(64, *refs.shape[1:], generator=gen)
    return make_scheduler("ddpm").add_noise(refs[idx], eps, t), t, eps


def _zoodip_rows(iters: int, tick: Callable[[str], None]) -> _ZORun:
    """ZOODiP vs plain ZO (both on the INT8 weight-only UNet) vs backprop textual inversion (float UNet), the same
    references, batch, Adam and seed; every learned class row is scored on the INT8 UNet."""
    from polyquant.nn import quantize_weights

    from .methods import build_model
    from .models import digits_images
    from .unet import UNET_SHIPPED
    from .zoodip import ZOODiPConfig, backprop_embedding, grow_class_embedding, train_embedding, weight_only_rules

    def int8_unet() -> nn.Module:
        return quantize_weights(build_model({"name": UNET_SHIPPED}), weight_only_rules(8), inplace=True).unet

    images, labels = digits_images("train")
    refs = images[labels == CONCEPT][:16]
    held = {"all": _held_set(refs, False), "puts": _held_set(refs, True)}
    scorer = int8_unet()
    new = grow_class_embedding(scorer, torch.zeros(1, scorer.class_embedding.embedding_dim))

    @torch.no_grad()
    def score(theta: Tensor) -> dict[str, float]:
        scorer.class_embedding.weight[new] = theta
        label = torch.full((64,), new)
        return {k: float((scorer(x, timestep=t, class_labels=label, return_dict=False)[0] - eps).pow(2).mean())
                for k, (x, t, eps) in held.items()}

    variants = {ZOODIP: {"queries": 2, "subspace": True, "puts": True},
                PLAIN_ZO: {"queries": 2, "subspace": False, "puts": False},
                BACKPROP: {"queries": 1, "subspace": False, "puts": True}}
    curves: dict[str, dict[str, list[float]]] = {}
    rows, final = [], {}
    for label, v in variants.items():
        config = ZOODiPConfig(iters=iters, batch=4, tau=16, seed=0, **v)
        backprop = label == BACKPROP
        unet = build_model({"name": UNET_SHIPPED}).unet if backprop else int8_unet()
        start = score(unet.class_embedding.weight[-1].detach())  # theta starts at the null class's row
        curve = {"step": [0.0], "all": [start["all"]], "puts": [start["puts"]]}

        def on_step(step: int, theta: Tensor, loss: float, curve: dict[str, list[float]] = curve) -> None:
            if (step + 1) % EVAL_EVERY == 0 or step + 1 == iters:
                s = score(theta)
                curve["step"].append(float(step + 1))
                curve["all"].append(s["all"])
                curve["puts"].append(s["puts"])

        t0 = time.perf_counter()
        _, record = (backprop_embedding if backprop else train_embedding)(unet, refs, config, on_step=on_step)
        seconds = time.perf_counter() - t0
        curves[label] = curve
        final[label] = (curve["all"][-1], curve["puts"][-1])
        rows.append([label, "float UNet" if backprop else "INT8 weight-only UNet", str(iters),
                     f"{record['forward_passes']:,}", f"{iters * config.batch:,}" if backprop else "0",
                     f"{start['all']:.4f}", f"{curve['all'][-1]:.4f}", f"{start['puts']:.4f}",
                     f"{curve['puts'][-1]:.4f}", f"{seconds:.1f}"])
        tick(f"ZOODiP: {label}")
    return _ZORun(curves, rows, final, (start["all"], start["puts"]))


# --- figures --------------------------------------------------------------------------------------------------------


def _grid_panel(ax: Any, rows: dict[str, Tensor], title: str) -> None:
    """Rows of samples (name -> (10, 1, S, S) in [-1, 1]) as one image, a model per row, a class label per column."""
    s = rows[next(iter(rows))].shape[-1]
    cell = s + 1
    canvas = torch.ones(len(rows) * cell + 1, len(LABELS) * cell + 1)  # white 1-pixel gaps
    for r, images in enumerate(rows.values()):
        for c, img in enumerate(images[:, 0]):
            canvas[1 + r * cell:1 + r * cell + s, 1 + c * cell:1 + c * cell + s] = (img.clamp(-1, 1) + 1) / 2
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([1 + c * cell + (s - 1) / 2 for c in range(len(LABELS))], [str(int(v)) for v in LABELS])
    ax.set_yticks([1 + r * cell + (s - 1) / 2 for r in range(len(rows))], list(rows))
    ax.tick_params(length=0)
    ax.set_anchor("W")  # the grid next to its row names
    ax.set_xlabel("class label")
    ax.set_ylabel("model")
    ax.set_title(title)


def _samples_figure(dit: _Rows, unet: _Rows | None, dit_steps: int, cache_steps: int) -> Figure:
    plt = pyplot()

    panels = [(dit.grid, f"digits DiT, W4A8 (int8: W8A8), PLMS-{dit_steps}")]
    if unet is not None:
        panels.append((unet.grid, f"digits UNet, CacheQuant W8A8, DDIM-{cache_steps}"))
    heights = [len(g) for g, _ in panels]
    height = 0.42 * sum(heights) + 0.95 * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, height), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    fig.subplots_adjust(left=0.42, right=0.98, top=1 - 0.4 / height, bottom=0.5 / height, hspace=0.9 / sum(heights) * 4)
    for ax, (grid, title) in zip(axes[:, 0], panels):
        _grid_panel(ax, grid, title)
    return figure_png(fig, "samples, float vs quantized",
                      "one sample per class label, the same starting noise in every row (fake-quant models; the "
                      "packed copies' scores are in the tables)")


def _schedule_figure(run: _CacheRun, interval: int) -> Figure:
    plt = pyplot()

    n = run.uniform.num_steps
    schedules = {f"uniform (DeepCache, every {interval})": run.uniform, "DPS (CacheQuant)": run.dps}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 4.2), height_ratios=[1.3, 1], sharex=True, layout="constrained")
    for y, sched in enumerate(schedules.values()):
        full = [t for t in range(n) if t in sched.refresh]
        reuse = [t for t in range(n) if t not in sched.refresh]
        ax.scatter(full, [y] * len(full), marker="s", s=70, color="tab:red",
                   label="full compute (cache refreshed)" if y == 0 else None)
        ax.scatter(reuse, [y] * len(reuse), marker="o", s=40, facecolors="none", edgecolors="tab:blue",
                   label="cache reuse (shallow ends only)" if y == 0 else None)
    ax.set_yticks(range(len(schedules)), list(schedules))
    ax.set_ylim(-0.6, len(schedules) - 0.4 + 0.6)
    ax.set_ylabel("schedule")
    ax.set_xlabel("denoising step")
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    ax.set_title(f"refresh steps of {n} DDIM steps ({len(run.dps.refresh)} full computes each)")
    ax2.plot(range(1, n), run.feature_change, marker=".", color="tab:gray")
    ax2.set_xlabel("denoising step")
    ax2.set_ylabel("mean |F_t - F_(t-1)|")
    ax2.set_title("change of the float cache feature F (what DPS groups by)", fontsize=9)
    ax2.set_xticks(range(n))
    return figure_png(fig, "cache schedule",
                      "which DDIM steps run the whole UNet (refresh) and which reuse the cached deep feature; DPS "
                      "places the refreshes by dynamic programming over the float features, uniform every N steps")


def _loss_figure(run: _ZORun, iters: int) -> Figure:
    plt = pyplot()

    colors = {ZOODIP: "tab:red", PLAIN_ZO: "tab:blue", BACKPROP: "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), layout="constrained")
    for ax, key, what in zip(axes, ("all", "puts"), ("t uniform in 0..999", "t in 500..899 (PUTS' range)")):
        for label, curve in run.curves.items():
            ax.plot(curve["step"], curve[key], marker=".", color=colors[label], label=label,
                    linestyle="--" if label == BACKPROP else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("denoising loss (MSE)")
        ax.set_title(f"held set, {what}", fontsize=9)
    axes[0].legend(fontsize=7)
    return figure_png(fig, "ZO personalization loss",
                      f"a new class of the digits UNet learned from 16 images of a {CONCEPT} ({iters} steps, batch "
                      "4): the denoising loss of the learned class on the INT8 UNet, on 64 fixed (t, noise) pairs "
                      f"of the references, every {EVAL_EVERY} steps; lower is better")


# --- the demo -------------------------------------------------------------------------------------------------------


DIT_HEADER = ["model", "PSNR fake-quant (dB)", "PSNR packed (dB)", "class acc. fake-quant %", "class acc. packed %",
              "artifact bytes", "ms / call (float or packed)", "quantize s (one run)"]
UNET_HEADER = ["model", "PSNR fake-quant (dB)", "PSNR packed (dB)", "class acc. fake-quant %", "class acc. packed %",
               "artifact bytes", "ms / call (float or packed)", "speedup (counted MACs)", "quantize s (one run)"]
ZO_HEADER = ["variant", "trained against", "steps", "forward passes", "backward passes", "held loss, t 0..999: start",
             "held loss, t 0..999: end", "held loss, t 500..899: start", "held loss, t 500..899: end", "train s"]


def run_demo(calib_images: int = 10, recon_iters: int = 100, steps: int = 20, cachequant: bool = True,
             cache_steps: int = 20, interval: int = 4, zoodip: bool = True, zo_iters: int = 60) -> Section:
    """The diffusion section: FP4DiT and its baselines at W4A8 on the digits DiT (``calib_images`` calibration
    images x ``steps`` + 1 PLMS calls, AdaRound ``recon_iters``; samples PLMS-``steps``), with ``cachequant``
    CacheQuant's ablations on the digits UNet (DDIM-``cache_steps``, cache interval ``interval``), with ``zoodip``
    ZOODiP vs plain ZO vs backprop textual inversion for ``zo_iters`` steps. Every quantized row is scored on its
    fake-quant model and on the artifact loaded back packed."""
    from polyquant.demo import demo_progress, demo_threads

    total = 7 + (4 if cachequant else 0) + (3 if zoodip else 0) + 1
    steps_bar = demo_progress(total=total)

    def tick(stage: str) -> None:
        steps_bar.update(1, step=stage)

    unet_run = zo_run = None
    with demo_threads(), tempfile.TemporaryDirectory(prefix="polyquant-diffusion-") as tmp:
        threads = torch.get_num_threads()
        dit = _dit_rows(calib_images, recon_iters, steps, Path(tmp), tick)
        if cachequant:
            unet_run = _unet_rows(calib_images, cache_steps, interval, Path(tmp), tick)
        if zoodip:
            zo_run = _zoodip_rows(zo_iters, tick)
    section = Section(
        domain="diffusion",
        title=(f"FP4DiT W4A8 and baselines on the digits DiT (diffusers DiTTransformer2DModel, 8x8), {calib_images} "
               f"calibration images x {steps + 1} PLMS calls"
               + (f"; CacheQuant W8A8 on the digits UNet (diffusers UNet2DModel), DDIM-{cache_steps}, cache "
                  f"interval {interval}" if cachequant else "")
               + (f"; ZOODiP on the INT8 weight-only UNet, {zo_iters} steps" if zoodip else "")),
        headline=_headline(dit, unet_run, zo_run),
        reduced=(f"{len(LABELS)} samples (one per label), {calib_images} calibration images and one seed, where "
                 "benchmarks/diffusion_fp4dit.py samples 50 after 20 over 3 seeds with AdaRound at 300 and 1000 "
                 f"iterations (here {recon_iters}) and benchmarks/diffusion_cachequant.py 100 after 32 at DDIM-50 "
                 f"(here DDIM-{cache_steps}); ZOODiP {zo_iters} steps of batch 4 (here {3 * 4 * zo_iters} forward "
                 "passes per ZO variant, one seed, no samples classified) where benchmarks/diffusion_zoodip.py gives "
                 "each variant 7200 over 3 seeds"),
    )
    packed_note = ("Simulated vs real: 'fake-quant' samples with float weights on the quantization grid; 'packed' "
                   "saves the artifact, loads it back with polyquant.load(mode='packed') (the codes on disk, the "
                   "CPU path computing in bfloat16 by default) and samples again with the same noise. ms / call: "
                   "the median of 5 denoiser calls (after one warm-up) on one batch of 10 inputs at timestep 500, "
                   f"{threads} torch thread(s), the float model for the float row, the packed one for the others. "
                   "On the CPU, FP4 weights and convolutions are decoded on every call, INT4 runs torch's int4 "
                   "weight-only GEMM in bfloat16, W8A8 torch._int_mm, and the activation quantizers still run: on "
                   "models this small per-layer overhead dominates, so these times show that the packed CPU path "
                   "runs, not what the CUDA kernels gain. Artifact bytes: the .safetensors "
                   "file; the float row: the float model's state dict saved as safetensors (fp32).")
    section.tables.append(Table(
        f"digits DiT, W4A8 (int8: W8A8): {len(LABELS)} samples (labels 0..9, PLMS-{steps}, seed {SEED}) vs the float "
        "samples", DIT_HEADER, dit.rows,
        "PSNR of each model's samples against the float model's (same labels and noise); class accuracy by the "
        "shipped digits classifier. " + packed_note))
    if unet_run is not None:
        section.tables.append(Table(
            f"CacheQuant on the digits UNet: DDIM-{cache_steps}, cache interval {interval}, "
            f"{len(LABELS)} samples (labels 0..9, seed {SEED}) vs the float model without cache",
            UNET_HEADER, unet_run.rows.rows,
            "The 'cache only' row is the float model under DeepCache's uniform schedule: nothing quantized, no "
            "artifact and the same per-call cost as float ('-'). Speedup: full-step MACs over the mean per-step MACs "
            "of the schedule (convolutions and linear layers), counted, not timed; ms / call times a full step "
            "(a single call outside the cache refreshes nothing), packed samples use the loaded artifact under its "
            "own cache schedule. Simulated vs real, ms / call and bytes as in the DiT table."))
    if zo_run is not None:
        section.tables.append(Table(
            f"ZOODiP: a new class of the digits UNet learned from 16 training images of a {CONCEPT}, {zo_iters} "
            "steps of batch 4 (theta starts at the null class's row)", ZO_HEADER, zo_run.rows,
            "Held loss: the denoising MSE of the learned class on the INT8 weight-only UNet at 64 fixed (t, noise) "
            "pairs of the references (the benchmark's evaluation set), before and after training. ZO variants: "
            "n = 2 perturbed forward passes plus one at theta per step, no autograd; ZOODiP adds Subspace Gradient "
            "(tau 16) and partial uniform timestep sampling (t in 500..899); backprop textual inversion uses "
            "autograd on the float UNet with PUTS (the upper bound). Passes count samples (a batch of 4 is 4). "
            "ZOODiP samples t in 500..899, so its loss there falls first; the benchmark's 600 steps also lower it "
            "over all t (ZOODiP 0.0552 vs plain ZO n=2 0.0907, null-class start 0.0590). No artifact here: the "
            "learned row is a few hundred bytes, the INT8 UNet's artifact is polyquant quantize diffusion/zoodip's."))
    section.figures.append(_samples_figure(dit, unet_run.rows if unet_run else None, steps, cache_steps))
    if unet_run is not None:
        section.figures.append(_schedule_figure(unet_run, interval))
    if zo_run is not None:
        section.figures.append(_loss_figure(zo_run, zo_iters))
    tick("figures")
    section.notes.append("On this model the INT4 baselines (int_minmax, INT4 AdaRound) score a higher PSNR than "
                         "FP4DiT, as benchmarks/diffusion.md finds over 3 seeds and 50 samples (AdaRound 300 / 1000 "
                         "iterations, W4A6 too; benchmarks/diffusion_2500it.md: 2500): FP4DiT's bar does not hold "
                         "on the digits DiT. benchmarks/diffusion_cachequant.md has DDIM-50, 3 seeds, W4A8 and every "
                         "ablation; benchmarks/diffusion_zoodip.md equal forward-pass budgets (600 ZO steps), 3 "
                         "seeds, samples of the new class classified and peak memory.")
    return section


def _headline(dit: _Rows, unet: _CacheRun | None, zo: _ZORun | None) -> str:
    fp4 = next(k for k in dit.psnr if k.startswith("fp4dit +"))
    ada = next(k for k in dit.psnr if k.startswith("adaround"))
    parts = [f"FP4DiT W4A8 + AdaRound {dit.psnr[fp4]:.1f} dB PSNR / {dit.acc[fp4]:.0f}% class acc. vs RTN "
             f"{dit.psnr['fp4dit RTN']:.1f} dB, int_minmax {dit.psnr['int_minmax']:.1f} dB / "
             f"{dit.acc['int_minmax']:.0f}%, INT4 AdaRound {dit.psnr[ada]:.1f} dB (float {dit.acc['float']:.0f}%); "
             f"packed artifact {dit.nbytes['float'] / dit.nbytes[fp4]:.1f}x smaller than fp32"]
    if unet is not None:
        cq, naive = "CacheQuant (DPS + DEC)", "naive quant + cache (uniform)"
        r = unet.rows
        parts.append(f"CacheQuant W8A8 {r.psnr[cq]:.1f} dB vs naive quant + cache {r.psnr[naive]:.1f} dB at "
                     f"{unet.speedup[cq]:.2f}x counted speedup")
    if zo is not None:
        parts.append(f"ZOODiP held loss (t 500..899) {zo.start[1]:.4f} -> {zo.final[ZOODIP][1]:.4f} vs plain ZO "
                     f"{zo.final[PLAIN_ZO][1]:.4f}, backprop {zo.final[BACKPROP][1]:.4f}")
    return "; ".join(parts)


if __name__ == "__main__":
    print(run_demo())
