"""polyquant.kernels against the best plain-torch alternative, side by side, one run.

For each op: the torch alternative's time, the kernel's time, the ratio (torch / kernel; > 1 means the kernel is
faster), and the kernel's achieved GB/s (memory-bound ops) or TFLOP/s / TOP/s (GEMMs) as a share of the device's
ceilings, which are measured at the start (a large device-to-device copy; an 8192^3 fp16 matmul and int8 _int_mm).

    python benchmarks/kernels.py --device cuda --out benchmarks/results_gpu/kernels_h100.json
    python benchmarks/kernels.py --device cpu --quick           # CPU: the torch reference path, small sizes

On CUDA, times are medians of triton.testing.do_bench (CUDA events, L2 flushed before every call). On the CPU
there is no Triton: the "kernel" column is polyquant's torch reference (the CPU dispatch path).
On CUDA the 4-bit GEMM, small-batch int8 GEMM and Hamming rows also sweep a few launch configurations and report
the faster of the default and the best swept one (both are in the row's note); ``--no-sweep`` times the defaults.

Memory-bound rows give the achieved GB/s as a share of the measured copy ceiling (``pct_of_peak``) and of the
GPU's specified HBM bandwidth (``pct_of_hbm_spec``; None for a GPU missing from ``_env.hbm_spec_gbps``).
On CUDA every row also times the kernel captured in a CUDA graph and replayed (``graph_ms``, same timing as
``kernel_ms``): the GPU time without the per-call Python, dispatch and launch gaps. None on the CPU, or when the
capture fails (``graph_error`` says why). The report starts with ``_env.environment``: git SHA and dirty flag,
python / torch / triton / CUDA / driver versions, GPU name.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import environment, hbm_spec_gbps
from _timing import graph_ms as cuda_graph_ms

from polyquant.kernels import gemm, hadamard, hamming, quant, vq
from polyquant.kernels.gemm import GemmConfig
from polyquant.transforms import hadamard_matrix

ROWS: list[dict] = []


# ----------------------------------------------------------------------------------------------------------------
# timing


def bench_ms(fn: Callable[[], object], device: str, quick: bool = False) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100 if not quick else 30, return_mode="median"))
    fn()
    times = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def graph_ms(fn: Callable[[], object], device: str, quick: bool = False) -> dict[str, object]:
    """``_timing.graph_ms`` of ``fn`` with this script's timer; ``{"graph_ms": None}`` off CUDA."""
    if device != "cuda":
        return {"graph_ms": None}
    return cuda_graph_ms(fn, lambda f: bench_ms(f, device, quick))


def ceilings(device: str) -> dict[str, float | None]:
    """Measured peaks: copy bandwidth (GB/s, read + write), fp16 matmul TFLOP/s, int8 _int_mm TOP/s; and the GPU's
    specified HBM bandwidth (GB/s, from its name, not measured; None when unknown). Empty off CUDA."""
    if device != "cuda":
        return {}
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src), device)
    bw = 2 * src.numel() / t / 1e6
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    t = bench_ms(lambda: a @ a, device)
    fp16 = 2 * 8192**3 / t / 1e9
    ai = torch.randint(-128, 128, (8192, 8192), device=device, dtype=torch.int8)
    t = bench_ms(lambda: torch._int_mm(ai, ai.T), device)
    int8 = 2 * 8192**3 / t / 1e9
    del src, dst, a, ai
    torch.cuda.empty_cache()
    return {"copy_GBps": round(bw, 1), "fp16_matmul_TFLOPs": round(fp16, 1), "int8_mm_TOPs": round(int8, 1),
            "hbm_spec_GBps": hbm_spec_gbps(torch.cuda.get_device_name())}


