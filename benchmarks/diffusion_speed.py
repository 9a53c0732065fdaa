"""One transformer forward of a DiT at a real size, float beside FP4DiT packed (issue 23, item 4): latency, resident
weight bytes and (CUDA) peak memory of the forward.

Speed does not depend on the weights' values, so the model is a seeded random ``DiTTransformer2DModel`` of a real
shape (``--arch dit-xl``: DiT-XL/2 at 256 px, 28 blocks of width 1152, 32 x 32 x 4 latents, 675 M parameters;
``dit-s``: DiT-S/2, 12 blocks of width 384). Rows, one run:

- float: bfloat16 on CUDA, float32 on the CPU;
- fp4dit W4A8 packed: ``polyquant.load(artifact, mode="packed", device=...)`` of an RTN FP4DiT artifact (group 128,
  the paper's) calibrated on random inputs: the E2M1 linears run the kernels' FP4 weight-only GEMM on CUDA
  (``PackedLinear`` path "w4"), the E3M0 first-FFN linears decode; activations are fake-quantized token-wise
  (FP8 / FP6 activation GEMMs are not built), so this measures the 4-bit weights' memory and bandwidth effect;
- int8 W8A8 packed (``int8`` baseline): ``W8A8Linear`` on the kernels' int8 GEMM.

Columns: milliseconds per forward (median of --repeats after a warm-up), ratio to float, resident MB of the model,
CUDA peak allocated MB during the forward. On the CPU this is a smoke run (decode path: slower than float, as the
ssm plugin's CPU rows); GPU numbers come from the device (``benchmarks/GPU_PENDING.md``).

    python benchmarks/diffusion_speed.py --device cuda --arch dit-xl --out benchmarks/results_gpu/diffusion_speed_h100.json
    python benchmarks/diffusion_speed.py --device cpu --arch dit-s --out benchmarks/results_cpu/diffusion_speed_dit_s.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _env import environment, write_report

import polyquant as pq
from polyquant.packed import resident_bytes
from polyquant.plugins.diffusion.archs import build_transformer
from polyquant.plugins.diffusion.baselines import Int8Config
from polyquant.plugins.diffusion.fp4dit import FP4DiTConfig

ARCHS: dict[str, dict[str, Any]] = {
    "dit-xl": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
               "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
               "norm_type": "ada_norm_zero"},
    "dit-s": {"num_attention_heads": 6, "attention_head_dim": 64, "in_channels": 4, "out_channels": 8,
              "num_layers": 12, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
              "norm_type": "ada_norm_zero"},
}


def _inputs(arch: dict[str, Any], batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = arch["sample_size"]
    return {"hidden_states": torch.randn(batch, arch["in_channels"], s, s, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 1000, (batch,), generator=g)}


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


@torch.no_grad()
def _time(model: torch.nn.Module, x: dict[str, torch.Tensor], repeats: int, device: torch.device) -> dict[str, Any]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model(**x, return_dict=False)  # warm-up (kernel autotuning, packing layouts)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**x, return_dict=False)
        sync()
        times.append(time.perf_counter() - t0)
    out = {"ms": 1e3 * statistics.median(times), "ms_runs": [1e3 * t for t in times],
           "resident_bytes": resident_bytes(model)}
    if device.type == "cuda":
        out["peak_forward_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="dit-xl")
    parser.add_argument("--batch", type=int, default=8, help="latents per forward (CFG doubles a pipeline's batch)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device.type)
    t0 = time.perf_counter()
    arch = ARCHS[args.arch]
    model = build_transformer({"diffusers": "DiTTransformer2DModel", "config": arch})
    x = _inputs(arch, args.batch, seed=1)
    rows: dict[str, Any] = {}
    fp = model.to(device=device, dtype=dtype)
    rows[f"float {str(dtype).removeprefix('torch.')}"] = _time(fp, _to(x, device, dtype), args.repeats, device)
    model = fp.to(device="cpu", dtype=torch.float32)
    calib = [_inputs(arch, 2, seed=s) for s in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in (("fp4dit W4A8 (RTN, g128) packed", FP4DiTConfig(group_size=128)),
                              ("int8 W8A8 packed", Int8Config())):
            qm = pq.quantize(model, config, calib=calib, progress=False)
            path = pq.save(qm, Path(tmp) / "q.safetensors")
            del qm
            packed = pq.load(path, mode="packed", device=device)
            kinds = sorted(set(packed.packing.packed.values()))
            rows[label] = {**_time(packed.model, _to(x, device, dtype if device.type == "cuda" else torch.float32),
                                   args.repeats, device), "packed_kinds": kinds,
                           "artifact_bytes": path.stat().st_size}
            del packed
    base = next(iter(rows.values()))["ms"]
    for r in rows.values():
        r["vs_float"] = r["ms"] / base
    n_params = sum(p.numel() for p in model.parameters())
    report = {"benchmark": "diffusion_speed", "arch": {"name": args.arch, **arch}, "parameters": n_params,
              "batch": args.batch, "repeats": args.repeats, "threads": args.threads, "environment": env, "rows": rows,
              "seconds": time.perf_counter() - t0}
    lines = [f"DiT forward, {args.arch} ({n_params / 1e6:.0f} M parameters, seeded random weights), batch {args.batch}, "
             f"median of {args.repeats}; {env['device_name']} ({device}), torch {env['torch']}, commit "
             f"{env['git_sha']} (dirty: {env['git_dirty']})", "",
             "| model | ms / forward | vs float | resident MB | CUDA peak forward MB | packed modules |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        peak = f"{r['peak_forward_mb']:.0f}" if "peak_forward_mb" in r else "-"
        lines.append(f"| {label} | {r['ms']:.2f} | {r['vs_float']:.2f}x | {r['resident_bytes'] / 2**20:.1f} | {peak} | "
                     f"{', '.join(r.get('packed_kinds', [])) or '-'} |")
    print("\n".join(lines))
    if args.out is not None:
        write_report(report, args.out, args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
