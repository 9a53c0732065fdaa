"""Issue 11, item 4: calibration and evaluation images from a folder (``data.load_image_folder``) preprocessed as the
model expects (``data.Preprocess``, ``data.preprocess_for``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

from polyquant.plugins.vit.data import (  # noqa: E402
    SPLIT_SEED,
    TEST_FRACTION,
    Preprocess,
    evaluate_folder,
    load_digits_data,
    load_image_folder,
    predict,
    preprocess_for,
)

GRAY = Preprocess(size=8, mean=(0.5,), std=(0.5,), channels=1)
RGB = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (12, 12)) -> Path:
    """An RGB image of one color, ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# --- layouts ---------------------------------------------------------------------------------------------------


def test_image_folder_layout_gives_sorted_classes_and_labels(tmp_path: Path) -> None:
    for name in ("dog/d1.png", "cat/c2.jpg", "cat/c1.PNG", "cat/sub/c3.bmp", "dog/d2.webp"):
        _png(tmp_path / name)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / "cat" / ".hidden.png")  # hidden: skipped
    _png(tmp_path / ".cache" / "x.png")  # hidden folder: not a class

    data = load_image_folder(tmp_path, RGB)

    assert data.classes == ["cat", "dog"]
    names = [Path(p).relative_to(tmp_path).as_posix() for p in data.paths]
    assert names == ["cat/c1.PNG", "cat/c2.jpg", "cat/sub/c3.bmp", "dog/d1.png", "dog/d2.webp"]
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 3, 8, 8) and data.images.dtype == torch.float32
    assert (len(data), data.found, data.requested, data.short) == (5, 5, None, False)


def test_labels_match_torchvision_image_folder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    for name in ("b/1.png", "b/2.png", "a/1.png", "c/1.png", "c/2.png", "c/3.png"):
        _png(tmp_path / name)
    ours = load_image_folder(tmp_path, RGB)
    theirs = ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes
    assert ours.paths == [p for p, _ in theirs.samples]
    assert ours.labels is not None and ours.labels.tolist() == theirs.targets


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"img{i}.jpeg")
    (tmp_path / "empty_subfolder").mkdir()  # a subfolder without images does not make it an ImageFolder
    data = load_image_folder(tmp_path, GRAY)
    assert data.labels is None and data.classes == []
    assert [Path(p).name for p in data.paths] == ["img0.jpeg", "img1.jpeg", "img2.jpeg"]
    assert data.images.shape == (3, 1, 8, 8)


def test_mixed_layout_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "top.png")
    _png(tmp_path / "cls" / "a.png")
    with pytest.raises(ValueError, match=r"both image files and class folders \(cls/...\)"):
        load_image_folder(tmp_path, RGB)


def test_limit_takes_a_seeded_subset_and_records_a_short_set(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / f"{i:02d}.png", color=(i, i, i))

    first = load_image_folder(tmp_path, RGB, limit=4, seed=1)
    again = load_image_folder(tmp_path, RGB, limit=4, seed=1)
    other = load_image_folder(tmp_path, RGB, limit=4, seed=2)
    assert len(first) == 4 and len(set(first.paths)) == 4
    assert first.paths == again.paths and torch.equal(first.images, again.images)
    assert first.paths != other.paths
    assert (first.found, first.requested, first.short) == (10, 4, False)

    short = load_image_folder(tmp_path, RGB, limit=32)
    assert (len(short), short.found, short.requested, short.short) == (10, 10, 32, True)

    with pytest.raises(ValueError, match="limit"):
        load_image_folder(tmp_path, RGB, limit=0)


# --- preprocessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_constant_image_normalizes_to_hand_computed_values(tmp_path: Path, interpolation: str) -> None:
    _png(tmp_path / "c.png", color=(200, 100, 50), size=(10, 6))
    prep = Preprocess(size=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), interpolation=interpolation)
    image = load_image_folder(tmp_path, prep).images[0]
    expected = [(200 / 255 - 0.5) / 0.2, (100 / 255 - 0.4) / 0.25, (50 / 255 - 0.3) / 0.5]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(image[channel], torch.full((4, 4), value), atol=1e-5, rtol=0)


def test_resize_and_center_crop_of_non_square_images(tmp_path: Path) -> None:
    # 60 wide x 20 high: black | white | black thirds; crop_pct 1 keeps the short side, the center crop the middle
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.new("RGB", (15, 45), (255, 255, 255)).save(tmp_path / "tall.png")

    prep = Preprocess(size=20, mean=(0.0,) * 3, std=(1.0,) * 3)
    data = load_image_folder(tmp_path, prep)
    assert data.images.shape == (2, 3, 20, 20)
    assert torch.equal(data.images[0], torch.ones(3, 20, 20))  # tall.png: upsized 15 -> 20 wide, center 20 rows
    assert torch.equal(data.images[1], torch.ones(3, 20, 20))  # wide.png: exactly its white middle third

    # timm's eval transform: short side to floor(size / crop_pct) = floor(28 / 0.875) = 32, then the central 28
    prep = Preprocess(size=28, mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.875)
    assert prep.resize_size == 32
    assert load_image_folder(tmp_path, prep).images.shape == (2, 3, 28, 28)


