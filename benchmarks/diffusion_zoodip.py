"""ZOODiP (issue 26) on the shipped digits UNet: zeroth-order personalization variants beside backprop textual
inversion, at equal forward passes, one run.

The task: learn a new class row of the shipped digits UNet's class table (d = 128) from ``--refs`` training images
of one digit (the concept; 3 by default), starting from the null class's row, against the UNet with INT8 weights
(symmetric per output channel, weight-only: ZOODiP's qint8). Every variant gets the same forward-pass budget
(``--budget`` sample forward passes: ZO with n queries runs budget / ((n + 1) B) steps, backprop budget / B steps,
each also with a backward pass), the same references, and seeds 0, 1, 2.

    python benchmarks/diffusion_zoodip.py          # writes results_cpu/diffusion_zoodip.json, diffusion_zoodip.md
    python benchmarks/diffusion_zoodip.py --quick --out /tmp/z.json --table /tmp/z.md   # 1 seed, small budget

Rows: plain ZO (t ~ U{0..T-1}, no subspace) with n = 1, 2, 4; ZO n = 2 + Subspace Gradient; ZO n = 2 + SG + PUTS
(ZOODiP); backprop textual inversion on the float model (the upper bound), with PUTS as ZOODiP.

Columns: denoising loss of the learned class on a fixed evaluation set (the references noised at 64 fixed (t, eps)
pairs, t uniform over all 1000 steps, and at PUTS' 500..899 separately), the share (%) of 50 DDIM-20 samples of the
new class that the shipped classifier calls the concept digit (chance 10%), forward passes and steps, and peak
memory above the loaded model: the growth of the process's resident set (Linux VmHWM, reset through
/proc/self/clear_refs) during 3 training steps at batch ``--mem-batch`` after one warm-up step, each variant in a
fresh subprocess whose glibc returns blocks of 64 KiB or more to the system on free (``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _env import environment, mean_pm_std, seed_stats, write_report

from polyquant.plugins.diffusion import methods as M
from polyquant.plugins.diffusion.models import classify, digits_images, make_scheduler, sample
from polyquant.plugins.diffusion.unet import UNET_SHIPPED
from polyquant.nn import quantize_weights
from polyquant.plugins.diffusion.zoodip import (ZOODiPConfig, backprop_embedding, grow_class_embedding, train_embedding,
                                                weight_only_rules)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results_cpu" / "diffusion_zoodip.json"
DEFAULT_TABLE = HERE / "diffusion_zoodip.md"
SEEDS = (0, 1, 2)
BACKPROP = "backprop TI (float, PUTS)"
ZOODIP = "ZOODiP: ZO n=2 + SG + PUTS"
PLAIN2 = "ZO n=2"
VARIANTS: dict[str, dict[str, Any]] = {
    "ZO n=1": {"queries": 1, "subspace": False, "puts": False},
    PLAIN2: {"queries": 2, "subspace": False, "puts": False},
    "ZO n=4": {"queries": 4, "subspace": False, "puts": False},
    "ZO n=2 + SG": {"queries": 2, "subspace": True, "puts": False},
    ZOODIP: {"queries": 2, "subspace": True, "puts": True},
    BACKPROP: {"queries": 1, "subspace": False, "puts": True},
}


def _quantized_unet(wbits: int = 8) -> torch.nn.Module:
    """The digits UNet with INT8 weight-only quantization (what zoodip's handler builds), float class table."""
    model = M.build_model({"name": UNET_SHIPPED})
    return quantize_weights(model, weight_only_rules(wbits), inplace=True).unet


def _config(label: str, args: argparse.Namespace, seed: int) -> tuple[ZOODiPConfig, int]:
    v = VARIANTS[label]
    per_step = args.batch * (1 if label == BACKPROP else v["queries"] + 1)
    iters = max(1, args.budget // per_step)
    return ZOODiPConfig(iters=iters, batch=args.batch, lr=args.lr, tau=args.tau, seed=seed, **v), iters


@torch.no_grad()
def _eval_set(refs: torch.Tensor, puts: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(12345)
    ddpm = make_scheduler("ddpm")
    idx = torch.randint(0, len(refs), (64,), generator=gen)
    t = torch.randint(500, 900, (64,), generator=gen) if puts else torch.randint(0, 1000, (64,), generator=gen)
    eps = torch.randn(64, *refs.shape[1:], generator=gen)
    return {"x_t": ddpm.add_noise(refs[idx], eps, t), "t": t, "eps": eps}


@torch.no_grad()
def _eval_loss(unet: torch.nn.Module, label: int, ev: dict[str, torch.Tensor]) -> float:
    out = unet(ev["x_t"], timestep=ev["t"], class_labels=torch.full((64,), label), return_dict=False)[0]
    return float((out - ev["eps"]).pow(2).mean())


def _vmhwm_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0])


def measure_memory(label: str, batch: int) -> dict[str, float]:
    """In this (fresh) process: the peak resident growth (MiB) of 3 training steps of ``label`` at ``batch``."""
    torch.set_num_threads(1)
    images, labels = digits_images("train")
    refs = images[labels == 3][:16]
    float_run = label == BACKPROP
    unet = M.build_model({"name": UNET_SHIPPED}).unet if float_run else _quantized_unet()
    train = backprop_embedding if float_run else train_embedding
    train(unet, refs, ZOODiPConfig(iters=1, batch=batch, tau=2, **VARIANTS[label]))  # warm-up: lazy imports, 1st call
    config = ZOODiPConfig(iters=3, batch=batch, tau=2, **VARIANTS[label])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    _, before = _vmhwm_kib()
    train(unet, refs, config)
    peak, _ = _vmhwm_kib()
    return {"peak_growth_mib": (peak - before) / 1024}


def _memory(label: str, batch: int) -> float | None:
    try:
        # glibc returns every block of 64 KiB or more to the system on free, so the resident set follows the live
        # tensors instead of the allocator's retained heap
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
        out = subprocess.run([sys.executable, __file__, "--measure-memory", label, "--mem-batch", str(batch)],
                             capture_output=True, text=True, timeout=600, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        print(f"  memory of {label}: not measured ({type(e).__name__})", flush=True)
        return None


def run(args: argparse.Namespace, seeds: tuple[int, ...]) -> dict[str, Any]:
    images, labels = digits_images("train")
    refs = images[labels == args.concept][: args.refs]
    ev_all, ev_puts = _eval_set(refs, False), _eval_set(refs, True)
    per: dict[str, dict[str, list[float]]] = {}
    float_unet = M.build_model({"name": UNET_SHIPPED}).unet
    init_all = _eval_loss(float_unet, 10, ev_all)
    for s in seeds:
        print(f"seed {s}", flush=True)
        for label in VARIANTS:
            config, iters = _config(label, args, s)
            float_run = label == BACKPROP
            unet = M.build_model({"name": UNET_SHIPPED}).unet if float_run else _quantized_unet()
            t0 = time.perf_counter()
            theta, record = (backprop_embedding if float_run else train_embedding)(unet, refs, config)
            secs = time.perf_counter() - t0
            # evaluate every learned vector on the INT8 model (what ZOODiP deploys; backprop's too)
            qunet = _quantized_unet()
            new = grow_class_embedding(qunet, theta.reshape(1, -1))
            img = sample(qunet, torch.full((args.samples,), new), steps=20, scheduler="ddim", seed=2000 + s)
            rec = per.setdefault(label, {})
            rec.setdefault("loss_all_t", []).append(_eval_loss(qunet, new, ev_all))
            rec.setdefault("loss_puts_t", []).append(_eval_loss(qunet, new, ev_puts))
            rec.setdefault("concept_pct", []).append(100 * float((classify(img) == args.concept).float().mean()))
            rec.setdefault("forward_passes", []).append(float(record["forward_passes"]))
            rec.setdefault("steps", []).append(float(iters))
            rec.setdefault("seconds", []).append(secs)
            print(f"  {label:28s} " + "  ".join(f"{k} {v[-1]:.4g}" for k, v in rec.items()), flush=True)
    results: dict[str, Any] = {"init_loss_all_t (null class, float)": init_all, "rows": {}}
    for label, rec in per.items():
        row = {k: seed_stats(v) for k, v in rec.items()}
        row["loss_all_t_vs_zo2"] = seed_stats([a - b for a, b in zip(rec["loss_all_t"], per[PLAIN2]["loss_all_t"])])
        row["loss_puts_t_vs_zo2"] = seed_stats([a - b for a, b in zip(rec["loss_puts_t"],
                                                                      per[PLAIN2]["loss_puts_t"])])
        row["peak_growth_mib"] = None if args.quick else _memory(label, args.mem_batch)
        results["rows"][label] = row
    return results


def markdown(report: dict[str, Any]) -> str:
    env, setup, res = report["environment"], report["setup"], report["results"]
    rows = res["rows"]
    lines = ["# Diffusion (issue 26): ZOODiP on the shipped digits UNet", "",
             f"`{setup['command']}` (JSON: `{setup['json']}`). {setup['note']}", "",
             f"Commit {env['git_sha']} (dirty: {env['git_dirty']}); python {env['python']}, torch {env['torch']}; "
             f"{env['platform']}, {env['device']} ({env['device_name']}), {setup['threads']} torch threads; whole run "
             f"{report['seconds']:.0f} s.", "",
             "| variant | steps | forward passes | eval loss, t uniform | vs ZO n=2 (paired) | eval loss, t in "
             "500..899 | vs ZO n=2 (paired) | samples called the concept % | peak memory growth MiB | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        mem = "—" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:.1f}"
        vs_a = "—" if label == PLAIN2 else mean_pm_std(r["loss_all_t_vs_zo2"], "+.4f")
        vs_p = "—" if label == PLAIN2 else mean_pm_std(r["loss_puts_t_vs_zo2"], "+.4f")
        lines.append(f"| {label} | {r['steps']['mean']:.0f} | {r['forward_passes']['mean']:.0f} | "
                     f"{mean_pm_std(r['loss_all_t'], '.4f')} | {vs_a} | {mean_pm_std(r['loss_puts_t'], '.4f')} | "
                     f"{vs_p} | {mean_pm_std(r['concept_pct'], '.1f')} | {mem} | {mean_pm_std(r['seconds'], '.1f')} |")
    z, b = rows[ZOODIP], rows[BACKPROP]
    lines += ["", "## Reading", "",
              f"- ZOODiP vs plain ZO n=2 at equal forward passes, paired eval loss: t uniform "
              f"{mean_pm_std(z['loss_all_t_vs_zo2'], '+.4f')}, t in 500..899 "
              f"{mean_pm_std(z['loss_puts_t_vs_zo2'], '+.4f')} (negative: ZOODiP lower); per seed "
              f"{[round(v, 4) for v in z['loss_all_t_vs_zo2']['per_seed']]} / "
              f"{[round(v, 4) for v in z['loss_puts_t_vs_zo2']['per_seed']]}.",
              "- Samples of the learned class called the concept digit: ZOODiP "
              f"{mean_pm_std(z['concept_pct'], '.1f')}%, "
              f"backprop {mean_pm_std(b['concept_pct'], '.1f')}% (chance 10%). The null class's float loss on the "
              f"t-uniform set is {res['init_loss_all_t (null class, float)']:.4f}."]
    if z["peak_growth_mib"] is not None and b["peak_growth_mib"]:
        lines.append(f"- Peak memory growth during training at batch {setup['mem_batch']}: ZOODiP "
                     f"{z['peak_growth_mib']:.1f} MiB vs backprop {b['peak_growth_mib']:.1f} MiB "
                     f"({z['peak_growth_mib'] / b['peak_growth_mib']:.2f}x).")
    lines += ["", "Mean ± std over the seeds; \"vs ZO n=2\" is the mean ± std over seeds of the paired per-seed "
              "difference. Every learned vector is evaluated on the INT8 model. Memory is the CPU resident-set "
              "growth of a fresh process (one thread) over the loaded model, with glibc returning blocks of 64 KiB or "
              "more on free (smaller ones stay in its heap); on a GPU it would be torch.cuda.max_memory_allocated "
              "(GPU_PENDING).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--concept", type=int, default=3)
    parser.add_argument("--refs", type=int, default=16, help="reference images of the concept")
    parser.add_argument("--budget", type=int, default=7200, help="sample forward passes per variant")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--mem-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 240, no memory subprocesses")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory is not None:
        print(json.dumps(measure_memory(args.measure_memory, args.mem_batch)))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = environment("cpu")
    seeds = SEEDS[:1] if args.quick else SEEDS[:args.seeds]
    if args.quick:
        args.budget, args.samples = 240, 20
    results = run(args, seeds)
    out = args.out.resolve()
    report = {
        "benchmark": "diffusion_zoodip",
        "setup": {"seeds": list(seeds), "concept": args.concept, "refs": args.refs, "budget": args.budget,
                  "batch": args.batch, "lr": args.lr, "tau": args.tau, "samples": args.samples,
                  "mem_batch": args.mem_batch, "threads": args.threads,
                  "command": " ".join(["python benchmarks/diffusion_zoodip.py", *sys.argv[1:]]),
                  "json": f"benchmarks/{out.relative_to(HERE)}" if out.is_relative_to(HERE) else str(args.out),
                  "note": f"Concept: the digit {args.concept}, {args.refs} training images; budget {args.budget} "
                          f"sample forward passes per variant at batch {args.batch}; Adam lr {args.lr} (eps 1e-3), "
                          f"mu 1e-3, tau {args.tau}, nu 1e-3; INT8 weight-only UNet; theta starts at the null "
                          "class's row."},
        "environment": env,
        "results": results,
    }
    report["seconds"] = time.perf_counter() - t0
    text = markdown(report)
    write_report(report, args.out, args.table, text)
    print(text)


if __name__ == "__main__":
    main()
