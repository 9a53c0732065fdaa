"""Gaussians benchmark: OMG sub-vector quantization of fitted 3DGS scenes beside the full-vector VQ and 8-bit
baselines, and OMG's own representation, on the same scenes in one run.

Per seed: a procedural target scene (``procedural_scene(seed)``, 20k Gaussians, SH degree 3) is the ground truth;
a 3DGS scene of ``--gaussians`` Gaussians is fitted to ``--views`` orbit renders of it (``fitting.fit_scene``:
3DGS's optimiser and loss, no densification); every method compresses the fitted scene through
``polyquant.quantize`` and ``polyquant.save`` (the written file is what is measured), and is loaded back with
``polyquant.load``. Held-out: 16 other orbit views (64 px) of the target.

Columns: render PSNR / SSIM against the ground truth and the drop from the float fitted scene (paired per seed),
PSNR against the float scene's renders, index bits per Gaussian before and after entropy coding, file bytes per
Gaussian and per component (from the written file: they sum to its size), compression ratio against the float
.ply, per-attribute SQNR, and the round-trip checks (indices / codebooks bit-exact, positions exact at fp16).
Positions are coded losslessly with delta + LZMA, not MPEG G-PCC (OMG's coder is not on pip): "non-G-PCC".
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _env import environment, mean_pm_std, package_version, seed_stats, write_report

import polyquant as pq
from polyquant.metrics import psnr, ssim
from polyquant.plugins.gaussians.container import size_report
from polyquant.plugins.gaussians.fitting import fit_scene
from polyquant.plugins.gaussians.methods import attribute_sqnr, camera_rows, canonical_scene
from polyquant.plugins.gaussians.model import GaussianModel, QuantizedGaussians, scene_from_attributes
from polyquant.plugins.gaussians.omg import OMGConfig, OMGDecoder, distill, scene_aabb
from polyquant.plugins.gaussians.ply import ply_bytes, read_ply, write_ply
from polyquant.plugins.gaussians.procedural import procedural_scene
from polyquant.plugins.gaussians.render import Camera, orbit_cameras, render
from polyquant.plugins.gaussians.scene import GaussianScene
from polyquant.plugins.gaussians.svq import SVQConfig
from polyquant.plugins.gaussians.uniform import Uniform8Config
from polyquant.plugins.gaussians.vq import VQConfig

SEEDS = (0, 1, 2)
HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "results_cpu" / "gaussians.json"
DEFAULT_TABLE = HERE / "gaussians.md"
FLOAT = "float 3DGS (fitted)"


def _methods(args: argparse.Namespace) -> dict[str, pq.config.QuantConfig]:
    return {
        "svq (OMG sub-vector VQ)": SVQConfig(),
        "svq + codebook fine-tuning": SVQConfig(finetune_steps=args.finetune_steps),
        "vq (full vectors, equal entries)": VQConfig(),
        "uniform8": Uniform8Config(),
        "omg (MLPs + SVQ, 66 bits)": OMGConfig(),
    }


@torch.no_grad()
def _images(scene: GaussianScene, cams: list[Camera]) -> list[torch.Tensor]:
    return [render(scene, c).clamp(0, 1) for c in cams]


def _fidelity(images: list[torch.Tensor], truth: list[torch.Tensor], float_images: list[torch.Tensor]) -> dict[str, float]:
    n = len(images)
    return {"psnr": sum(psnr(t, i) for t, i in zip(truth, images)) / n,
            "ssim": sum(ssim(t, i) for t, i in zip(truth, images)) / n,
            "psnr_vs_float": sum(psnr(f, i) for f, i in zip(float_images, images)) / n}


def _omg_mlps_only(scene: GaussianScene, config: OMGConfig) -> GaussianScene:
    """OMG's representation before SVQ (float features, float scale / rotation): how much of omg's drop is the
    MLPs'. The same distillation as the method's handler."""
    scene = canonical_scene(scene)
    xyz16 = scene.xyz.half().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        decoder = OMGDecoder(scene_aabb(xyz16), scene.sh_degree, config.hidden, config.frequencies)
    appearance = torch.cat([scene.sh_dc, torch.zeros_like(scene.sh_dc)], dim=1).requires_grad_(True)
    distill(decoder, xyz16, scene, appearance, steps=config.distill_steps, lr=config.lr, feature_lr=config.feature_lr)
    with torch.no_grad():
        attrs = {"scale": scene.scale, "rotation": scene.rotation, **decoder(xyz16, appearance)}
        return scene_from_attributes(xyz16, attrs, scene.sh_degree)


def _fitted(seed: int, target: GaussianScene, args: argparse.Namespace) -> tuple[GaussianScene, float]:
    """The fitted scene of a seed and the fitting's seconds; with ``--cache DIR`` kept there as a .ply (a rerun
    of the same settings reads it back, and reports the first run's seconds)."""
    name = f"fitted_s{seed}_n{args.gaussians}_t{args.target_gaussians}_k{args.steps}_v{args.views}_p{args.size}.ply"
    path = None if args.cache is None else args.cache / name
    if path is not None and path.exists():
        return read_ply(path), float(json.loads(path.with_suffix(".json").read_text())["fit_seconds"])
    t0 = time.perf_counter()
    fitted, _ = fit_scene(target, num_gaussians=args.gaussians, steps=args.steps, seed=seed, views=args.views,
                          size=args.size, sh_degree=3, progress=args.progress)
    seconds = time.perf_counter() - t0
    if path is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
        write_ply(fitted, path)
        path.with_suffix(".json").write_text(json.dumps({"fit_seconds": seconds}))
    return fitted, seconds


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    target = procedural_scene(seed, args.target_gaussians, 3)
    fitted, fit_seconds = _fitted(seed, target, args)
    held = orbit_cameras(16, size=args.size, seed=1000 + seed)
    truth = _images(target, held)
    float_images = _images(fitted, held)
    model = GaussianModel(fitted)
    calib = [camera_rows(orbit_cameras(args.views, size=args.size, seed=seed))]  # the fitting's views
    float_ply = ply_bytes(fitted)
    rows: dict[str, Any] = {FLOAT: {**_fidelity(float_images, truth, float_images), "bytes": float_ply,
                                    "bytes_per_gaussian": float_ply / args.gaussians, "ratio": 1.0,
                                    "fit_seconds": fit_seconds}}
    omg_float = _omg_mlps_only(fitted, OMGConfig())
    rows["omg MLPs only (before SVQ)"] = _fidelity(_images(omg_float, held), truth, float_images)
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in _methods(args).items():
            t1 = time.perf_counter()
            qm = pq.quantize(model, config, calib=calib, progress=args.progress)
            enc = time.perf_counter() - t1
            path = pq.save(qm, Path(tmp) / "scene.pqs")
            t2 = time.perf_counter()
            back = pq.load(path)
            with torch.no_grad():
                decoded = back.model.scene()
            dec = time.perf_counter() - t2
            q: QuantizedGaussians = qm.model
            sizes = size_report(path)
            n = q.num_gaussians
            exact = torch.equal(back.model.xyz, canonical_scene(fitted).xyz.half().float()) and all(
                torch.equal(back.model.attributes[k].codes, m.codes) for k, m in q.attributes.items())
            exact = exact and all(torch.equal(a.quantizer.quantizers[i].embed, m.quantizer.quantizers[i].embed)
                                  for k, m in q.attributes.items() if hasattr(m, "quantizer")
                                  for a in [back.model.attributes[k]] for i in range(len(m.quantizer.quantizers)))
            row = {**_fidelity(_images(decoded, held), truth, float_images),
                   "index_bits": q.index_bits(), "index_bits_coded": 8 * sizes["indices"] / n,
                   "bytes": path.stat().st_size, "bytes_per_gaussian": path.stat().st_size / n,
                   "components": sizes, "size_accounting_exact": sum(sizes.values()) == path.stat().st_size,
                   "round_trip_exact": bool(exact), "ratio": float_ply / path.stat().st_size,
                   "encode_seconds": enc, "decode_seconds": dec}
            if not isinstance(config, OMGConfig):
                row["sqnr"] = attribute_sqnr(canonical_scene(fitted), decoded)
            rows[label] = row
            print(f"seed {seed} {label}: PSNR {row['psnr']:.2f} (float {rows[FLOAT]['psnr']:.2f}), "
                  f"{row['bytes_per_gaussian']:.2f} B/G, index bits {row['index_bits']} -> "
                  f"{row['index_bits_coded']:.1f}", flush=True)
    return rows


