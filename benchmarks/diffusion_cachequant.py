"""CacheQuant (issue 26) on the shipped class-conditional digits UNet: its ablations beside cache-only and
quantization-only, W8A8 and W4A8, one run.

The task: the shipped digits UNet (diffusers ``UNet2DModel``, 2 levels, 32 / 64 channels, 8x8 digits, labels 0..9)
sampled with DDIM-50 (50 model calls), cache interval N = 5 (10 refresh steps). Calibration per seed s (seeds 0, 1,
2): the float model's inputs at every step of sampling ``--calib-images`` labels (0..9 in turn) from the noise of
seed s (``calib.timestep_batches``: whole runs, which CacheQuant replays under the cache). Evaluation per seed s:
``--eval-samples`` labels (0..9 in turn) from the noise of seed 1000 + s, the same noise for every row.

    python benchmarks/diffusion_cachequant.py   # writes results_cpu/diffusion_cachequant.json, diffusion_cachequant.md
    python benchmarks/diffusion_cachequant.py --quick --out /tmp/c.json --table /tmp/c.md   # 1 seed, 10 steps

Rows: the float model without cache (the reference); cache only (float, uniform and DPS schedules; DEC(cache) on
DPS); at each weight width: quant only (every step refreshes, per-timestep activation ranges), naive quant + cache
(uniform schedule, ranges fitted on full steps only, no correction), then cumulatively + DPS, + DEC(cache),
+ DEC(quant), and the full method (+ ranges fitted along the cached path).

Columns: sample PSNR (dB) vs the float model's samples (same noise), Frechet distance of the shipped classifier's
penultimate features (64-d) of the samples vs the 540 real test digits (the float model's own beside), class
accuracy (%), theoretical speedup (full-step MACs over the mean MACs per step under the schedule, counted by
``polyquant.metrics.MacCounter``: convolutions and linear layers; the mid block's attention products are not
counted), artifact bytes (``pq.save``; the float model's fp32 parameters beside) and quantization seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _env import environment, mean_pm_std, seed_stats, write_report

import polyquant as pq
from polyquant.plugins.diffusion import methods as M
from polyquant.plugins.diffusion.cache import (FeatureCache, dec_cache, dps_schedule, record_features,
                                               uniform_schedule)
from polyquant.plugins.diffusion.cachequant import CacheQuantConfig, cached_sample, schedule_macs
from polyquant.plugins.diffusion.calib import timestep_batches
from polyquant.plugins.diffusion.models import (class_accuracy, classifier_features, digits_images, frechet_distance,
                                                psnr, sample, zero_batch)
from polyquant.plugins.diffusion.unet import UNET_SHIPPED

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results_cpu" / "diffusion_cachequant.json"
DEFAULT_TABLE = HERE / "diffusion_cachequant.md"
SEEDS = (0, 1, 2)
METRICS = ("psnr", "fd", "acc", "speedup", "bytes", "seconds")
QUANT_ONLY, NAIVE, FULL = "quant only (no cache)", "naive quant + cache", "full CacheQuant (+ cached-path ranges)"
ABLATIONS: dict[str, dict[str, Any]] = {
    QUANT_ONLY: {"interval": 1, "dec_cache": False, "dec_quant": False},
    NAIVE: {"schedule": "uniform", "dec_cache": False, "dec_quant": False, "calib_cached": False},
    "+ DPS": {"dec_cache": False, "dec_quant": False, "calib_cached": False},
    "+ DEC(cache)": {"dec_quant": False, "calib_cached": False},
    "+ DEC(quant)": {"calib_cached": False},
    FULL: {},
}


def _row(rec: dict[str, list[float]], fp: torch.Tensor, img: torch.Tensor, real: torch.Tensor,
         labels: torch.Tensor) -> None:
    if img is not fp:  # the reference row has no PSNR against itself
        rec.setdefault("psnr", []).append(psnr(fp, img))
    rec.setdefault("fd", []).append(frechet_distance(real, classifier_features(img).detach()))
    rec.setdefault("acc", []).append(class_accuracy(img, labels))


@torch.no_grad()
def run(args: argparse.Namespace, seeds: tuple[int, ...]) -> dict[str, Any]:
    model = M.build_model({"name": UNET_SHIPPED})
    real = classifier_features(digits_images("test")[0]).detach()
    calib_labels = torch.arange(args.calib_images) % 10
    labels = torch.arange(args.eval_samples) % 10
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = zero_batch(model)
    per: dict[str, dict[str, dict[str, list[float]]]] = {"float": {}}
    for s in seeds:
        print(f"seed {s}", flush=True)
        calib = timestep_batches(model, calib_labels, steps=args.steps, scheduler="ddim", seed=s)
        fp = sample(model.unet, labels, steps=args.steps, scheduler="ddim", seed=1000 + s)
        _row(per["float"].setdefault("float, no cache", {}), fp, fp, real, labels)
        feats = record_features(model, lambda: [model(b) for b in calib])
        for name, sched, corr in (("cache only, uniform", uniform_schedule(args.steps, args.interval), {}),
                                  ("cache only, DPS", dps_schedule(feats, args.interval), {}),
                                  ("cache only, DPS + DEC(cache)", dps_schedule(feats, args.interval), None)):
            corrections = dec_cache(feats, sched, 1) if corr is None else corr
            with FeatureCache(model, sched, corrections):
                img = sample(model.unet, labels, steps=args.steps, scheduler="ddim", seed=1000 + s)
            rec = per["float"].setdefault(name, {})
            _row(rec, fp, img, real, labels)
            rec.setdefault("speedup", []).append(schedule_macs(model, sched, batch)["speedup"])
        for wbits in args.wbits:
            key = f"W{wbits}A8"
            for label, over in ABLATIONS.items():
                config = CacheQuantConfig(**{"wbits": wbits, "steps": args.steps, "interval": args.interval, **over})
                t0 = time.perf_counter()
                qm = pq.quantize(model, config, calib=calib, progress=False)
                secs = time.perf_counter() - t0
                img = cached_sample(qm.model, labels, seed=1000 + s)
                rec = per.setdefault(key, {}).setdefault(label, {})
                _row(rec, fp, img, real, labels)
                rec.setdefault("speedup", []).append(schedule_macs(model, qm.model.schedule, batch)["speedup"])
                with tempfile.TemporaryDirectory() as tmp:
                    rec.setdefault("bytes", []).append(float(pq.save(qm, Path(tmp) / "a.safetensors").stat().st_size))
                rec.setdefault("seconds", []).append(secs)
                print(f"  {key} {label:42s} " + "  ".join(f"{k} {v[-1]:.4g}" for k, v in rec.items()), flush=True)
        partial = args.out.with_suffix(".partial.json")  # the raw per-seed values so far (a crash keeps them)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"seeds_done": seeds[:seeds.index(s) + 1], "per": per}))
    results: dict[str, Any] = {"float_param_bytes": float_bytes}
    for key, rows in per.items():
        results[key] = {label: {k: seed_stats(v) for k, v in rec.items()} for label, rec in rows.items()}
        if key != "float":
            for label, rec in rows.items():
                for m in ("psnr", "fd"):
                    results[key][label][f"{m}_vs_naive"] = seed_stats(
                        [a - b for a, b in zip(rec[m], rows[NAIVE][m])])
    return results


def _verdict(rows: dict[str, Any], metric: str, higher_better: bool) -> str:
    """Where the full method lands between the naive combination and quantization alone on ``metric``."""
    q, n, f = (rows[k][metric]["mean"] for k in (QUANT_ONLY, NAIVE, FULL))
    sign = 1.0 if higher_better else -1.0
    gain, gap = sign * (f - n), sign * (q - n)
    if gain >= gap:
        where = "at or better than quant only"
    elif gain < 0:
        where = "worse than naive"
    else:
        where = "closer to quant only" if gain > gap / 2 else "closer to naive"
    share = (f"{100 * gain / gap:.0f}% of the naive-to-quant-only gap closed" if gap > 0
             else "quant only is not better than naive here")
    return f"{where} ({share})"


def markdown(report: dict[str, Any]) -> str:
    env, setup, res = report["environment"], report["setup"], report["results"]
    lines = ["# Diffusion (issue 26): CacheQuant on the shipped digits UNet", "",
             f"`{setup['command']}` (JSON: `{setup['json']}`). {setup['note']}", "",
             f"Commit {env['git_sha']} (dirty: {env['git_dirty']}); python {env['python']}, torch {env['torch']}; "
             f"{env['platform']}, {env['device']} ({env['device_name']}), {setup['threads']} torch threads; whole run "
             f"{report['seconds']:.0f} s.", "",
             "| row | PSNR vs float (dB) | vs naive (paired) | Frechet dist. to real test digits | vs naive (paired) "
             "| class acc. % | theoretical speedup (MACs) | artifact bytes | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, rows in res.items():
        if key == "float_param_bytes":
            continue
        for label, r in rows.items():
            psnr_s = mean_pm_std(r["psnr"], ".2f") if "psnr" in r else "—"
            vs_p = mean_pm_std(r["psnr_vs_naive"], "+.2f") if "psnr_vs_naive" in r and label != NAIVE else "—"
            vs_f = mean_pm_std(r["fd_vs_naive"], "+.3f") if "fd_vs_naive" in r and label != NAIVE else "—"
            speed = f"{r['speedup']['mean']:.2f}x" if "speedup" in r else "1.00x"
            size = f"{r['bytes']['mean']:,.0f}" if "bytes" in r else f"{res['float_param_bytes']:,.0f} (fp32 params)"
            secs = mean_pm_std(r["seconds"], ".1f") if "seconds" in r else "—"
            name = label if key == "float" else f"{key} {label}"
            lines.append(f"| {name} | {psnr_s} | {vs_p} | {mean_pm_std(r['fd'], '.3f')} | {vs_f} | "
                         f"{mean_pm_std(r['acc'], '.1f')} | {speed} | {size} | {secs} |")
    lines += ["", "## Reading", ""]
    for key, rows in res.items():
        if key in ("float", "float_param_bytes"):
            continue
        q, n, f = rows[QUANT_ONLY], rows[NAIVE], rows[FULL]
        parts = []
        for metric, name, fmt, higher in (("psnr", "PSNR (dB)", ".2f", True), ("fd", "Frechet distance", ".3f", False)):
            parts.append(f"{name}: quant only {q[metric]['mean']:{fmt}}, naive {n[metric]['mean']:{fmt}}, full "
                         f"{f[metric]['mean']:{fmt}}: {_verdict(rows, metric, higher)}")
        lines.append(f"- {key}: " + "; ".join(parts) + ".")
    lines += ["", "Mean ± std over the seeds; \"vs naive\" is the mean ± std over seeds of the paired per-seed "
              "difference (row - naive). The Frechet distance is fitted on "
              f"{setup['eval_samples']} samples of 64-d features against the 540 test digits: it ranks rows, it is "
              "not an FID. The speedup is counted (MACs of convolutions and linear layers), not timed: fake "
              "quantization runs in float32 on the CPU, and CacheQuant's wall-clock speedup needs integer kernels "
              "(GPU_PENDING). Artifact bytes are the saved file (8-bit or 4-bit packed weights, per-timestep "
              "activation ranges, the schedule and DEC tables).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (model calls per sample)")
    parser.add_argument("--interval", type=int, default=5, help="the cache interval N")
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--wbits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, choices=(1, 2, 3), help="seeds 0.. used (default: 3)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 steps, N = 2, 16 / 20 images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = environment("cpu")  # at the start: the commit and tree the run used
    seeds = SEEDS[:1] if args.quick else SEEDS[:args.seeds]
    if args.quick:
        args.steps, args.interval, args.calib_images, args.eval_samples = 10, 2, 16, 20
    results = run(args, seeds)
    out = args.out.resolve()
    report = {
        "benchmark": "diffusion_cachequant",
        "setup": {"seeds": list(seeds), "eval_noise_seeds": [1000 + s for s in seeds], "sampler": "DDIM",
                  "steps": args.steps, "interval": args.interval, "calib_images": args.calib_images,
                  "eval_samples": args.eval_samples, "threads": args.threads,
                  "command": " ".join(["python benchmarks/diffusion_cachequant.py", *sys.argv[1:]]),
                  "json": f"benchmarks/{out.relative_to(HERE)}" if out.is_relative_to(HERE) else str(args.out),
                  "note": f"DDIM-{args.steps}, cache interval N = {args.interval}; calibration: {args.calib_images} "
                          f"images (labels 0..9 in turn) x {args.steps} model calls per seed, seeds {list(seeds)}; "
                          f"evaluation: {args.eval_samples} samples from the noise of seed 1000 + s, the same for "
                          "every row."},
        "environment": env,
        "results": results,
    }
    report["seconds"] = time.perf_counter() - t0
    text = markdown(report)
    write_report(report, args.out, args.table, text)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
