"""Packed modules against float: resident bytes and latency, side by side in one run.

    python benchmarks/packed.py                       # CPU (torch's int4 / int8 CPU GEMMs behind the modules)
    python benchmarks/packed.py --device cuda --out benchmarks/results_gpu/packed_h100.json

Rows:
  - the shipped digits ViT (``digits-vit``), float vs its MinMax W4A4 / W8A8 artifacts loaded fake-quant
    (``polyquant.load``) and packed (``mode="packed"``), batch 1 and 16. Activation quantizers run in both the
    fake and the packed model (the packed modules replace the weights only, except W8A8Linear): the packed column
    is the real weight effect plus the same simulated activations.
  - a stack of four 4096 x 4096 linear layers (ReLU between), float (fp32 on CPU, fp16 on CUDA) vs
    ``PackedLinear`` int4 (group 128), ``PackedLinear`` int8 (weight-only, per channel) and ``W8A8Linear``
    (dynamic per-token int8), batch 1 and 16. On the CPU the packed weight-only rows run with both compute dtypes
    (``cpu_dtype`` fp32: decode + ``F.linear``, the outputs of fake-quant; bf16: torch's fast kernels), beside a
    float bf16 row. The other weight entry kinds on the same layers: table (NF4, group 128: ``PackedLinear``'s table
    decode), vq (``VQLinear``, 8-dim sub-vectors, 256 codewords), rotated (``HadamardLinear`` around W8A8 with
    dynamic and static int8 inputs: the fused ``fwht_quantize``).

Resident bytes are every parameter and buffer (``polyquant.packed.resident_bytes``). Latency: median of timed
calls after warm-up (CPU: ``time.perf_counter``, with the thread count in the report; CUDA: CUDA events via
``triton.testing.do_bench``; plus ``graph_ms``, the same call captured in a CUDA graph and replayed: the GPU time
without Python and launch gaps). Ratios are float / other (> 1: faster than float). The JSON starts with
``_env.environment`` (git SHA, versions, device).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _env import environment
from _timing import graph_ms
from torch import nn

import polyquant as pq
from polyquant.kernels import fwht
from polyquant.packed import (
    HadamardLinear,
    Int8Activation,
    PackedLinear,
    VQLinear,
    W8A8Linear,
    quantize_weight,
    resident_bytes,
)

ROWS: list[dict[str, object]] = []
CPU_DTYPES = (torch.float32, torch.bfloat16)  # the packed CPU GEMMs' compute dtype (polyquant.packed)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def bench_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds of fn() after warm-up."""
    with torch.no_grad():
        if device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def graph(fn: Callable[[], object], device: str, reps: int) -> dict[str, object]:
    """CUDA-graph replay time of fn (``_timing.graph_ms``); empty off CUDA."""
    if device != "cuda":
        return {}
    with torch.no_grad():
        return graph_ms(fn, lambda f: bench_ms(f, device, reps))


def record(model: str, variant: str, batch: int, nbytes: int, ms: float, float_bytes: int, float_ms: float,
           graphed: dict[str, object]) -> None:
    row = {"model": model, "variant": variant, "batch": batch, "resident_bytes": nbytes, "ms": round(ms, 4),
           "bytes_ratio": round(float_bytes / nbytes, 2), "speedup_vs_float": round(float_ms / ms, 2), **graphed}
    ROWS.append(row)
    g = row.get("graph_ms")
    print(f"{model:<18}{variant:<28}{batch:>6}{nbytes:>14,}{row['bytes_ratio']:>8.2f}x{ms:>11.3f}"
          f"{row['speedup_vs_float']:>9.2f}x{'' if g is None else f'{g:>11.3f}'}", flush=True)


def bench_vit(device: str, reps: int) -> None:
    from polyquant.plugins.vit.baselines import MinMaxConfig
    from polyquant.plugins.vit.data import calib_set, load_digits_data
    from polyquant.plugins.vit.models import build_model

    model, _ = build_model("digits-vit")
    model = model.eval()
    calib = [calib_set(32, 0, 32, 1)]
    x_all = load_digits_data(32, 1).x_test
    variants: dict[str, nn.Module] = {"float": copy.deepcopy(model).to(device)}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (4, 8):
            qm = pq.quantize(model, MinMaxConfig(wbits=bits, abits=bits, calib_size=32), calib=calib, progress=False)
            path = pq.save(qm, Path(tmp) / f"w{bits}.safetensors")
            variants[f"minmax W{bits}A{bits} fake"] = pq.load(path, device=device).model
            for dtype in CPU_DTYPES if device == "cpu" else (torch.float32,):
                packed = pq.load(path, mode="packed", device=device, cpu_dtype=dtype)
                kinds = sorted(set(packed.packing.packed.values()))
                tag = f" {DTYPE_NAMES[dtype]}" if device == "cpu" else ""
                variants[f"minmax W{bits}A{bits} packed{tag}"] = packed.model
                print(f"# W{bits}A{bits} packed layers: {', '.join(kinds)}", flush=True)
    float_bytes = resident_bytes(variants["float"])
    for batch in (1, 16):
        x = x_all[:batch].to(device)
        float_ms = bench_ms(lambda: variants["float"](x), device, reps)
        for name, m in variants.items():
            ms = float_ms if name == "float" else bench_ms(lambda m=m: m(x), device, reps)
            graphed = graph(lambda m=m: m(x), device, reps)
            record("digits-vit", name, batch, resident_bytes(m), ms, float_bytes, float_ms, graphed)