def test_channels_1_converts_to_grayscale(tmp_path: Path) -> None:
    _png(tmp_path / "red.png", color=(255, 0, 0))
    image = load_image_folder(tmp_path, Preprocess(size=8, mean=(0.0,), std=(1.0,), channels=1)).images
    assert image.shape == (1, 1, 8, 8)
    torch.testing.assert_close(image, torch.full_like(image, 0.299), atol=1 / 255, rtol=0)  # ITU-R 601 luma


def test_16_bit_grayscale_is_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    image = load_image_folder(tmp_path, Preprocess(size=6, mean=(0.0,) * 3, std=(1.0,) * 3)).images
    torch.testing.assert_close(image, torch.full((1, 3, 6, 6), 32768 / 65535), atol=1e-6, rtol=0)


# --- errors ----------------------------------------------------------------------------------------------------


def test_corrupt_or_truncated_image_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        load_image_folder(tmp_path, RGB)

    cut = tmp_path / "cut"
    whole = _png(cut / "whole.png", size=(64, 64)).read_bytes()
    (cut / "whole.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*whole\.png"):
        load_image_folder(cut, RGB)


def test_special_file_named_like_an_image_is_refused_without_opening(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block forever
    with pytest.raises(ValueError, match=r"pipe\.png: is a FIFO, not a regular file"):
        load_image_folder(tmp_path, RGB)


def test_missing_empty_and_non_folder_roots_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere", RGB)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no images in .*empty"):
        load_image_folder(empty, RGB)
    (empty / "readme.txt").write_text("no pictures here")
    (empty / ".hidden.png").write_bytes(b"")
    (empty / "class_without_images").mkdir()
    with pytest.raises(ValueError, match=r"no images in .*empty"):
        load_image_folder(empty, RGB)
    file = _png(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"one\.png is not a folder"):
        load_image_folder(file, RGB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "image size"),
        ({"size": 8.0}, "image size"),
        ({"channels": 2}, "channels"),
        ({"mean": (0.5, 0.5)}, "mean needs 3 value"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"std": (0.5, float("nan"), 0.5)}, "std must hold finite"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"crop_pct": 3.0}, "crop_pct"),
    ],
)
def test_preprocess_validation(kwargs: dict, message: str) -> None:
    args = {"size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        Preprocess(**args)


# --- preprocess_for --------------------------------------------------------------------------------------------


def test_preprocess_for_a_timm_model_uses_its_data_config() -> None:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    prep = preprocess_for(model)
    assert (prep.size, prep.channels, prep.interpolation) == (224, 3, "bicubic")
    assert prep.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and prep.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert prep.crop_pct == pytest.approx(0.9)

    flags = preprocess_for(model, size=96, mean=0.5, std=[0.25], interpolation="bilinear", crop_pct=1.0)
    assert flags == Preprocess(size=96, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", crop_pct=1.0)
    with pytest.raises(ValueError, match="mean needs 3 value"):
        preprocess_for(model, mean=[0.1, 0.2])


def test_digits_model_preprocessing_reproduces_load_digits_data(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from polyquant.plugins.vit.models import build_model

    model, _ = build_model("digits-vit")
    prep = preprocess_for(model)
    assert prep == Preprocess(size=32, mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0, channels=1)

    # the first 40 training digits of the fixed split, saved as 8x8 gray PNGs (pixel 0..16 -> 0..255)
    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(digits.data, digits.target, test_size=TEST_FRACTION,
                                              random_state=SPLIT_SEED, stratify=digits.target)
    for i in range(40):
        pixels = np.rint(x_train[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
        (tmp_path / str(y_train[i])).mkdir(exist_ok=True)
        Image.fromarray(pixels, mode="L").save(tmp_path / str(y_train[i]) / f"{i:03d}.png")

    data = load_image_folder(tmp_path, prep)
    index = torch.tensor([int(Path(p).stem) for p in data.paths])
    reference = load_digits_data(32, 1)
    assert data.classes == [str(c) for c in range(10)]
    assert data.labels is not None and torch.equal(data.labels, reference.y_train[index])
    # only the PNG's 8-bit rounding differs: at most 0.5 / 255 in [0, 1], 1 / 255 after normalization
    torch.testing.assert_close(data.images, reference.x_train[index], atol=1 / 255 + 1e-6, rtol=0)
    assert torch.equal(predict(model, data.images), predict(model, reference.x_train[index]))
    expected = float((predict(model, reference.x_train[index]) == data.labels).float().mean() * 100)
    assert evaluate_folder(model, data) == pytest.approx(expected)


def test_evaluate_folder_needs_labels(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    data = load_image_folder(tmp_path, GRAY)
    with pytest.raises(ValueError, match="flat folder"):
        evaluate_folder(torch.nn.Identity(), data)
