"""ViT PTQ benchmark on the offline digits task: AdaLog, Q-HyViT and the baselines, side by side.

    python benchmarks/vit.py --seeds 5 --bits W3A3,W4A4,W6A6,W8A8 --out benchmarks/results_cpu/vit.json

For every model (the shipped digits ViT and the digits MobileViT hybrid), bit width, method and seed: quantize
with ``calib`` images drawn with that seed from the training split (seeds vary only the calibration subset),
evaluate on the fixed 540-image test split, time the calibration, and measure the artifact size from the saved
file (for seed 0).
Two quality numbers: top-1 accuracy, and KL(float || quantized) of the predicted class distributions, which
still separates methods where accuracy saturates (one test image is 0.19 points).

On the hybrid, the baselines are the registered methods ``hybrid_minmax`` and ``hybrid_percentile``
(``qhyvit.quantize_hybrid_baseline``: Q-HyViT's placement, BN folded, every Conv / Linear / attention product,
calibrated by the plain observer, so only the calibration differs); every run goes through ``polyquant.quantize``,
so ``polyquant quantize vit/<method>`` with the same images gives the same numbers.
Prints a table (mean +- std over seeds, drop against float, calibration seconds, artifact bytes) and
writes every run to JSON (rewritten after each run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_METHODS = {  # per model: AdaLog and its baselines on the ViT, Q-HyViT and its baselines on the hybrid
    "digits-vit": ("adalog", "minmax", "percentile", "log2", "logsqrt2", "twin_uniform"),
    "digits-hybrid": ("qhyvit", "hybrid_minmax", "hybrid_percentile"),
}
DEFAULT_MODELS = tuple(DEFAULT_METHODS)


def parse_bits(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item.startswith("W") or "A" not in item:
            raise argparse.ArgumentTypeError(f"bits look like W4A4, got {item!r}")
        w, a = item[1:].split("A")
        out.append((int(w), int(a)))
    return out


def _artifact_bytes(quantized: Any) -> int:
    """Size of the artifact ``polyquant.save`` writes."""
    import polyquant as pq

    with tempfile.TemporaryDirectory() as tmp:
        return pq.save(quantized, Path(tmp) / "a.safetensors").stat().st_size


def _config(method: str, wbits: int, abits: int, calib: int, fast: bool, retrain_iters: int) -> Any:
    from polyquant.plugins.vit.methods import METHODS

    fields: dict[str, Any] = {"wbits": wbits, "abits": abits, "calib_size": calib}
    if fast and method not in ("qhyvit", "minmax", "percentile", "hybrid_minmax", "hybrid_percentile"):
        fields["search_round"] = 1
    if method == "adalog+retrain":
        return METHODS["adalog"](retrain=True, retrain_iters=retrain_iters, retrain_size=256, **fields)
    if method in ("log2+gelu", "logsqrt2+gelu"):  # the quantizer ablation: log quantizers after GELU too
        return METHODS[method.split("+")[0]](gelu="log", **fields)
    if method in ("log2+uniform", "logsqrt2+uniform"):  # log softmax with a uniform post-GELU quantizer
        return METHODS[method.split("+")[0]](gelu="uniform", **fields)
    if method == "qhyvit" and fast:
        fields["search_rounds"] = 1
    return METHODS[method](**fields)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import polyquant as pq
    from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data
    from polyquant.plugins.vit.models import build_model, input_spec

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "torch_threads": args.threads, "float": {}, "runs": []}
    done = set()
    if args.resume and args.out.is_file():
        prev = json.loads(args.out.read_text())
        result["runs"] = prev.get("runs", [])
        result["float"] = prev.get("float", {})
        done = {(r["model"], r["bits"], r["method"], r["seed"]) for r in result["runs"]}
    task = -1
    for model_name in args.models:
        try:
            model, _ = build_model(model_name)
        except (FileNotFoundError, ImportError, ValueError) as e:
            print(f"skipping {model_name}: {e}", file=sys.stderr)
            continue
        size, chans = input_spec(model)
        data = load_digits_data(size, chans)
        fp_acc = evaluate(model, data)
        with torch.no_grad():
            fp_logp = torch.log_softmax(model.eval()(data.x_test), -1)
        result["float"][model_name] = fp_acc
        print(f"{model_name}: float accuracy {fp_acc:.2f}%", flush=True)
        methods = list(args.methods or DEFAULT_METHODS.get(model_name, DEFAULT_METHODS["digits-vit"]))
        if args.retrain_iters > 0 and "adalog" in methods:
            methods.append("adalog+retrain")
        for wbits, abits in args.bits:
            bits = f"W{wbits}A{abits}"
            for method in methods:
                for seed in range(args.seeds):
                    if (model_name, bits, method, seed) in done:
                        continue
                    task += 1
                    if task % args.shard[1] != args.shard[0]:
                        continue
                    config = _config(method, wbits, abits, args.calib, args.fast, args.retrain_iters)
                    n = 256 if method == "adalog+retrain" else args.calib
                    calib = calib_set(n, seed, size, chans)
                    t0 = time.perf_counter()
                    try:
                        quantized = pq.quantize(model, config, calib=[calib], progress=False)
                        qmodel = quantized.model
                    except Exception as e:  # a method failing on a model is a result, not a crash
                        print(f"  {bits} {method} seed {seed}: FAILED {type(e).__name__}: {e}", flush=True)
                        result["runs"].append({"model": model_name, "bits": bits, "method": method, "seed": seed,
                                               "error": f"{type(e).__name__}: {e}"})
                        continue
                    seconds = time.perf_counter() - t0
                    acc = evaluate(qmodel, data)
                    with torch.no_grad():
                        logp = torch.log_softmax(qmodel(data.x_test), -1)
                    kl = float((fp_logp.exp() * (fp_logp - logp)).sum(-1).mean())
                    nbytes = _artifact_bytes(quantized) if seed == 0 else None
                    rec = {"model": model_name, "bits": bits, "method": method, "seed": seed, "accuracy": acc,
                           "kl": kl, "calib_seconds": seconds, "artifact_bytes": nbytes}
                    result["runs"].append(rec)
                    print(f"  {bits} {method:15s} seed {seed}: {acc:6.2f}%  KL {kl:.4f}  {seconds:6.1f}s"
                          + (f"  {nbytes:,} B" if nbytes else ""), flush=True)
                    if args.out:
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps(result, indent=1))
    result["table"] = summarize(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["runs"]:
        if "accuracy" in r:
            rows.setdefault((r["model"], r["bits"], r["method"]), []).append(r)
    table = []
    for (model, bits, method), runs in rows.items():
        accs = [r["accuracy"] for r in runs]
        secs = [r["calib_seconds"] for r in runs]
        kls = [r.get("kl", float("nan")) for r in runs]
        nbytes = next((r["artifact_bytes"] for r in runs if r.get("artifact_bytes")), None)
        fp = result["float"].get(model)
        mean = statistics.fmean(accs)
        table.append({
            "model": model, "bits": bits, "method": method, "seeds": len(accs), "acc_mean": mean,
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "drop": None if fp is None else fp - mean, "kl_mean": statistics.fmean(kls),
            "kl_std": statistics.stdev(kls) if len(kls) > 1 else 0.0, "calib_seconds": statistics.fmean(secs),
            "artifact_bytes": nbytes,
        })
    return table


def print_table(result: dict[str, Any]) -> str:
    lines = []
    for model, fp in result["float"].items():
        lines.append(f"\n{model} (float {fp:.2f}%)\n")
        lines.append("| bits | method | top-1 % (mean ± std) | drop | KL to float | calib s | artifact bytes |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in result["table"]:
            if row["model"] != model:
                continue
            nbytes = f"{row['artifact_bytes']:,}" if row["artifact_bytes"] else "-"
            lines.append(f"| {row['bits']} | {row['method']} | {row['acc_mean']:.2f} ± {row['acc_std']:.2f} "
                         f"(n={row['seeds']}) | {row['drop']:+.2f} | {row['kl_mean']:.4f} ± {row['kl_std']:.4f} "
                         f"| {row['calib_seconds']:.1f} | {nbytes} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="calibration subsets (seeds 0 .. N-1)")
    parser.add_argument("--bits", type=parse_bits, default=parse_bits("W3A3,W4A4,W6A6,W8A8"))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="comma-separated methods for every model (default: per model, see DEFAULT_METHODS)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(DEFAULT_MODELS))
    parser.add_argument("--calib", type=int, default=32, help="calibration images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--fast", action="store_true", help="one search round instead of three (smoke runs)")
    parser.add_argument("--retrain-iters", type=int, default=0, help="> 0 adds 'adalog+retrain' rows")
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vit.json"))
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1),
                        help="K/N: run only every N-th run starting at K (parallel workers)")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="merge the JSON files of shards into --out and print the table (no runs)")
    args = parser.parse_args(argv)
    if args.merge:
        result = {"args": {}, "float": {}, "runs": []}
        for path in args.merge:
            part = json.loads(path.read_text())
            result["args"] = part.get("args", {})
            result["float"].update(part.get("float", {}))
            result["runs"] += part.get("runs", [])
        unique = {(r["model"], r["bits"], r["method"], r["seed"]): r for r in result["runs"]}  # shards may share runs
        result["runs"] = sorted(unique.values(), key=lambda r: (r["model"], r["bits"], r["method"], r["seed"]))
        result["table"] = summarize(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    else:
        result = run(args)
    text = print_table(result)
    if args.table:
        args.table.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