def record(op: str, shape: str, alt: str, t_alt: float, t_kernel: float, *, graph: dict[str, object],
           bytes_moved: float = 0.0, flops: float = 0.0, peaks: dict[str, float | None], peak_key: str = "",
           note: str = "") -> None:
    """Append a row to ROWS and print it. ``graph``: what ``graph_ms`` returned for the timed kernel."""
    row: dict[str, object] = {
        "op": op, "shape": shape, "torch_alternative": alt, "torch_ms": round(t_alt, 4),
        "kernel_ms": round(t_kernel, 4), "speedup": round(t_alt / t_kernel, 3) if t_kernel > 0 else None, **graph,
    }
    if bytes_moved:
        row["kernel_GBps"] = round(bytes_moved / t_kernel / 1e6, 1)
        if peaks.get("copy_GBps"):
            row["pct_of_peak"] = round(100 * row["kernel_GBps"] / peaks["copy_GBps"], 1)
            row["peak"] = "copy_GBps"
        spec = peaks.get("hbm_spec_GBps")
        row["pct_of_hbm_spec"] = round(100 * row["kernel_GBps"] / spec, 1) if spec else None
    if flops:
        row["kernel_TFLOPs"] = round(flops / t_kernel / 1e9, 2)
        if peak_key and peaks.get(peak_key) and not bytes_moved:
            row["pct_of_peak"] = round(100 * row["kernel_TFLOPs"] / peaks[peak_key], 1)
            row["peak"] = peak_key
    if note:
        row["note"] = note
    ROWS.append(row)
    pct = f"{row['pct_of_peak']:5.1f}%" if "pct_of_peak" in row else "     -"
    spec_pct = f"{row['pct_of_hbm_spec']:5.1f}%" if row.get("pct_of_hbm_spec") is not None else "     -"
    rate = f"{row.get('kernel_GBps', '')}" if bytes_moved else f"{row.get('kernel_TFLOPs', '')}T"
    t_graph = f"{row['graph_ms']:>10.4f}" if row["graph_ms"] is not None else f"{'-':>10}"
    print(f"{op:<22}{shape:<30}{alt:<26}{t_alt:>10.4f}{t_kernel:>10.4f}{t_graph}{row['speedup']:>8.2f}x {rate:>10} "
          f"{pct} {spec_pct}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# ops


def bench_quant(device: str, quick: bool, peaks: dict) -> None:
    m, k = (256, 1024) if quick else (16384, 4096)
    x = torch.randn(m, k, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)

    def torch_int8():
        s = x.abs().amax(dim=-1, keepdim=True).float() / 127
        return (x.float() / s).round().clamp(-128, 127).to(torch.int8), s

    t_alt = bench_ms(torch_int8, device, quick)
    kernel = partial(quant.quantize_dynamic, x, fmt="int8")
    t = bench_ms(kernel, device, quick)
    nbytes = x.numel() * (x.element_size() + 1) + m * 4
    record("quantize_dynamic", f"int8 per-token {m}x{k}", "torch eager absmax+round", t_alt, t,
           graph=graph_ms(kernel, device, quick), bytes_moved=nbytes, peaks=peaks)

    def torch_fp8():
        s = x.abs().amax(dim=-1, keepdim=True).float() / 448
        return (x.float() / s).to(torch.float8_e4m3fn), s

    t_alt = bench_ms(torch_fp8, device, quick)
    kernel = partial(quant.quantize_dynamic, x, fmt="e4m3")
    t = bench_ms(kernel, device, quick)
    record("quantize_dynamic", f"e4m3 per-token {m}x{k}", "torch eager -> float8", t_alt, t,
           graph=graph_ms(kernel, device, quick), bytes_moved=nbytes, peaks=peaks)

    s = torch.rand(m, k // 32, device=device) + 0.5
    t_alt = bench_ms(lambda: quant.quantize_reference(x, s, fmt="e2m1", block_size=(1, 32)), device, quick)
    kernel = partial(quant.quantize, x, s, fmt="e2m1", block_size=(1, 32))
    t = bench_ms(kernel, device, quick)
    record("quantize", f"e2m1 group32 {m}x{k}", "torch reference", t_alt, t, graph=graph_ms(kernel, device, quick),
           bytes_moved=x.numel() * (x.element_size() + 1) + s.numel() * 4, peaks=peaks)


def w4_candidates(m: int) -> list[GemmConfig]:
    """Launch configurations swept on CUDA for batch m (the library's defaults are picked from these)."""
    if m <= 2:
        return [GemmConfig("gemv", 1, bn, bk, nw, 1) for bn in (2, 4, 8, 16) for bk in (1024, 2048, 4096)
                for nw in (4, 8)] + [GemmConfig("dot", 16, 32, 256, 4, 4)]
    if m <= 16:
        return [GemmConfig("dot", 16, bn, bk, 4, ns) for bn in (16, 32, 64) for bk in (128, 256, 512)
                for ns in (3, 4)]
    return [GemmConfig("dot", bm, bn, bk, nw, 3) for bm in (64, 128) for bn in (32, 64) for bk in (128, 256)
            for nw in (4, 8)]


def sweep(fn: Callable[[object], object], configs: list, device: str) -> tuple[float, object]:
    """(best ms, config) over the configs that compile and run."""
    best: tuple[float, object] = (math.inf, None)
    for cfg in configs:
        try:
            fn(cfg)
            t = bench_ms(lambda: fn(cfg), device, quick=True)  # noqa: B023
        except Exception as err:  # noqa: BLE001 - a configuration that does not compile is skipped
            print(f"  skip {cfg}: {type(err).__name__}: {str(err)[:80]}", file=sys.stderr)
            continue
        best = min(best, (t, cfg), key=lambda r: r[0])
    return best


def bench_w4(device: str, quick: bool, peaks: dict, do_sweep: bool) -> None:
    dt = torch.float16 if device == "cuda" else torch.float32
    sizes = [512] if quick else [4096, 8192]
    batches = [1, 16] if quick else [1, 16, 128]
    chosen: dict[tuple[int, int], GemmConfig] = {}
    for nk in sizes:
        w = torch.randn(nk, nk, device=device, dtype=dt)
        for fmt in ("int4", "e2m1"):
            packed, scale = gemm.quantize_weight_4bit(w, fmt=fmt, block_size=(1, 128))
            scale = scale.to(dt)
            for m in batches:
                x = torch.randn(m, nk, device=device, dtype=dt)
                t_alt = bench_ms(lambda: F.linear(x, w), device, quick)
                kernel = partial(gemm.w4_gemm, x, packed, scale, fmt=fmt, block_size=(1, 128))
                t = bench_ms(kernel, device, quick)
                note = "default launch config"
                if do_sweep:
                    if (m, nk) not in chosen:  # swept on int4, reused for fp4
                        t_best, cfg = sweep(lambda c: gemm.w4_gemm_triton(x, packed, scale, fmt=fmt,
                                                                          block_size=(1, 128), config=c),
                                            w4_candidates(m), device)
                        chosen[(m, nk)] = cfg
                    cfg = chosen[(m, nk)]
                    swept = partial(gemm.w4_gemm_triton, x, packed, scale, fmt=fmt, block_size=(1, 128), config=cfg)
                    t_best = bench_ms(swept, device, quick)
                    note = f"default config {t:.4f} ms; best swept config {vars(cfg)}"
                    if t_best < t:
                        t, kernel = t_best, swept
                nbytes = packed.numel() + scale.numel() * scale.element_size() + x.numel() * 2 + m * nk * 2
                record(f"w4_gemm {fmt}", f"M={m} N=K={nk} g128", f"{str(dt)[6:]} F.linear", t_alt, t,
                       graph=graph_ms(kernel, device, quick), bytes_moved=nbytes, flops=2 * m * nk * nk, peaks=peaks,
                       note=note)


def bench_int8(device: str, quick: bool, peaks: dict, do_sweep: bool) -> None:
    nk = 1024 if quick else 4096
    ms = [32, 128] if quick else [32, 128, 1024, 4096]
    wq = torch.randint(-128, 128, (nk, nk), device=device, dtype=torch.int8)
    ws = torch.rand(nk, device=device) / 100
    for m in ms:
        xq = torch.randint(-128, 128, (m, nk), device=device, dtype=torch.int8)
        xs = torch.rand(m, 1, device=device) / 100
        if device == "cuda":
            def alt():
                return (torch._int_mm(xq, wq.T).float() * xs * ws).half()
            name = "_int_mm + scale"
        else:
            def alt():
                return gemm.int8_gemm_reference(xq, xs, wq, ws)
            name = "torch reference"
        t_alt = bench_ms(alt, device, quick)
        kernel: Callable[[], object] = partial(gemm.int8_gemm, xq, xs, wq, ws)
        t = bench_ms(kernel, device, quick)
        note = ""
        if do_sweep and m <= 256:
            configs = [GemmConfig("dot", bm, bn, bk, 4, ns) for bm in (16, 32, 64) for bn in (32, 64, 128)
                       for bk in (128, 256) for ns in (3, 4) if bm <= max(16, m)]
            t_best, cfg = sweep(lambda c: gemm.int8_gemm_triton(xq, xs, wq, ws, config=c), configs, device)
            note = f"default config {t:.4f} ms; best swept config {vars(cfg)}"
            if t_best < t:
                t, kernel = t_best, partial(gemm.int8_gemm_triton, xq, xs, wq, ws, config=cfg)
        record("int8_gemm (W8A8)", f"M={m} N=K={nk}", name, t_alt, t, graph=graph_ms(kernel, device, quick),
               flops=2 * m * nk * nk, peaks=peaks, peak_key="int8_mm_TOPs", note=note)


def bench_fwht(device: str, quick: bool, peaks: dict) -> None:
    dt = torch.float16 if device == "cuda" else torch.float32
    for n in ([1024, 1536, 2560] if quick else [4096, 1536, 5120, 12288]):
        m = (1 << 16) // n * 16 if quick else (1 << 27) // (2 * n)  # 128 MB of fp16 on the GPU
        x = torch.randn(m, n, device=device, dtype=dt)
        h = hadamard_matrix(n, device=device).to(dt)  # the core's orthonormal matrix: fwht(x) = x @ h
        t_alt = bench_ms(lambda: x @ h, device, quick)
        kernel = partial(hadamard.fwht, x)
        t = bench_ms(kernel, device, quick)
        record("fwht", f"{m}x{n} {str(dt)[6:]}", "dense Hadamard matmul", t_alt, t,
               graph=graph_ms(kernel, device, quick), bytes_moved=2 * x.numel() * x.element_size(), peaks=peaks)
        kernel = partial(hadamard.fwht_quantize, x)
        t = bench_ms(kernel, device, quick)
        t_alt = bench_ms(lambda: quant.quantize_dynamic(x @ h, fmt="int8"), device, quick)
        record("fwht_quantize int8", f"{m}x{n} {str(dt)[6:]}", "matmul + quantize_dynamic", t_alt, t,
               graph=graph_ms(kernel, device, quick), bytes_moved=x.numel() * (x.element_size() + 1) + m * 4,
               peaks=peaks)
        del x
        if device == "cuda":
            torch.cuda.empty_cache()


def bench_vq(device: str, quick: bool, peaks: dict) -> None:
    for n, k, d in ([(20000, 256, 8)] if quick else [(1 << 20, 1024, 8), (1 << 20, 256, 64)]):
        x = torch.randn(n, d, device=device)
        c = torch.randn(k, d, device=device)

        def alt() -> torch.Tensor:  # ||c||^2 - 2 x c^T (||x||^2 does not change the argmin): one GEMM
            return torch.addmm((c * c).sum(dim=1), x, c.T, alpha=-2).argmin(dim=1)  # (N, K) -> (N,)

        t_alt = bench_ms(alt, device, quick)
        kernel = partial(vq.vq_assign, x, c)
        t = bench_ms(kernel, device, quick)
        record("vq_assign", f"N={n} K={k} D={d} fp32", "addmm |c|^2-2xc^T + argmin", t_alt, t,
               graph=graph_ms(kernel, device, quick), flops=2 * n * k * d, peaks=peaks,
               note="FLOPs counted as 2 N K D (the cross term); tensor cores, tf32x3 on CUDA")
        del x
    n, qn, k, d = (20000, 4, 256, 32) if quick else (1 << 20, 8, 1024, 128)
    cb = torch.randn(qn, k, d, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    idx = torch.randint(0, k, (n, qn), device=device)

    def alt():
        out = cb[0][idx[:, 0]].float()
        for q in range(1, qn):
            out += cb[q][idx[:, q]].float()
        return out.to(cb.dtype)

    t_alt = bench_ms(alt, device, quick)
    kernel = partial(vq.rvq_decode, idx, cb)
    t = bench_ms(kernel, device, quick)
    record("rvq_decode", f"N={n} Q={qn} K={k} D={d}", "torch gather + sum", t_alt, t,
           graph=graph_ms(kernel, device, quick), bytes_moved=n * d * cb.element_size() + idx.numel() * 8, peaks=peaks)


def bench_hamming(device: str, quick: bool, peaks: dict, do_sweep: bool) -> None:
    nq, n, dbits, k = (64, 20000, 256, 10) if quick else (1024, 1 << 20, 1024, 10)
    qb = torch.rand(nq, dbits, device=device) > 0.5
    xb = torch.rand(n, dbits, device=device) > 0.5
    qp, xp = hamming.pack_binary(qb), hamming.pack_binary(xb)
    if device == "cuda":
        qpm = qb.half() * 2 - 1
        xpm = xb.half() * 2 - 1  # (N, D) +-1 fp16: 16x the packed bytes, built outside the timing

        def alt():
            return torch.topk((dbits - qpm @ xpm.T) * 0.5, k, dim=1, largest=False)

        name = "+-1 fp16 matmul + topk"
    else:
        def alt():
            return hamming.hamming_topk_reference(qp, xp, k)

        name = "torch reference"
    t_alt = bench_ms(alt, device, quick)
    kernel: Callable[[], object] = partial(hamming.hamming_topk, qp, xp, k)
    t = bench_ms(kernel, device, quick)
    note = "GB/s counts one pass over the packed database"
    if do_sweep:
        t_best, blocks = sweep(lambda b: hamming.hamming_topk_triton(qp, xp, k, blocks=b),
                               [(64, 128), (128, 128), (64, 256), (128, 256), (256, 128)], device)
        note += f"; default config {t:.4f} ms, best (BLOCK_Q, BLOCK_N) {blocks}"
        if t_best < t:
            t, kernel = t_best, partial(hamming.hamming_topk_triton, qp, xp, k, blocks=blocks)
    record("hamming_topk", f"Q={nq} N={n} D={dbits}b k={k}", name, t_alt, t, graph=graph_ms(kernel, device, quick),
           bytes_moved=xp.numel(), peaks=peaks, note=note)


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU)")
    p.add_argument("--ops", default="quant,w4,int8,fwht,vq,hamming", help="comma-separated subset")
    p.add_argument("--no-sweep", action="store_true", help="CUDA: time only the default launch configurations")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    info = environment(device)
    peaks = ceilings(device)
    do_sweep = device == "cuda" and not args.no_sweep
    print(json.dumps({**info, "ceilings": peaks}))
    print(f"{'op':<22}{'shape':<30}{'torch alternative':<26}{'torch ms':>10}{'ours ms':>10}{'graph ms':>10}"
          f"{'ratio':>9} {'GB/s|TF':>10} {'%peak':>6} {'%spec':>6}")
    benches: dict[str, Callable[[], None]] = {
        "quant": lambda: bench_quant(device, args.quick, peaks),
        "w4": lambda: bench_w4(device, args.quick, peaks, do_sweep),
        "int8": lambda: bench_int8(device, args.quick, peaks, do_sweep),
        "fwht": lambda: bench_fwht(device, args.quick, peaks),
        "vq": lambda: bench_vq(device, args.quick, peaks),
        "hamming": lambda: bench_hamming(device, args.quick, peaks, do_sweep),
    }
    for name in args.ops.split(","):
        benches[name]()
    report = {"benchmark": "kernels", **info, "quick": args.quick, "ceilings": peaks, "swept": do_sweep,
              "kernel_path": "triton" if device == "cuda" else "torch reference (no CUDA)", "results": ROWS}
    out = args.out or Path(f"benchmarks/results/kernels_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
