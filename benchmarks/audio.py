"""Audio codec quantizers (issue 24): ours beside vector-quantize-pytorch on the same latent frames, and the shipped
tiny codecs with the plugin's methods on the same held-out audio; one run, 3 seeds.

    python benchmarks/audio.py                     # writes results_cpu/audio.json and audio.md (~25 min on 2 cores)
    python benchmarks/audio.py --quick --out /tmp/a.json --table /tmp/a.md    # 1 seed, short

Experiment 1, quantizer only, equal bits (40 bits per 64-d frame = 2 kbps at 50 frames/s): the frames are the float
encoder outputs of the shipped ``tiny-rvq`` codec on seeded synthetic 1 s clips (``--train-clips`` for training,
``--eval-clips`` others held out). Each quantizer trains on a stream of ``--steps`` batches of ``--batch`` frames
drawn with replacement (the seed draws the batches and seeds the init), by its own training forward (EMA codebooks).
Rows: ours (``polyquant.vq.ResidualVQ``: EnCodec's settings, decay 0.99 + Laplace smoothing, k-means init 50
iterations on the first batch, dead-code restart below an EMA count of 2) and its ablations without k-means init,
without restart and without both; vector-quantize-pytorch ``ResidualVQ`` configured the same way (decay 0.99,
``kmeans_init=True``, ``kmeans_iters=50``, ``threshold_ema_dead_code=2``, ``rotation_trick=False``) and with its
defaults (decay 0.8, no k-means, no restart); GRVQ 2 groups x 2 layers x 1024 (ours and vector-quantize-pytorch's
``GroupedResidualVQ``, the same settings); FSQ [8,5,5,5] x 4 on the frames' 16 principal directions (the plugin's
``fsq`` bottleneck: the FSQ grid equals vector-quantize-pytorch's, tested in the core); and the plugin's post-training
``rvq`` fit (k-means on all training frames, then 2 EMA passes with restart). Columns: held-out SQNR (dB) and MSE,
codebook perplexity exp(H) (mean over codebooks, held-out codes), dead codes (% of codes no training frame uses,
mean over codebooks), seconds.

Experiment 2, codec: held-out synthetic clips (``--codec-clips`` per seed, mixed kinds) and speech-like clips (the
same number, ``synth.speech`` only, for PESQ-WB / STOI). Rows: the shipped ``tiny-rvq`` (EnCodec-style RVQ 4 x 1024)
decoded from its first 1, 2 and 4 levels (0.5, 1, 2 kbps) and ``tiny-grvq`` (HiFi-Codec-style GRVQ 2 x 2 x 1024)
from 1 and 2 layers per group (1, 2 kbps); the plugin's methods on ``tiny-rvq``, calibrated on 64 other clips: rvq
and grvq refits and the fsq baseline at 2 kbps, ptq INT8 and INT4 weights (the shipped bottleneck). Columns: kbps,
DAC multi-scale mel distance, multi-resolution STFT distance, SI-SDR (dB), PESQ-WB and STOI (speech clips). Mean ±
std over seeds; "GRVQ - RVQ at 2 kbps" is the paired per-seed difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from _env import environment, mean_pm_std, package_version, seed_stats, write_report

import polyquant as pq
from polyquant.nn import Calibration
from polyquant.plugins.audio import synth
from polyquant.plugins.audio.fsq import FSQConfig, ProjectedFSQ
from polyquant.plugins.audio.grvq import GRVQConfig
from polyquant.plugins.audio.methods import build_model, latent_frames, synthetic_batches
from polyquant.plugins.audio.metrics import code_usage, mel_distance, pesq_wb, si_sdr, sqnr, stft_distance, stoi
from polyquant.plugins.audio.ptq import PTQConfig
from polyquant.plugins.audio.rvq import RVQConfig
from polyquant.vq import CODEBOOK_PRESETS, GroupedResidualVQ, ResidualVQ, train_codebooks

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results_cpu" / "audio.json"
DEFAULT_TABLE = HERE / "audio.md"
SEEDS = (0, 1, 2)
K = 1024


# --- experiment 1: quantizer only -----------------------------------------------------------------------------------


def _ours_rvq(seed: int, *, kmeans: bool, restart: bool, groups: int = 1) -> torch.nn.Module:
    common: dict[str, Any] = dict(codebook_size=K, decay=0.99, kmeans_init=kmeans, kmeans_iters=50,
                                  threshold_dead_code=2.0 if restart else 0.0, seed=seed,
                                  options=CODEBOOK_PRESETS["encodec"])
    if groups > 1:
        return GroupedResidualVQ(dim=64, groups=groups, num_quantizers=4 // groups, **common)
    return ResidualVQ(dim=64, num_quantizers=4, **common)


def _vqp(seed: int, *, same: bool, groups: int = 1) -> torch.nn.Module:
    import vector_quantize_pytorch as vqp

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(codebook_size=K, rotation_trick=False)
    if same:
        kw.update(decay=0.99, kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=2)
    if groups > 1:
        return vqp.GroupedResidualVQ(dim=64, groups=groups, num_quantizers=4 // groups, **kw)
    return vqp.ResidualVQ(dim=64, num_quantizers=4, **kw)


def _ours_step(q: torch.nn.Module, x: torch.Tensor) -> None:
    q(x)


def _vqp_step(q: torch.nn.Module, x: torch.Tensor) -> None:
    q(x[None])


def _ours_codes(q: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = q.encode(x)
    return q.decode(codes), codes.reshape(len(x), -1)


def _vqp_codes(q: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_hat, idx, _ = q(x[None])
    if isinstance(idx, torch.Tensor) and idx.dim() == 4:  # grouped: (groups, 1, n, q)
        idx = idx[:, 0].permute(1, 0, 2)
    else:
        idx = idx[0]
    return x_hat[0], idx.reshape(len(x), -1)


def _quality(decode: Callable, q: torch.nn.Module, train: torch.Tensor, held: torch.Tensor, k: int) -> dict[str, float]:
    with torch.no_grad():
        x_hat, codes = decode(q, held)
        _, train_codes = decode(q, train)
    usage = [code_usage(c, k) for c in codes.T]
    dead = [code_usage(c, k)[1] for c in train_codes.T]
    return {"sqnr": sqnr(x_hat, held), "mse": float((x_hat - held).pow(2).mean()),
            "perplexity": float(np.mean([u[0] for u in usage])), "dead": 100 * float(np.mean(dead))}


def quantizer_only(seed: int, args: argparse.Namespace, codec: torch.nn.Module) -> dict[str, dict[str, float]]:
    train = latent_frames(codec, Calibration(synthetic_batches(args.train_clips, seed=100 + seed, seconds=1.0,
                                                               batch_size=16)))
    held = latent_frames(codec, Calibration(synthetic_batches(args.eval_clips, seed=200 + seed, seconds=1.0,
                                                              batch_size=16)))
    g = torch.Generator().manual_seed(seed)
    stream = [train[torch.randint(0, len(train), (args.batch,), generator=g)] for _ in range(args.steps)]
    rows: dict[str, dict[str, float]] = {}
    cases: dict[str, tuple[Callable[[], torch.nn.Module], Callable, Callable]] = {
        "RVQ 4x1024, ours (k-means init + restart)": (lambda: _ours_rvq(seed, kmeans=True, restart=True),
                                                       _ours_step, _ours_codes),
        "RVQ 4x1024, ours without restart": (lambda: _ours_rvq(seed, kmeans=True, restart=False), _ours_step,
                                             _ours_codes),
        "RVQ 4x1024, ours without k-means init": (lambda: _ours_rvq(seed, kmeans=False, restart=True), _ours_step,
                                                  _ours_codes),
        "RVQ 4x1024, ours without both": (lambda: _ours_rvq(seed, kmeans=False, restart=False), _ours_step,
                                          _ours_codes),
        "RVQ 4x1024, vector-quantize-pytorch (same settings)": (lambda: _vqp(seed, same=True), _vqp_step, _vqp_codes),
        "RVQ 4x1024, vector-quantize-pytorch (its defaults)": (lambda: _vqp(seed, same=False), _vqp_step,
                                                               _vqp_codes),
        "GRVQ 2x2x1024, ours (k-means init + restart)": (lambda: _ours_rvq(seed, kmeans=True, restart=True, groups=2),
                                                          _ours_step, _ours_codes),
        "GRVQ 2x2x1024, vector-quantize-pytorch (same settings)": (lambda: _vqp(seed, same=True, groups=2),
                                                                   _vqp_step, _vqp_codes),
    }
    for label, (make, step, decode) in cases.items():
        t0 = time.perf_counter()
        q = make()
        q.train()
        with torch.no_grad():
            for x in stream:
                step(q, x)
        q.eval()
        rows[label] = {**_quality(decode, q, train, held, K), "seconds": time.perf_counter() - t0}
        print(f"  seed {seed} {label}: {rows[label]}", file=sys.stderr, flush=True)
    # FSQ [8,5,5,5] x 4 on the 16 principal directions (nothing to train but the projection and scale)
    t0 = time.perf_counter()
    fsq = ProjectedFSQ(64, [8, 5, 5, 5], 4).fit(train)
    rows["FSQ [8,5,5,5] x 4 on PCA-16 (the fsq baseline)"] = {
        **_quality(_ours_codes, fsq, train, held, 1000), "seconds": time.perf_counter() - t0}
    # the plugin's post-training fit
    t0 = time.perf_counter()
    rvq = _ours_rvq(seed, kmeans=True, restart=True).fit(train)
    train_codebooks(rvq, [train], epochs=2)
    rows["RVQ 4x1024, the rvq method's fit (k-means on all frames + 2 EMA passes)"] = {
        **_quality(_ours_codes, rvq, train, held, K), "seconds": time.perf_counter() - t0}
    return rows


# --- experiment 2: codec ----------------------------------------------------------------------------------------------


def _speech_clips(n: int, seed: int) -> torch.Tensor:
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed * 7919 + i)
        x = synth.speech(16_000, rng)
        out.append(x / (np.abs(x).max() + 1e-9) * 0.5)
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def _codec_row(codec: torch.nn.Module, mixed: torch.Tensor, speech: torch.Tensor, levels: int | None) -> dict[str, Any]:
    with torch.no_grad():
        codes = codec.encode(mixed, levels)
        y = codec.decode(codes)[..., : mixed.shape[-1]]
        ys = codec.decode(codec.encode(speech, levels))[..., : speech.shape[-1]]
    return {"kbps": codec.code_bitrate(codes) / 1000, "mel": mel_distance(y, mixed), "stft": stft_distance(y, mixed), "si_sdr": si_sdr(y, mixed),
            "pesq": pesq_wb(ys, speech), "stoi": stoi(ys, speech)}


def codec_experiment(seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    mixed = torch.cat(synthetic_batches(args.codec_clips, seed=300 + seed, seconds=1.0, batch_size=8))
    speech = _speech_clips(args.codec_clips, 400 + seed)
    calib = synthetic_batches(64, seed=500 + seed, seconds=1.0, batch_size=8)
    rvq, grvq = build_model({"name": "tiny-rvq"}), build_model({"name": "tiny-grvq"})
    rows: dict[str, dict[str, Any]] = {}
    for levels in (1, 2, 4):
        rows[f"tiny-rvq (RVQ 4x1024), first {levels} level(s)"] = _codec_row(rvq, mixed, speech, levels)
    for levels in (1, 2):
        rows[f"tiny-grvq (GRVQ 2x2x1024), first {levels} layer(s) per group"] = _codec_row(grvq, mixed, speech, levels)
    methods = {"tiny-rvq + rvq refit (2 kbps, seed s)": RVQConfig(seed=seed),
               "tiny-rvq + grvq refit (2 kbps, 2 groups)": GRVQConfig(seed=seed),
               "tiny-rvq + fsq baseline (2 kbps)": FSQConfig(),
               "tiny-rvq + ptq INT8 weights": PTQConfig(weight_bits=8),
               "tiny-rvq + ptq INT4 weights": PTQConfig(weight_bits=4)}
    for label, config in methods.items():
        t0 = time.perf_counter()
        q = pq.quantize(rvq, config, calib=calib, progress=False).model
        seconds = time.perf_counter() - t0
        rows[label] = {**_codec_row(q, mixed, speech, None), "seconds": seconds}
    for label, row in rows.items():
        print(f"  seed {seed} {label}: {row}", file=sys.stderr, flush=True)
    return rows


# --- report -------------------------------------------------------------------------------------------------------------


def _stats(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label in per_seed[0]:
        out[label] = {}
        for metric in per_seed[0][label]:
            values = [r[label][metric] for r in per_seed]
            out[label][metric] = None if any(v is None for v in values) else seed_stats([float(v) for v in values])
    return out


def _fmt(s: dict[str, Any] | None, fmt: str) -> str:
    return "n/a" if s is None else mean_pm_std(s, fmt)


def markdown(report: dict[str, Any]) -> str:
    env, a = report["environment"], report["args"]
    q, c = report["quantizer_only"], report["codec"]
    lines = [
        "# Audio codec quantizers (issue 24)",
        "",
        f"`python benchmarks/audio.py` at git {env['git_sha'][:10] if env['git_sha'] else '?'}"
        f"{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, {env['device_name']}, seeds "
        f"{report['seeds']}; mean ± std over seeds. Method and data: the script's docstring.",
        "",
        f"## 1. Quantizer only, 40 bits per 64-d frame (2 kbps at 50 Hz): {a['train_clips']} training clips "
        f"({a['steps']} batches of {a['batch']} frames), {a['eval_clips']} held-out clips",
        "",
        "| quantizer | held-out SQNR (dB) | MSE | perplexity | dead codes % | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in q.items():
        lines.append(f"| {label} | {_fmt(r['sqnr'], '.2f')} | {_fmt(r['mse'], '.4f')} | "
                     f"{_fmt(r['perplexity'], '.0f')} | {_fmt(r['dead'], '.1f')} | {_fmt(r['seconds'], '.1f')} |")
    lines += ["", f"Paired SQNR difference, ours - vector-quantize-pytorch (same settings): "
              f"{mean_pm_std(report['paired']['rvq_sqnr_ours_minus_vqp'], '+.2f')} dB.", "",
              f"## 2. Codec: {a['codec_clips']} held-out mixed clips (mel / STFT / SI-SDR) and {a['codec_clips']} "
              "speech-like clips (PESQ-WB / STOI) per seed", "",
              "| codec | kbps | mel distance | STFT distance | SI-SDR (dB) | PESQ-WB | STOI |", "|---|---|---|---|---|---|---|"]
    for label, r in c.items():
        lines.append(f"| {label} | {r['kbps']['mean']:.2f} | {_fmt(r['mel'], '.3f')} | {_fmt(r['stft'], '.3f')} | "
                     f"{_fmt(r['si_sdr'], '.2f')} | {_fmt(r['pesq'], '.2f')} | {_fmt(r['stoi'], '.3f')} |")
    p = report["paired"]
    lines += ["", "GRVQ - RVQ at 2 kbps (tiny-grvq 2 layers per group vs tiny-rvq 4 levels), paired per seed: "
              f"mel distance {mean_pm_std(p['grvq_minus_rvq_mel'], '+.3f')}, SI-SDR "
              f"{mean_pm_std(p['grvq_minus_rvq_si_sdr'], '+.2f')} dB"
              + (f", PESQ-WB {mean_pm_std(p['grvq_minus_rvq_pesq'], '+.2f')}" if p.get('grvq_minus_rvq_pesq') else "")
              + ".", "", f"Versions: {report['versions']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer clips and steps")
    ap.add_argument("--train-clips", type=int, default=200)
    ap.add_argument("--eval-clips", type=int, default=60)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--codec-clips", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    args = ap.parse_args(argv)
    seeds = SEEDS
    if args.quick:
        seeds, args.train_clips, args.eval_clips, args.steps, args.codec_clips = (0,), 60, 20, 20, 4
    torch.set_num_threads(args.threads)
    codec = build_model({"name": "tiny-rvq"})
    q_runs, c_runs = [], []
    for seed in seeds:
        q_runs.append(quantizer_only(seed, args, codec))
        c_runs.append(codec_experiment(seed, args))
    rvq2, grvq2 = "tiny-rvq (RVQ 4x1024), first 4 level(s)", "tiny-grvq (GRVQ 2x2x1024), first 2 layer(s) per group"
    paired = {
        "rvq_sqnr_ours_minus_vqp": seed_stats([r["RVQ 4x1024, ours (k-means init + restart)"]["sqnr"]
                                               - r["RVQ 4x1024, vector-quantize-pytorch (same settings)"]["sqnr"]
                                               for r in q_runs]),
        "grvq_minus_rvq_mel": seed_stats([r[grvq2]["mel"] - r[rvq2]["mel"] for r in c_runs]),
        "grvq_minus_rvq_si_sdr": seed_stats([r[grvq2]["si_sdr"] - r[rvq2]["si_sdr"] for r in c_runs]),
    }
    if all(r[grvq2]["pesq"] is not None and r[rvq2]["pesq"] is not None for r in c_runs):
        paired["grvq_minus_rvq_pesq"] = seed_stats([r[grvq2]["pesq"] - r[rvq2]["pesq"] for r in c_runs])
    versions = {p: package_version(p) for p in ("vector-quantize-pytorch", "torchaudio", "pesq", "pystoi")
                if package_version(p) is not None}
    report = {"environment": environment("cpu"), "seeds": list(seeds), "args": {k: v for k, v in vars(args).items()
              if k not in ("out", "table")}, "quantizer_only": _stats(q_runs), "codec": _stats(c_runs),
              "paired": paired, "versions": versions, "per_seed": {"quantizer_only": q_runs, "codec": c_runs}}
    write_report(report, args.out, args.table, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
