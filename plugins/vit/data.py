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

The user's images (``--calib-data DIR`` / ``--eval-data DIR``):

    Preprocess(size, mean, std, interpolation="bilinear", crop_pct=1.0, channels=3)   how a file becomes an input
    preprocess_for(model, *, size=None, mean=None, std=None, interpolation=None, crop_pct=None) -> Preprocess
    load_image_folder(root, prep, *, limit=None, seed=0) -> ImageFolderData         ImageFolder layout or flat
    evaluate_folder(model, data, batch_size=256) -> float                           top-1 accuracy on labeled images

A file is decoded by PIL, converted to RGB (``channels=3``) or grayscale ('L', ``channels=1``), scaled to [0, 1],
resized (short side to ``floor(size / crop_pct)``, antialiased, on the float image), center-cropped to ``size`` and
normalized with ``mean`` / ``std``: timm's eval transform (crop_mode 'center'). ``preprocess_for`` reads timm's
data config of a model with a ``pretrained_cfg``; a model without one (the shipped digits models, "vit" / "hybrid"
checkpoints) gets the digits convention: its own input size and channels, mean 0.5, std 0.5, bilinear, crop_pct 1.
So a digit saved as an 8x8 grayscale PNG (pixel * 255 / 16) loads as ``load_digits_data`` has it, to within the
PNG's 8-bit rounding (1/255 after normalization): the 8 -> 32 upsampling is the same bilinear
(align_corners=False) interpolation.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