def bench_stack(device: str, reps: int, dim: int, layers: int) -> None:
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    linears = [nn.Linear(dim, dim) for _ in range(layers)]

    def stack(mods: list[nn.Module]) -> nn.Module:
        seq: list[nn.Module] = []
        for m in mods:
            seq += [m, nn.ReLU()]
        return nn.Sequential(*seq[:-1]).eval()

    variants: dict[str, nn.Module] = {"float": stack([copy.deepcopy(m) for m in linears]).to(device, dtype)}
    if device == "cpu":
        variants["float bf16"] = stack([copy.deepcopy(m) for m in linears]).to(device, torch.bfloat16)
    for cpu_dtype in CPU_DTYPES if device == "cpu" else (torch.float32,):
        tag = f" {DTYPE_NAMES[cpu_dtype]}" if device == "cpu" else ""
        for fmt, group in (("int4", 128), ("int8", None)):
            name = f"PackedLinear {fmt}{' g128' if group else ''}{tag}"
            variants[name] = stack([PackedLinear(quantize_weight(m.weight, fmt, group), m.bias, device=device,
                                                 cpu_dtype=cpu_dtype) for m in linears])
    variants["W8A8Linear dynamic"] = stack([W8A8Linear(quantize_weight(m.weight, "int8", None), m.bias,
                                                       act=Int8Activation(dynamic=True), device=device)
                                            for m in linears])
    # the other entry kinds (polyquant.entries): table (NF4, group 128), vq (8-dim sub-vectors, 256 codewords: 1 bit
    # per weight), rotated (Hadamard around W8A8, dynamic per-token and static per-tensor int8 inputs)
    for cpu_dtype in CPU_DTYPES if device == "cpu" else (torch.float32,):
        tag = f" {DTYPE_NAMES[cpu_dtype]}" if device == "cpu" else ""
        variants[f"table nf4 g128{tag}"] = stack([PackedLinear(quantize_weight(m.weight, "nf4", 128), m.bias,
                                                               device=device, cpu_dtype=cpu_dtype) for m in linears])
    variants["vq d8 c256"] = stack([VQLinear.from_float(m, dim=8, codebook_size=256, iters=10).to(device)
                                    for m in linears])
    variants["rotated W8A8 dynamic"] = stack([HadamardLinear.from_float(m, fmt="int8", group_size=None,
                                                                        activations="int8", device=device)
                                              for m in linears])
    calib = torch.randn(64, dim)
    variants["rotated W8A8 static"] = stack([HadamardLinear.from_float(
        m, fmt="int8", group_size=None, activations="int8", act_scale=float(fwht(calib).abs().max()) / 127,
        device=device) for m in linears])
    for name, m in variants.items():
        paths = {getattr(mod, "path", None) for mod in m.modules()} - {None}
        if paths:
            print(f"# {name}: path {', '.join(sorted(paths))}", flush=True)
    float_bytes = resident_bytes(variants["float"])
    label = f"{layers}x linear {dim}"
    for batch in (1, 16):
        x = torch.randn(batch, dim, device=device, dtype=dtype)
        float_ms = bench_ms(lambda: variants["float"](x), device, reps)
        for name, m in variants.items():
            xin = x.bfloat16() if name == "float bf16" else x
            ms = float_ms if name == "float" else bench_ms(lambda m=m, xin=xin: m(xin), device, reps)
            graphed = graph(lambda m=m, xin=xin: m(xin), device, reps)
            record(label, name, batch, resident_bytes(m), ms, float_bytes, float_ms, graphed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results_<dev>/packed.json)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per row on the CPU")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    env = {**environment(args.device), "cpu_threads": torch.get_num_threads()}
    print(json.dumps(env))
    graph_col = f"{'graph ms':>11}" if args.device == "cuda" else ""
    print(f"{'model':<18}{'variant':<28}{'batch':>6}{'bytes':>14}{'ratio':>9}{'ms':>11}{'speedup':>10}{graph_col}")
    bench_vit(args.device, args.reps)
    bench_stack(args.device, args.reps, args.dim, args.layers)
    out = args.out or Path(f"benchmarks/results_{'gpu' if args.device == 'cuda' else 'cpu'}/packed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "rows": ROWS}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
