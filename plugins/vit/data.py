"""The offline task: scikit-learn's 8x8 handwritten digits, upsampled for small vision transformers.

Stable API (other modules and plugins build on it):

    load_digits_data(img_size=32, channels=1) -> DigitsData      fixed 70/30 stratified split, cached per process
    calib_set(n=32, seed=0, img_size=32, channels=1) -> Tensor    n training images (seeded subset), (n, C, H, W)
    batches(x, batch_size=256) -> Iterator[Tensor]                 consecutive slices of x
    evaluate(model, data=None, batch_size=256) -> float            top-1 accuracy in percent on the test split
    predict(model, x, batch_size=256) -> Tensor                    argmax class per image (model in eval mode)

The split never changes: ``SPLIT_SEED`` fixes it (1257 train / 540 test images). Pixels (0..16) are scaled to
[0, 1], upsampled by bilinear interpolation (align_corners=False) to ``img_size`` and normalized to [-1, 1]
with mean 0.5 and std 0.5; ``channels`` > 1 repeats the gray channel (for timm models built with 3 channels).
Seeds vary only *which* training images form a calibration set, never the split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SPLIT_SEED",
    "TEST_FRACTION",
    "NUM_CLASSES",
    "DigitsData",
    "load_digits_data",
    "calib_set",
    "batches",
    "predict",
    "evaluate",
]

SPLIT_SEED = 0  # random_state of the stratified train/test split
TEST_FRACTION = 0.3  # 540 of the 1797 images are held out
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    """The fixed digits split as float tensors (N, C, H, W) in [-1, 1] and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    img_size: int
    channels: int


def _check(img_size: int, channels: int) -> None:
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an integer >= 8, got {img_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def _to_images(pixels, img_size: int, channels: int) -> Tensor:
    x = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return x.repeat(1, channels, 1, 1).contiguous()


@functools.lru_cache(maxsize=8)
def load_digits_data(img_size: int = 32, channels: int = 1) -> DigitsData:
    """The digits split at ``img_size`` x ``img_size`` with ``channels`` channels (cached; treat as read-only)."""
    _check(img_size, channels)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return DigitsData(
        x_train=_to_images(x_tr, img_size, channels),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=_to_images(x_te, img_size, channels),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        img_size=img_size,
        channels=channels,
    )


def calib_set(n: int = 32, seed: int = 0, img_size: int = 32, channels: int = 1) -> Tensor:
    """``n`` distinct training images drawn with ``seed`` (the calibration set), shape (n, C, H, W)."""
    data = load_digits_data(img_size, channels)
    if not isinstance(n, int) or not 0 < n <= len(data.x_train):
        raise ValueError(f"calibration size must be in [1, {len(data.x_train)}], got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(data.x_train), generator=gen)[:n]
    return data.x_train[idx].clone()


def batches(x: Tensor, batch_size: int = 256) -> Iterator[Tensor]:
    """Consecutive slices of ``x`` along dimension 0."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted class (on the CPU) of every image of ``x``, fed to the model on its device (the model is put in
    eval mode and left there)."""
    model.eval()
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = x.device if first is None else first.device
    with torch.no_grad():
        return torch.cat([model(b.to(device)).argmax(dim=-1).cpu() for b in batches(x, batch_size)])


def evaluate(model: nn.Module, data: DigitsData | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) on the held-out split; ``data`` defaults to ``load_digits_data()``."""
    data = load_digits_data() if data is None else data
    pred = predict(model, data.x_test, batch_size)
    return float((pred == data.y_test).float().mean() * 100.0)
