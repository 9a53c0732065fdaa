"""Train the shipped digits ViT (seeded, CPU, about a minute): ``python -m polyquant.plugins.vit.train``.

    python -m polyquant.plugins.vit.train [--out PATH] [--epochs 60] [--seed 0] [--threads 1]

AdamW with a cosine schedule and light augmentation (random shifts of up to 2 pixels of the 32x32 image) on the
fixed training split of ``data.load_digits_data``; the held-out accuracy is stored in the checkpoint metadata.
Deterministic for a given seed and thread count on one machine.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import evaluate, load_digits_data
from .models import DIGITS_VIT_PATH, digits_vit_config, model_from_config, save_checkpoint

__all__ = ["train_digits_vit", "main"]


def _shift(x: Tensor, gen: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random translation of every image by up to ``max_shift`` pixels (edge pixels are -1, the background)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_digits_vit(*, epochs: int = 60, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 0.05, log: bool = True) -> tuple[nn.Module, float]:
    """Train the digits ViT; returns (model in eval mode, test accuracy in percent)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_data()
    config = digits_vit_config()
    model = model_from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x = _shift(data.x_train[idx], gen)
            loss = F.cross_entropy(model(x), data.y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
        if log and (epoch % 10 == 9 or epoch == epochs - 1):
            acc = evaluate(model, data)
            print(f"epoch {epoch + 1:3d}  loss {running / n:.4f}  test acc {acc:.2f}%  ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    return model, evaluate(model, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits ViT shipped with polyquant's vit plugin.")
    parser.add_argument("--out", type=Path, default=DIGITS_VIT_PATH, help="checkpoint path (.safetensors)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it slightly)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, acc = train_digits_vit(epochs=args.epochs, seed=args.seed)
    meta = {"task": "sklearn digits 8x8 -> 32x32, split seed 0, 30% test", "test_accuracy": round(acc, 3),
            "epochs": args.epochs, "seed": args.seed, "script": "python -m polyquant.plugins.vit.train"}
    save_checkpoint(model, args.out, digits_vit_config(), meta)
    print(f"saved {args.out} ({args.out.stat().st_size:,} bytes), test accuracy {acc:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
