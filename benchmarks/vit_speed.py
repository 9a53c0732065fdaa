"""Calibration time of the vit methods at real model sizes, side by side in one run (issue 12).

    python benchmarks/vit_speed.py                                   # CPU, the default models and methods
    python benchmarks/vit_speed.py --device cuda --out benchmarks/results_gpu/vit_speed.json

Models: the shipped digits ViT (32x32), DeiT-tiny and Swin-tiny at 224 (timm, random weights: timing does not
depend on training, and no hub is needed). Calibration images are seeded random tensors of the model's input
size. Every row times ``polyquant.quantize`` end to end (copy, wrap, capture, searches, finalize) on the device
asked for, with ``--threads`` CPU threads; the JSON records the environment (git SHA, versions, device).

The official GoatWu/AdaLog code is not run here (it needs CUDA and ImageNet-style loaders): on a GPU machine,
time its ``test_quant.py`` on the same model and calibration size and add the ratio by hand
(``benchmarks/GPU_PENDING.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _env import environment

DEFAULT_MODELS = ("digits-vit", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
DEFAULT_METHODS = ("minmax", "adalog")


def build(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The float model and its (C, H, W) input size."""
    if name.startswith("digits-"):
        from polyquant.plugins.vit.models import build_model

        model, _ = build_model(name)
        return model.eval(), (1, 32, 32)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    return model, tuple(model.default_cfg["input_size"])  # type: ignore[return-value]


def time_one(model_name: str, method: str, calib: int, rounds: int | None, device: str) -> dict[str, Any]:
    import polyquant as pq
    from polyquant.plugins import get_method

    model, size = build(model_name)
    torch.manual_seed(0)
    images = torch.randn(calib, *size)
    cls = get_method("vit", method)
    fields = {"wbits": 4, "abits": 4, "calib_size": calib}
    if rounds is not None and "search_round" in cls.__dataclass_fields__:
        fields["search_round"] = rounds
    config = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pq.quantize(model, config, calib=[images], progress=False, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"model": model_name, "method": method, "calib": calib, "input": list(size), "device": device,
            "search_round": getattr(config, "search_round", None), "seconds": round(seconds, 2)}


def print_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | calib | rounds | device | seconds | vs minmax |", "|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["device"]): r["seconds"] for r in rows if r["method"] == "minmax"}
    for r in rows:
        ref = base.get((r["model"], r["device"]))
        ratio = f"{r['seconds'] / ref:.1f}x" if ref else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['calib']} | {r['search_round'] or '-'} | {r['device']} | "
                     f"{r['seconds']:.1f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--search-rounds", type=int, default=None, help="default: each method's own")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"environment": {**environment(args.device), "threads": args.threads}, "rows": []}
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            row = time_one(model_name, method, args.calib, args.search_rounds, args.device)
            result["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
    print_table(result["rows"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
