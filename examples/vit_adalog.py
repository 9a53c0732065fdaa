"""AdaLog on a vision transformer from Python: quantize, compare with min-max, save the artifact, restore it.

    python examples/vit_adalog.py --model digits-vit --wbits 4 --abits 4 --out /tmp/vit_adalog_w4a4.safetensors
    python examples/vit_adalog.py --model deit_tiny_patch16_224 --img-size 32 --calib 16   # timm, random weights

With the shipped digits ViT the script reports top-1 accuracy on the 540 held-out digits; with a timm model
(random weights: there is no model hub here) it reports how close the quantized logits stay to the float ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import polyquant as pq
from polyquant.plugins.vit.adalog import AdaLogConfig
from polyquant.plugins.vit.baselines import MinMaxConfig
from polyquant.plugins.vit.data import calib_set, evaluate, load_digits_data
from polyquant.plugins.vit.models import build_model, input_spec


def logit_error(model: torch.nn.Module, qmodel: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative L2 error of the quantized model's logits."""
    with torch.no_grad():
        ref = model(x)
        return float((qmodel(x) - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="AdaLog vs min-max PTQ of a ViT, with a saved artifact")
    p.add_argument("--model", default="digits-vit", help="'digits-vit' or a timm model name")
    p.add_argument("--img-size", type=int, default=None, help="input size for a timm model")
    p.add_argument("--wbits", type=int, default=4, choices=range(2, 9))
    p.add_argument("--abits", type=int, default=4, choices=range(2, 9))
    p.add_argument("--calib", type=int, default=32, help="calibration images (digits, resized to the model)")
    p.add_argument("--search-round", type=int, default=3, help="FPCS rounds (paper: 3)")
    p.add_argument("--out", type=Path, default=Path("vit_adalog.safetensors"))
    args = p.parse_args(argv)

    model, _ = build_model(args.model, **({"img_size": args.img_size} if args.img_size else {}))
    size, chans = input_spec(model)
    calib = [calib_set(args.calib, seed=0, img_size=size, channels=chans)]  # an iterable of batches
    data = load_digits_data(size, chans)
    digits = args.model.startswith("digits")

    results: dict[str, float] = {}
    configs = {
        "adalog": AdaLogConfig(wbits=args.wbits, abits=args.abits, calib_size=args.calib,
                               search_round=args.search_round),
        "minmax": MinMaxConfig(wbits=args.wbits, abits=args.abits, calib_size=args.calib),
    }
    qms = {name: pq.quantize(model, config, calib=calib) for name, config in configs.items()}
    qmodels = {name: qm.model for name, qm in qms.items()}
    x = data.x_test[:128]
    print(f"{args.model} W{args.wbits}A{args.abits}, {args.calib} calibration images")
    if digits:
        results["float"] = evaluate(model, data)
        print(f"  float   top-1 {results['float']:.2f}%")
    for name, q in qmodels.items():
        results[name] = evaluate(q, data) if digits else logit_error(model, q, x)
        print(f"  {name:7s} " + (f"top-1 {results[name]:.2f}%" if digits else f"logit error {results[name]:.4f}"))

    path = pq.save(qms["adalog"], args.out)
    restored = pq.load(path)  # the plugin rebuilds the model from the artifact's model config
    with torch.no_grad():
        same = torch.equal(restored.model(x), qmodels["adalog"](x))
    print(f"saved {path} ({path.stat().st_size:,} bytes); restored model gives identical outputs: {same}")
    results["artifact_bytes"] = float(path.stat().st_size)
    results["identical"] = float(same)
    return results


if __name__ == "__main__":
    main()
