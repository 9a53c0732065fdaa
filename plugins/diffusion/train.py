"""Train the shipped digits classifier (``assets/digits_classifier.safetensors``) and the class-conditional digits DiT
(``assets/digits_dit.safetensors``) on scikit-learn's digits.

    python -m polyquant.plugins.diffusion.train [--steps 3000] [--seed 0] [--threads 1]
    python -m polyquant.plugins.diffusion.train --unet       # the digits UNet of issue 26 (assets/digits_unet...)

Seeded (weights, batches, noise, timesteps, label dropout); CPU, a few minutes. The DiT learns epsilon prediction
under ``models.NOISE_SCHEDULE`` (diffusers ``DDPMScheduler.add_noise``, 1000 timesteps) with label dropout 0.1
(the null class, for classifier-free guidance); the shipped weights are an exponential moving average.
Prints the classifier's held-out accuracy and the class accuracy of 100 DDIM-20 and PLMS-20 samples of the float
DiT (10 per class, seed 0); both are stored in the checkpoints' metadata. Not run in CI: the checkpoints are shipped.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from . import models as M

LABEL_DROPOUT = 0.1  # share of training images conditioned on the null class (classifier-free guidance)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image shifted by -1, 0 or +1 pixel on each axis (zero = background -1 filled): light augmentation."""
    b, _, s, _ = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, S+2, S+2)
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    return torch.stack([padded[i, :, dy[i]: dy[i] + s, dx[i]: dx[i] + s] for i in range(b)])


def train_classifier(*, seed: int, steps: int = 1500, batch_size: int = 128,
                     lr: float = 2e-3) -> tuple[M.DigitsClassifier, dict]:
    """The digits CNN trained on the train split (shift augmentation), with its held-out accuracy."""
    x, y = M.digits_images("train")
    x_te, y_te = M.digits_images("test")
    torch.manual_seed(seed)
    clf = M.DigitsClassifier()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    clf.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(clf(_shift(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x_te).argmax(-1) == y_te).double().mean() * 100)
    record = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "held_out_accuracy": round(acc, 2),
              "seconds": round(time.time() - t0, 1)}
    return clf, record


def train_denoiser(model: torch.nn.Module, *, size: int, seed: int, steps: int, batch_size: int = 128,
                   lr: float = 1e-3, ema_decay: float = 0.999, name: str = "dit") -> tuple[torch.nn.Module, dict]:
    """Train a digits denoiser (DiT or UNet) for epsilon prediction on the train split; returns its EMA copy (eval
    mode) and the training record."""
    x, y = M.digits_images("train", size)
    ema = copy.deepcopy(model).eval()
    ddpm = M.make_scheduler("ddpm")
    T = ddpm.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    # eval mode all along (no dropout): diffusers' LabelEmbedding would drop labels independently in every block's
    # embedding in train mode; the null class is drawn here, once per image, from the seeded generator
    model.eval()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        x0, labels = x[idx], y[idx]  # (B, 1, S, S), (B,)
        labels = torch.where(torch.rand(batch_size, generator=gen) < LABEL_DROPOUT, M.NULL_CLASS, labels)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (batch_size,), generator=gen)
        x_t = ddpm.add_noise(x0, noise, t)
        eps = M.noise_prediction(model, x_t, t, labels)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        if step % 250 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    record = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
              "noise_schedule": M.NOISE_SCHEDULE, "label_dropout": LABEL_DROPOUT, "seconds": round(time.time() - t0, 1)}
    return ema, record


def train_dit(arch: dict, *, seed: int, steps: int, batch_size: int = 128, lr: float = 1e-3,
              ema_decay: float = 0.999) -> tuple[torch.nn.Module, dict]:
    """The DiT trained for epsilon prediction on the train split; returns its EMA copy (eval mode)."""
    torch.manual_seed(arch["seed"])
    return train_denoiser(M.dit_from_arch(arch), size=arch["sample_size"], seed=seed, steps=steps,
                          batch_size=batch_size, lr=lr, ema_decay=ema_decay, name="dit")


def _sample_accuracy(model: torch.nn.Module, record: dict) -> None:
    labels = torch.arange(100) % M.NUM_CLASSES
    for name in M.SCHEDULERS:
        images = M.sample(model, labels, steps=20, scheduler=name, seed=0)
        record[f"sample_accuracy_{name}20"] = round(M.class_accuracy(images, labels), 1)
        print(f"class accuracy of 100 {name.upper()}-20 samples: {record[f'sample_accuracy_{name}20']:.1f}%")
    record["python"] = sys.version.split()[0]


def train_unet_main(args: argparse.Namespace) -> int:
    """Train and save the digits UNet (``unet.py``)."""
    from . import unet as U

    arch = {**U.UNET_ARCH, "seed": args.seed}
    torch.manual_seed(arch["seed"])
    model, record = train_denoiser(U.unet_from_arch(arch), size=arch["sample_size"], seed=args.seed,
                                   steps=args.steps, name="unet")
    _sample_accuracy(model, record)
    print(U.save_unet(model, arch, record))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000, help="DiT optimizer steps")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unet", action="store_true", help="train the digits UNet (issue 26) instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.unet:
        return train_unet_main(args)
    clf, clf_record = train_classifier(seed=args.seed, steps=args.classifier_steps)
    print(f"classifier held-out accuracy: {clf_record['held_out_accuracy']:.2f}% ({clf_record['seconds']}s)")
    M.save_classifier(clf, clf_record)
    M.load_classifier.cache_clear()

    arch = {**M.ARCH_DEFAULTS, "seed": args.seed}
    model, record = train_dit(arch, seed=args.seed, steps=args.steps)
    _sample_accuracy(model, record)
    print(M.save_dit(model, arch, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