__all__ = [
    "input_spec",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "NUM_CLASSES",
    "DigitsData",
    "load_digits_data",
    "calib_set",
    "batches",
    "predict",
    "evaluate",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "Preprocess",
    "preprocess_for",
    "ImageFolderData",
    "load_image_folder",
    "evaluate_folder",
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


# --- the user's images: a folder in torchvision's ImageFolder layout, or a flat folder ------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # matched case-insensitively
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_IMAGE_SIZE = 4096  # largest input side (the bound of a model config's img_size)


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input: timm's eval transform with crop_mode 'center'.

    Args:
        size: side of the square input in pixels, 1..4096.
        mean: subtracted per channel from pixels scaled to [0, 1]; one value per channel.
        std: divided by per channel (each > 0); one value per channel.
        interpolation: 'bilinear', 'bicubic' or 'nearest'; the resize works on the float image, antialiased when it
            shrinks, and clamps to [0, 1] (bicubic overshoots).
        crop_pct: the short side is resized to ``floor(size / crop_pct)`` (``resize_size``), then the central
            ``size`` x ``size`` square is kept; 1.0 keeps the whole short side, above 1 pads with black (as timm).
            In [0.1, 2].
        channels: 3 (RGB) or 1 (grayscale, PIL's 'L' conversion: 0.299 R + 0.587 G + 0.114 B).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    channels: int = 3

    def __post_init__(self) -> None:
        if not _is_int(self.size) or not 1 <= self.size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image size must be an integer in [1, {MAX_IMAGE_SIZE}], got {self.size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not _is_number(self.crop_pct) or not 0.1 <= self.crop_pct <= 2.0:
            raise ValueError(f"crop_pct must be a number in [0.1, 2], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "mean", self._per_channel("mean", self.mean))
        object.__setattr__(self, "std", self._per_channel("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize_size < 1:
            raise ValueError(f"size {self.size} / crop_pct {self.crop_pct} resizes images to nothing")

    def _per_channel(self, name: str, values: Sequence[float]) -> tuple[float, ...]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{name} must be a sequence of {self.channels} numbers, got {values!r}")
        if len(values) != self.channels:
            raise ValueError(f"{name} needs {self.channels} value(s), one per channel, got {len(values)}: {values!r}")
        if not all(_is_number(v) for v in values):
            raise ValueError(f"{name} must hold finite numbers, got {values!r}")
        return tuple(float(v) for v in values)

    @property
    def resize_size(self) -> int:
        """The short side before the center crop: ``floor(size / crop_pct)`` (timm's ``scale_size``)."""
        return math.floor(self.size / self.crop_pct)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fit_channels(name: str, values: float | Sequence[float], channels: int, *, average: bool) -> tuple[float, ...]:
    """``values`` as one number per channel: a single number is repeated; with ``average``, several numbers for a
    1-channel model become their mean (timm's RGB statistics for a grayscale model). Anything else is left to
    ``Preprocess`` to refuse."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),) * channels
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) and all(_is_number(v) for v in values):
        if len(values) == 1:
            return (float(values[0]),) * channels
        if average and channels == 1:
            return (sum(values) / len(values),)
        return tuple(float(v) for v in values)
    raise ValueError(f"{name} must be a finite number or a sequence of finite numbers, got {values!r}")


def preprocess_for(
    model: nn.Module,
    *,
    size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> Preprocess:
    """The preprocessing ``model`` expects, with the given arguments (the CLI's flags) taking precedence.

    Size and channels are the model's own (``input_spec``: its patch embedding, else its config), so a timm
    model built with an ``img_size`` override gets that size. Mean, std, interpolation and crop_pct come from
    timm's data config (``timm.data.resolve_data_config``) when the model has a ``pretrained_cfg`` (a timm model's,
    a timm folder's config, or the shipped digits models' digits convention); its RGB mean and std are averaged for
    a 1-channel model. A model without one needs ``mean`` and ``std`` (never guessed: ``ValueError`` naming
    ``--mean`` / ``--std``); its interpolation and crop_pct default to bilinear and 1. A single ``mean`` / ``std``
    number applies to every channel.
    """
    model_size, channels = input_spec(model)
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        base_mean = _fit_channels("timm mean", config["mean"], channels, average=True)
        base_std = _fit_channels("timm std", config["std"], channels, average=True)
        base_interpolation, base_crop = str(config["interpolation"]), float(config["crop_pct"])
    elif mean is None or std is None:
        missing = " and ".join(flag for flag, v in (("--mean", mean), ("--std", std)) if v is None)
        raise ValueError(f"the model records no input normalization (no timm pretrained_cfg): pass {missing} (the "
                         "values it was trained with, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
    else:
        base_mean, base_std, base_interpolation, base_crop = (0.0,) * channels, (1.0,) * channels, "bilinear", 1.0
    return Preprocess(
        size=model_size if size is None else size,
        mean=base_mean if mean is None else _fit_channels("mean", mean, channels, average=False),
        std=base_std if std is None else _fit_channels("std", std, channels, average=False),
        interpolation=base_interpolation if interpolation is None else interpolation,
        crop_pct=base_crop if crop_pct is None else crop_pct,
        channels=channels,
    )


@dataclass
class ImageFolderData:
    """Images loaded from a folder (``load_image_folder``).

    Args:
        images: (N, C, H, W) float32, preprocessed.
        labels: (N,) int64 class indices (index into ``classes``), or None for a flat folder.
        classes: class folder names, sorted (their index is the label); empty for a flat folder.
        paths: the file of each image, in the order of ``images``.
        requested: the ``limit`` asked for (None: all).
        found: how many images the folder holds; fewer than ``requested`` means a short set (``short``).
    """

    images: Tensor
    labels: Tensor | None
    classes: list[str]
    paths: list[str]
    requested: int | None
    found: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def short(self) -> bool:
        """True when the folder holds fewer images than requested."""
        return self.requested is not None and self.found < self.requested


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden files and folders skipped; symlinked subfolders not
    followed), sorted by path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image_name(f)]
    return sorted(found)


def _list_images(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """(paths, labels or None, classes) of a folder; see ``load_image_folder`` for the layout rules."""
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder (expected a folder of images or of class folders)")
    entries = sorted((e for e in root.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
    files = [e for e in entries if _is_image_name(e.name) and not e.is_dir()]
    folders = [e for e in entries if e.is_dir()]
    per_class = [_images_under(f) for f in folders]
    if files and any(per_class):
        with_images = next(f for f, images in zip(folders, per_class) if images)
        raise ValueError(f"{root} has both image files and class folders ({with_images.name}/...) at the top; put "
                         f"every image in a class folder (ImageFolder layout) or none (flat folder)")
    if files:
        return files, None, []
    if not any(per_class):
        raise ValueError(f"no images in {root} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case)")
    paths = [p for images in per_class for p in images]
    labels = [label for label, images in enumerate(per_class) for _ in images]
    return paths, labels, [f.name for f in folders]


def _load_image(path: Path, prep: Preprocess) -> Tensor:
    """One file as a preprocessed (C, size, size) float32 tensor; ``ValueError`` naming it if it cannot be read
    (``polyquant.artifact.ArtifactError`` for a path that is not a regular file of at most ``MAX_IMAGE_BYTES``)."""
    from polyquant.artifact import open_regular

    # a FIFO or device named *.png would block or never end: opened only as a regular file (also if swapped later)
    with open_regular(path, max_bytes=MAX_IMAGE_BYTES) as f:
        return _decode_image(f, path, prep)


MAX_IMAGE_BYTES = 256 * 1024 * 1024  # one calibration / evaluation image file


def _decode_image(f: BinaryIO, path: Path, prep: Preprocess) -> Tensor:
    """The image read from the open file ``f`` (of ``path``), preprocessed as ``_load_image`` says."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(f) as img:
            if img.mode.startswith("I;16"):  # 16-bit grayscale: PIL's 'L' / 'RGB' conversions would clip at 255
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 65535.0)[None]  # (1, H, W) in [0, 1]
                x = x.expand(prep.channels, -1, -1)
            else:
                rgb_or_gray = img.convert("RGB" if prep.channels == 3 else "L")  # decodes the whole file
                x = TF.pil_to_tensor(rgb_or_gray).float() / 255.0  # (C, H, W) in [0, 1]
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error...) on bad files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"cannot read image {path}: it has no pixels ({x.shape[-1]}x{x.shape[-2]})")
    x = TF.resize(x, [prep.resize_size], interpolation=TF.InterpolationMode(prep.interpolation), antialias=True)
    x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's 8-bit resize clamps too
    x = TF.center_crop(x, [prep.size, prep.size])  # (C, size, size); pads with 0 when crop_pct > 1
    return TF.normalize(x, list(prep.mean), list(prep.std))


def load_image_folder(
    root: str | Path, prep: Preprocess, *, limit: int | None = None, seed: int = 0
) -> ImageFolderData:
    """The images of ``root`` preprocessed by ``prep`` (all of them, or a seeded random subset of ``limit``).

    Layouts (hidden files and folders, names starting with '.', are skipped everywhere):

    * ImageFolder (as ``torchvision.datasets.ImageFolder``): ``root/<class>/**/<image>``; every visible subfolder
      is a class (also one without images, so indices match the folder list), label = index of its name in sorted
      order; image files are found recursively in a class folder.
    * Flat: image files directly in ``root``; ``labels`` is None. Subfolders without images are ignored.
    * Both image files and a subfolder holding images at the top level is refused (``ValueError``): neither
      reading can be told apart from a mistake, and silently dropping either part would be worse.

    Image files are those ending in one of ``IMAGE_EXTENSIONS`` (any case); other files are ignored. Only the
    selected images are decoded: memory is ``len(result) * C * size * size * 4`` bytes plus one decoded file.
    ``limit`` above the number found loads all of them and records ``requested=limit`` (``result.short``).

    Raises ``FileNotFoundError`` for a missing ``root``; ``ValueError`` (naming the path) for a ``root`` that is not
    a folder, a folder without images, mixed layouts, or an image that cannot be decoded.
    """
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    root = Path(root)
    paths, labels, classes = _list_images(root)
    found = len(paths)
    if limit is not None and limit < found:
        gen = torch.Generator().manual_seed(seed)
        picked = torch.randperm(found, generator=gen)[:limit].tolist()
    else:
        picked = list(range(found))
    images = torch.empty(len(picked), prep.channels, prep.size, prep.size)  # (N, C, H, W)
    for row, i in enumerate(picked):
        images[row] = _load_image(paths[i], prep)
    return ImageFolderData(
        images=images,
        labels=None if labels is None else torch.tensor([labels[i] for i in picked], dtype=torch.int64),
        classes=classes,
        paths=[str(paths[i]) for i in picked],
        requested=limit,
        found=found,
    )


def evaluate_folder(model: nn.Module, data: ImageFolderData, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) of ``model`` on labeled folder images (label = class folder index)."""
    if data.labels is None:
        raise ValueError("accuracy needs labels: these images come from a flat folder (use one folder per class)")
    pred = predict(model, data.images, batch_size)
    return float((pred == data.labels).float().mean() * 100.0)


def _first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (float ``nn.Conv2d`` or a quantized ``QuantConv2d``)."""
    for m in model.modules():
        chans = getattr(m, "in_channels", None)
        if isinstance(chans, int) and (isinstance(m, nn.Conv2d) or hasattr(m, "weight_quantizer")):
            return chans
    return None


def input_spec(model: nn.Module) -> tuple[int, int]:
    """(image size, channels) a model expects: from its patch embedding, its config, or timm's pretrained cfg.

    Works on float models and on their quantized copies (``QuantConv2d`` keeps the conv's hyper-parameters).
    """
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        size = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else int(pe.img_size)
        chans = getattr(getattr(pe, "proj", None), "in_channels", None)
        return int(size), int(chans) if isinstance(chans, int) else 3
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = _first_conv_channels(model)
    if "input_size" in cfg:
        c, h, _ = cfg["input_size"]
        return int(h), first if first is not None else int(c)
    return 32, first if first is not None else 3
