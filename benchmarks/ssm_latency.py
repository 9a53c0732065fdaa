"""Batch-1 decode latency of a Quamba W8A8 Mamba (packed: int8 in_proj on the W8A8 GEMM, Hadamard out_proj on the
FWHT kernel) beside the float model, token by token with the cache (issue 22, item 4).

Latency does not depend on the weights' values, so the model is a seeded random ``MambaForCausalLM`` of a real
size (``--arch 130m``: Mamba-130m's shape, hidden 768, 24 layers, d_inner 1536 = 12 * 128, vocab 50280; ``tiny``:
the shipped byte-level model's shape). Rows, all timed with ``polyquant.plugins.ssm.decode.decode_latency`` (greedy,
batch 1, the model's cache, CUDA synchronized around each span) in one run:

- float (transformers' own ``MambaMixer`` and cache) in float16 on CUDA, float32 on the CPU;
- float through ``QuantMambaMixer`` with no quantizer (the same dtype): the plugin's mixer, the cost of its torch
  scan without quantization;
- quamba packed: ``polyquant.load(artifact, mode="packed", device=...)`` of a W8A8 Quamba artifact calibrated on
  random token windows.

Columns: prefill seconds (the prompt), decode seconds per token (mean of the tokens after the first), the ratio
to the float transformers row, and resident bytes of the model. On the CPU this is a smoke run: the numbers are the
CPU's (no GPU claim); GPU numbers come from the device (``benchmarks/GPU_PENDING.md``).

    python benchmarks/ssm_latency.py --device cuda --arch 130m --out benchmarks/results_gpu/ssm_latency_h100.json
    python benchmarks/ssm_latency.py --device cpu --arch tiny --out /tmp/ssm_latency.json     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _env import environment, write_report

import polyquant as pq
from polyquant.packed import resident_bytes
from polyquant.plugins.ssm.decode import decode_latency
from polyquant.plugins.ssm.mixer import replace_mixers
from polyquant.plugins.ssm.models import MambaLM
from polyquant.plugins.ssm.quamba import QuambaConfig

ARCHS: dict[str, dict[str, int]] = {
    "130m": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "expand": 2},
    "tiny": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "expand": 2},
}


def build(arch: str) -> MambaLM:
    """A seeded random transformers Mamba-1 of the named shape (float32, eval)."""
    from transformers import MambaConfig, MambaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = MambaForCausalLM(MambaConfig(**ARCHS[arch], use_cache=True, pad_token_id=0, bos_token_id=0,
                                          eos_token_id=0))
    return MambaLM(lm).eval()


def _time(lm: torch.nn.Module, prompt: torch.Tensor, steps: int, repeats: int) -> dict[str, Any]:
    runs = [decode_latency(lm, prompt, steps, warmup=1 if i else 2) for i in range(repeats)]
    return {"prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_s_per_token": statistics.median(r["decode_s_per_token"] for r in runs),
            "decode_s_per_token_runs": [r["decode_s_per_token"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="130m")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="generated tokens per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    env = environment(device.type)
    t0 = time.perf_counter()
    model = build(args.arch)
    vocab = ARCHS[args.arch]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, vocab, (4, 128), generator=g) for _ in range(4)]
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)

    rows: dict[str, Any] = {}
    hf = copy.deepcopy(model).to(device=device, dtype=dtype)
    rows[f"float {str(dtype).removeprefix('torch.')} (transformers MambaMixer)"] = {
        **_time(hf.lm, prompt, args.steps, args.repeats), "resident_bytes": resident_bytes(hf)}
    del hf
    ours = copy.deepcopy(model)
    replace_mixers(ours)
    ours = ours.to(device=device, dtype=dtype)
    rows[f"float {str(dtype).removeprefix('torch.')} (QuantMambaMixer, no quantizer)"] = {
        **_time(ours.lm, prompt, args.steps, args.repeats), "resident_bytes": resident_bytes(ours)}
    del ours
    qm = pq.quantize(model, QuambaConfig(), calib=calib, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = pq.save(qm, Path(tmp) / "quamba.safetensors")
        packed = pq.load(path, model, mode="packed", device=device)
        kinds = sorted(set(packed.packing.packed.values()))
        rows["quamba W8A8 packed"] = {**_time(packed.model.lm, prompt, args.steps, args.repeats),
                                      "resident_bytes": resident_bytes(packed.model), "packed_kinds": kinds}
    base = next(iter(rows.values()))["decode_s_per_token"]
    for r in rows.values():
        r["decode_vs_float"] = r["decode_s_per_token"] / base
    report = {"benchmark": "ssm_latency", "arch": {"name": args.arch, **ARCHS[args.arch]}, "prompt": args.prompt,
              "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "environment": env,
              "rows": rows, "seconds": time.perf_counter() - t0}
    lines = [f"ssm decode latency, batch 1, {args.arch} (seeded random weights, {ARCHS[args.arch]}), prompt "
             f"{args.prompt}, {args.steps} tokens, median of {args.repeats}; {env['device_name']} ({device}), "
             f"torch {env['torch']}, commit {env['git_sha']} (dirty: {env['git_dirty']})", "",
             "| model | prefill ms | decode ms/token | vs float | resident MB |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {1e3 * r['prefill_s']:.2f} | {1e3 * r['decode_s_per_token']:.3f} | "
                     f"{r['decode_vs_float']:.2f}x | {r['resident_bytes'] / 2**20:.2f} |")
    print("\n".join(lines))
    if args.out is not None:  # the JSON and, beside it, the table as markdown
        write_report(report, args.out, args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
