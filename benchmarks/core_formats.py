"""Quantization SQNR and reference-path throughput of every core number format.

For each format and two 1M-element tensors (standard normal; Student-t with 3 degrees of freedom, heavy-tailed),
quantize with per-row (1024 rows) symmetric min-max scales and report:
  - SQNR in dB: 10 log10(|x|^2 / |x - Q(x)|^2)
  - throughput of quantize + dequantize on the pure-torch reference path, in million elements per second
    (median of --repeats runs, CPU unless --device says otherwise).

    python benchmarks/core_formats.py --out benchmarks/results/core_formats.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from polyquant.formats import BinaryFormat, Format, LogFormat, get_format
from polyquant.primitives import PerChannel, block_size_for, choose_qparams, dequantize, quantize_tensor

FORMATS: list[Format] = [
    *(get_format(f"int{b}") for b in (2, 3, 4, 6, 8)),
    *(get_format(n) for n in ("e2m1", "e3m0", "e1m2", "e2m3", "e3m2", "e3m4", "e4m3", "e5m2")),
    LogFormat(4, signed=True),
    LogFormat(4, base_log2=0.5, signed=True),
    LogFormat(4, base_log2=20 / 37, signed=True),  # an adaptive base 2^(q/r), r = 37
    BinaryFormat(),
]


def _tensors(numel: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = 1024
    normal = torch.randn(rows, numel // rows, generator=gen)
    t3 = torch.distributions.StudentT(3.0).sample((rows, numel // rows))
    return {"normal": normal, "student_t3": t3}


def _qdq(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    bs = block_size_for(PerChannel(0), x.shape)
    if isinstance(fmt, BinaryFormat):
        scale = x.abs().mean(dim=1, keepdim=True)  # XNOR-Net scale
        zp = torch.zeros_like(scale)
    else:
        scale, zp = choose_qparams(x, fmt, bs)
    q = quantize_tensor(x, fmt, scale, None, bs)
    return dequantize(q, scale, None, bs)


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    err = (x - xq).pow(2).sum().item()
    return float("inf") if err == 0 else 10 * torch.log10(x.pow(2).sum() / err).item()


def run(numel: int, repeats: int, device: str, seed: int) -> dict:
    results = []
    for dist, x in _tensors(numel, seed).items():
        x = x.to(device)
        for fmt in FORMATS:
            xq = _qdq(x, fmt)
            times = []
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _qdq(x, fmt)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results.append({
                "distribution": dist,
                "format": fmt.name,
                "bits": fmt.bits,
                "sqnr_db": round(sqnr_db(x, xq), 3),
                "melem_per_s": round(x.numel() / statistics.median(times) / 1e6, 2),
            })
    return {
        "benchmark": "core_formats",
        "numel": numel,
        "granularity": "per-row (1024 rows), symmetric min-max",
        "device": device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/core_formats.json"))
    args = p.parse_args()
    report = run(args.numel, args.repeats, args.device, args.seed)
    print(f"{'format':<14}{'bits':>5}  {'SQNR normal':>12}{'SQNR t3':>10}  {'Melem/s':>9}")
    by = {(r["distribution"], r["format"]): r for r in report["results"]}
    for fmt in FORMATS:
        n, t = by[("normal", fmt.name)], by[("student_t3", fmt.name)]
        print(f"{fmt.name:<14}{fmt.bits:>5}  {n['sqnr_db']:>12.2f}{t['sqnr_db']:>10.2f}  {n['melem_per_s']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
