"""Quickstart: quantize any torch model with the core API, save the packed artifact, restore it.

    python examples/core_quickstart.py --wbits 4 --abits 8 --out /tmp/mlp_w4a8.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from polyquant.artifact import load, save
from polyquant.demo import digits_split, train_digits_mlp
from polyquant.export import export, restore
from polyquant.nn import QuantRule, QuantSpec, calibrate, prepare
from polyquant.primitives import PerChannel


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description="quantize a digits MLP with polyquant's core API")
    p.add_argument("--wbits", type=int, default=4, choices=range(2, 9))
    p.add_argument("--abits", type=int, default=8, choices=range(2, 9))
    p.add_argument("--out", type=Path, default=Path("mlp_quantized.safetensors"))
    args = p.parse_args(argv)

    x_train, y_train, x_test, y_test = digits_split()
    model = train_digits_mlp(x_train, y_train)

    rules = [QuantRule("*", weight=QuantSpec(f"int{args.wbits}", PerChannel(0), observer="mse"),
                       input=QuantSpec(f"int{args.abits}", observer="mse"))]
    qmodel = calibrate(prepare(model, rules), x_train[:256].split(64))
    save(export(qmodel, method="quickstart", config={"wbits": args.wbits, "abits": args.abits}), args.out)

    restored = restore(prepare(model, rules), load(args.out))
    with torch.no_grad():
        acc = (restored(x_test).argmax(-1) == y_test).float().mean().item() * 100
    print(f"W{args.wbits}A{args.abits}: test accuracy {acc:.2f}%, artifact {args.out.stat().st_size:,} bytes")
    return acc


if __name__ == "__main__":
    main()
