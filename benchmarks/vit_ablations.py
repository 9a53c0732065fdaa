"""Issue-11 ablations of the vit plugin, side by side in one run (top-1 and KL to float, mean over seeds).

    python benchmarks/vit_ablations.py --out benchmarks/results_cpu/vit_ablations.json --table benchmarks/vit_ablations.md

Sections:
  noncentred   the digits ViT with inputs mapped to [-0.96, 1.84] (``models.affine_input_model(1.4, 0.44)``, exact
               in float): AdaLog against min-max and percentile (the case where the reference's float image input
               and range-centred zero points matter).
  quantizers   one change at a time on the digits ViT: AdaLog, then log2 / log-sqrt2 post-softmax with AdaLog's
               post-GELU quantizer (the default), with a uniform one, and with the log one (``gelu="log"``).
  qhyvit       Q-HyViT on the digits hybrids: granularity "groups" (released rule, default), "integer" (weights
               searched, activations by the released rule), "search" (fake-quant only); bridge against parallel
               calibration; the min-max / percentile baselines with Q-HyViT's placement.

Search-based harness methods run one search round (``--rounds``, default 1) to fit a CPU budget; the tables say so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from _env import environment

import polyquant as pq
from polyquant.plugins.vit.adalog import AdaLogConfig
from polyquant.plugins.vit.baselines import Log2Config, LogSqrt2Config, MinMaxConfig, PercentileConfig
from polyquant.plugins.vit.data import calib_set, load_digits_data
from polyquant.plugins.vit.hybrid import load_digits_hybrid
from polyquant.plugins.vit.models import affine_input_model, load_digits_vit
from polyquant.plugins.vit.qhyvit import QHyViTConfig, quantize_hybrid_baseline

ROWS: list[dict[str, Any]] = []


def _measure(section: str, model_name: str, method: str, bits: int, seed: int, qmodel: torch.nn.Module,
             x: torch.Tensor, y: torch.Tensor, fp_logp: torch.Tensor, seconds: float) -> None:
    with torch.no_grad():
        logits = qmodel(x)
    logp = torch.log_softmax(logits, -1)
    row = {"section": section, "model": model_name, "method": method, "bits": f"W{bits}A{bits}", "seed": seed,
           "accuracy": float((logits.argmax(-1) == y).float().mean() * 100),
           "kl": float((fp_logp.exp() * (fp_logp - logp)).sum(-1).mean()), "seconds": round(seconds, 1)}
    ROWS.append(row)
    print(f"{section:<11}{model_name:<18}{row['bits']:<6}{method:<26}seed {seed}  {row['accuracy']:6.2f}%  "
          f"KL {row['kl']:.4f}  {seconds:5.1f}s", flush=True)


def _run(section: str, model_name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
         calib_of: Callable[[int], torch.Tensor], methods: dict[str, Callable[[int], Any]], bits_list: list[int],
         seeds: int) -> None:
    with torch.no_grad():
        fp_logits = model(x)
    fp_logp = torch.log_softmax(fp_logits, -1)
    ROWS.append({"section": section, "model": model_name, "method": "float", "bits": "-", "seed": 0,
                 "accuracy": float((fp_logits.argmax(-1) == y).float().mean() * 100), "kl": 0.0, "seconds": 0.0})
    for bits in bits_list:
        for name, make in methods.items():
            for seed in range(seeds):
                calib = calib_of(seed)
                t0 = time.perf_counter()
                spec = make(bits)
                if isinstance(spec, str):  # a hybrid baseline with Q-HyViT's placement
                    qmodel = quantize_hybrid_baseline(model, calib, wbits=bits, abits=bits, observer=spec)
                else:
                    qmodel = pq.quantize(model, spec, calib=[calib], progress=False).model
                _measure(section, model_name, name, bits, seed, qmodel, x, y, fp_logp, time.perf_counter() - t0)


def table() -> str:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in ROWS:
        groups.setdefault((r["section"], r["model"], r["bits"], r["method"]), []).append(r)
    lines = ["| section | model | bits | method | top-1 % mean ± std | KL mean | seeds | s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for (section, model, bits, method), rows in groups.items():
        accs, kls = [r["accuracy"] for r in rows], [r["kl"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {section} | {model} | {bits} | {method} | {statistics.fmean(accs):.2f} ± {std:.2f} | "
                     f"{statistics.fmean(kls):.4f} | {len(rows)} | {statistics.fmean(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="noncentred,quantizers,qhyvit")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="search rounds of the harness methods")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vit_ablations.json"))
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    env = environment("cpu")
    print(json.dumps(env), flush=True)
    n, r = args.calib, args.rounds
    harness = dict(calib_size=n, search_round=r)
    data = load_digits_data()

    if "noncentred" in sections:
        scale, offset = 1.4, 0.44
        model = affine_input_model(load_digits_vit(), scale, offset)
        _run("noncentred", "digits-vit affine", model, data.x_test * scale + offset, data.y_test,
             lambda s: calib_set(n, seed=s) * scale + offset,
             {f"adalog (rounds={r})": lambda b: AdaLogConfig(wbits=b, abits=b, **harness),
              "minmax": lambda b: MinMaxConfig(wbits=b, abits=b, calib_size=n),
              "percentile": lambda b: PercentileConfig(wbits=b, abits=b, calib_size=n)},
             [4, 3], args.seeds)
    if "quantizers" in sections:
        _run("quantizers", "digits-vit", load_digits_vit(), data.x_test, data.y_test,
             lambda s: calib_set(n, seed=s),
             {"adalog": lambda b: AdaLogConfig(wbits=b, abits=b, **harness),
              "log2 (gelu adalog)": lambda b: Log2Config(wbits=b, abits=b, **harness),
              "log2 (gelu uniform)": lambda b: Log2Config(wbits=b, abits=b, gelu="uniform", **harness),
              "log2 (gelu log2)": lambda b: Log2Config(wbits=b, abits=b, gelu="log", **harness),
              "logsqrt2 (gelu adalog)": lambda b: LogSqrt2Config(wbits=b, abits=b, **harness),
              "logsqrt2 (gelu uniform)": lambda b: LogSqrt2Config(wbits=b, abits=b, gelu="uniform", **harness)},
             [3], args.seeds)
    if "qhyvit" in sections:
        fast = dict(calib_size=n, grid=20, search_rounds=3)
        for variant in ("mobilevit", "mobilevitv2"):
            model, _ = load_digits_hybrid(variant)
            _run("qhyvit", f"digits-hybrid {variant}", model, data.x_test, data.y_test,
                 lambda s: calib_set(n, seed=s),
                 {"minmax": lambda b: "minmax", "percentile": lambda b: "percentile",
                  "qhyvit groups (default)": lambda b: QHyViTConfig(wbits=b, abits=b, **fast),
                  "qhyvit integer": lambda b: QHyViTConfig(wbits=b, abits=b, granularity="integer", **fast),
                  "qhyvit search (fake-quant)": lambda b: QHyViTConfig(wbits=b, abits=b, granularity="search",
                                                                       **fast),
                  "qhyvit groups parallel": lambda b: QHyViTConfig(wbits=b, abits=b, calib_mode="parallel",
                                                                   **fast)},
                 [4, 3], args.seeds)
    text = table()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(args.out),
                                    "table": str(args.table)}, "rows": ROWS}, indent=1))
    if args.table:
        args.table.write_text(text + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