def _stats(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in per_seed[0]:
        keys = [k for k, v in per_seed[0][label].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and all(math.isfinite(float(r[label][k])) for r in per_seed)]  # the float row's PSNR vs itself: inf
        out[label] = {k: seed_stats([float(r[label][k]) for r in per_seed]) for k in keys}
        for k in ("round_trip_exact", "size_accounting_exact"):
            if k in per_seed[0][label]:
                out[label][k] = all(r[label][k] for r in per_seed)
        if "components" in per_seed[0][label]:
            out[label]["components"] = {c: seed_stats([float(r[label]["components"][c]) for r in per_seed])
                                        for c in per_seed[0][label]["components"]}
        if "sqnr" in per_seed[0][label]:
            out[label]["sqnr"] = {a: seed_stats([r[label]["sqnr"][a] for r in per_seed])
                                  for a in per_seed[0][label]["sqnr"]}
    return out


def _paired(per_seed: list[dict[str, Any]], a: str, b: str, key: str = "psnr") -> dict[str, Any]:
    return seed_stats([r[a][key] - r[b][key] for r in per_seed])


def _mean(r: dict[str, Any], key: str, fmt: str) -> str:
    return f"{r[key]['mean']:{fmt}}" if key in r else "-"


def markdown(report: dict[str, Any]) -> str:
    s, env, a = report["stats"], report["environment"], report["args"]
    lines = [
        "# Gaussians: OMG sub-vector quantization of fitted 3DGS scenes",
        "",
        f"{len(report['seeds'])} seeds; per seed a procedural target (20k Gaussians, SH degree 3) as ground truth, "
        f"a 3DGS scene of {a['gaussians']:,} Gaussians fitted to {a['views']} orbit renders ({a['size']} px, "
        f"{a['steps']} steps, no densification), 16 held-out views. Mean ± std over seeds. "
        f"git {env.get('git_sha', '?')}, torch {env.get('torch', '?')}, constriction "
        f"{report['versions'].get('constriction')}, plyfile {report['versions'].get('plyfile')}.",
        "",
        "| method | PSNR vs truth (dB) | drop vs float (dB) | SSIM | PSNR vs float (dB) | index bits / G (coded) | "
        "file B / G | ratio vs .ply | round trip | size = file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in s.items():
        drop = report["paired"].get(f"drop::{label}")
        bits = (f"{r['index_bits']['mean']:.0f} ({r['index_bits_coded']['mean']:.1f})" if "index_bits" in r else "-")
        lines.append(
            f"| {label} | {mean_pm_std(r['psnr'], '.2f')} | {mean_pm_std(drop, '+.2f') if drop else '-'} | "
            f"{r['ssim']['mean']:.4f} | {_mean(r, 'psnr_vs_float', '.2f')} | {bits} | "
            f"{_mean(r, 'bytes_per_gaussian', '.2f')} | {_mean(r, 'ratio', '.1f')}{'x' if 'ratio' in r else ''} | "
            f"{'exact' if r.get('round_trip_exact') else '-' if 'round_trip_exact' not in r else 'NO'} | "
            f"{'yes' if r.get('size_accounting_exact') else '-' if 'size_accounting_exact' not in r else 'NO'} |")
    p = report["paired"]
    lines += [
        "",
        "Drop: float PSNR minus the method's, paired per seed (positive: the method is worse). Paired, seeds: "
        f"svq minus vq (equal codebook entries) {mean_pm_std(p['svq_minus_vq'], '+.2f')} dB; svq minus uniform8 "
        f"{mean_pm_std(p['svq_minus_uniform8'], '+.2f')} dB; omg minus its distilled MLPs before SVQ "
        f"{mean_pm_std(p['omg_minus_mlps'], '+.2f')} dB (omg = SVQ of the MLPs' features, then the MLPs trained "
        "against renders with the codes frozen: OMG's drop is the MLPs', not SVQ's).",
        "",
        "Bytes per component of the written file (mean over seeds; they sum to the file size):",
        "",
        "| method | positions (non-G-PCC) | indices | codebooks | MLPs | qparams | container (header + manifest) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in s.items():
        if "components" in r:
            c = r["components"]
            lines.append(f"| {label} | " + " | ".join(f"{c[k]['mean']:,.0f}" for k in
                                                      ("positions", "indices", "codebooks", "mlp", "qparams",
                                                       "container")) + " |")
    lines += ["", "Attribute SQNR (dB) of the plain-3DGS methods:", "",
              "| method | scale | rotation | opacity | sh_dc | sh_rest |", "|---|---|---|---|---|---|"]
    for label, r in s.items():
        if "sqnr" in r:
            lines.append(f"| {label} | " + " | ".join(f"{r['sqnr'][k]['mean']:.1f}" for k in
                                                      ("scale", "rotation", "opacity", "sh_dc", "sh_rest")) + " |")
    lines += ["", "Encode / decode seconds (CPU, "
              f"{a['threads']} threads, sharing the machine with other work): " + "; ".join(
                  f"{label} {r['encode_seconds']['mean']:.1f} / {r['decode_seconds']['mean']:.2f}"
                  for label, r in s.items() if "encode_seconds" in r) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, a small scene, few steps")
    ap.add_argument("--gaussians", type=int, default=8192)
    ap.add_argument("--target-gaussians", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--cache", type=Path, default=None, help="keep / reuse the fitted scenes in this folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    args = ap.parse_args(argv)
    seeds = SEEDS
    if args.quick:
        seeds, args.gaussians, args.steps, args.finetune_steps = (0,), 4096, 100, 10
    torch.set_num_threads(args.threads)
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(seed, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(per_seed, indent=1))  # a crash keeps the seeds
    labels = list(per_seed[0])
    paired = {f"drop::{label}": _paired(per_seed, FLOAT, label) for label in labels if label != FLOAT}
    paired["svq_minus_vq"] = _paired(per_seed, "svq (OMG sub-vector VQ)", "vq (full vectors, equal entries)")
    paired["svq_minus_uniform8"] = _paired(per_seed, "svq (OMG sub-vector VQ)", "uniform8")
    paired["omg_minus_mlps"] = _paired(per_seed, "omg (MLPs + SVQ, 66 bits)", "omg MLPs only (before SVQ)")
    versions = {p: package_version(p) for p in ("constriction", "plyfile") if package_version(p) is not None}
    report = {"environment": environment("cpu"), "seeds": list(seeds),
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "table")},
              "stats": _stats(per_seed), "paired": paired, "versions": versions, "per_seed": per_seed}
    report["args"]["cache"] = None if args.cache is None else str(args.cache)
    write_report(report, args.out, args.table, markdown(report))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(markdown(report))


if __name__ == "__main__":
    main()
